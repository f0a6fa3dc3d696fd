"""Messages per second through a real Postfix, with and without a milter, in one run.

Postfix's own load generator, `smtp-source`, sends N messages of L bytes over
S parallel SMTP sessions (one message a connection, so smtpd connects to the
milter once a message, as with real clients) into a private Postfix
(tests/rigs/postfix.py) relaying to `smtp-sink`. Rows, each on a fresh
Postfix, against the same private clamd (tests' signatures, no decoding in
clamd) and the same daemon settings:

- postfix: no milter, the floor a milter is measured against;
- ours: `smtpd_milters` -> our amavisd-milter -> our daemon -> clamd;
- c-milter: Debian's C amavisd-milter (1.7.2) -> our daemon -> clamd, the
  client nobody here wrote, for scale;
- baseline: ours, but run from another copy of amavisd_client/ (`--baseline
  DIR`, e.g. `git archive HEAD amavisd_client | tar -x -C DIR`): a change's
  before and after on the same machine load. Runs alternate rows, so load
  that comes and goes hits each row alike.

The clock covers smtp-source from start to exit: every message has had its
250 (so the milter's verdict) by then. Each row is then checked, outside
the clock: smtp-source exited 0, and Postfix's log has N `status=sent` to
the sink after its queue drained; a row that fails prints no number.

CPU is counted per process class over the clock (`cpu_split`): our milter,
the daemon's tree, clamd, Postfix's smtpd, cleanup, qmgr, smtp and the rest,
the sink, smtp-source; a process that exits in the clock is counted through
its parent's reaped-children times (Postfix's in "postfix-reaped": pass
--max-use 100000 so no smtpd or cleanup exits and each is seen by name).
Their sum is the chain's CPU a message, whatever else the machine runs.

Usage (as root: Postfix, the daemon's user):
    .venv/bin/python bench/milter_throughput.py [-n 500] [-s 10] [-l 4096] [--workers 2]
        [--runs 3] [--rows postfix,ours,c-milter] [--profile milter.svg] [--max-use N]
        [--rows postfix,baseline,ours --baseline /tmp/before]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amavisd.testing.clamd import ClamdInstance, memory_temp_dir  # noqa: E402
from tests.rigs.amavisd_new import AMAVIS_USER  # noqa: E402
from tests.rigs.daemon import DaemonInstance  # noqa: E402
from tests.rigs.mailboxes import ensure_user  # noqa: E402
from tests.rigs.milter import MilterInstance  # noqa: E402
from tests.rigs.postfix import PostfixInstance, free_port  # noqa: E402

DAEMON_USER = "amavisd-test"
C_MILTER = shutil.which("amavisd-milter") or "/usr/sbin/amavisd-milter"


@contextlib.contextmanager
def smtp_sink(workdir: Path):
    """Postfix's smtp-sink as the final destination: it answers and forgets."""
    port = free_port()
    proc = subprocess.Popen(["smtp-sink", "-u", "postfix", f"127.0.0.1:{port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "sink.err", "wb"))
    try:
        time.sleep(0.3)
        yield ("127.0.0.1", port), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def c_milter(workdir: Path, daemon, user: str = DAEMON_USER):
    """Debian's C amavisd-milter in front of `daemon` (ours, or an AmavisdNewInstance:
    then as user amavis, who must read the spool it writes into the daemon's tempbase)."""
    account = pwd.getpwnam(user)
    workdir.mkdir()
    os.chown(workdir, account.pw_uid, account.pw_gid)
    sock = workdir / "milter.sock"
    proc = subprocess.Popen([C_MILTER, "-f", "-s", f"unix:{sock}", "-S", daemon.socket_path,
                             "-w", daemon.tempbase, "-p", str(workdir / "pid")],
                            user=account.pw_uid, group=account.pw_gid, umask=0,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the C amavisd-milter did not start")
            time.sleep(0.1)
        yield f"unix:{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU of a live process so far (/proc/PID/stat); with
    `children`, plus its live children's and its reaped children's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        seconds = sum(cpu_seconds(int(kid), True) for kid in kids)
        return ticks / os.sysconf("SC_CLK_TCK") + seconds
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float:
    """CPU seconds every core spent busy so far (/proc/stat: all but idle and iowait)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


POSTFIX_CLASSES = ("smtpd", "cleanup", "qmgr", "smtp")  # the rest of Postfix: "postfix-other"


def _proc_table() -> dict[int, tuple[str, int, float, float]]:
    """Every live process: pid -> (comm, ppid, own CPU s, reaped children's CPU s)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rpartition(")")[2].split()
        table[int(entry)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                             (int(fields[13]) + int(fields[14])) / tick)
    return table


def cpu_split(roots: dict[str, int | None]) -> dict[tuple[int, str], float]:
    """CPU seconds so far by (pid, class): each root's process tree (`roots`:
    class -> pid; Postfix's tree split by program name), and each root's reaped
    children (in its class; Postfix's in "postfix-reaped": its exited smtpd and
    cleanup, see --max-use)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[tuple[int, str], float] = {}
    for name, root in roots.items():
        if not root or root not in table:
            continue
        todo = [root]
        while todo:
            pid = todo.pop()
            comm, _, own, reaped = table[pid]
            what = name
            if name == "postfix" and pid != root:
                what = comm if comm in POSTFIX_CLASSES else "postfix-other"
            out[pid, what] = out.get((pid, what), 0.0) + own
            # Reaped children are their tree's, but Postfix's are by program only while alive.
            where = (pid, "postfix-reaped" if name == "postfix" else name)
            out[where] = out.get(where, 0.0) + reaped
            todo.extend(children.get(pid, ()))
    return out


def split_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds a class spent between two `cpu_split`s."""
    spent: dict[str, float] = {}
    for key in after.keys() | before.keys():  # one gone: its CPU moved to its parent's reaped
        spent[key[1]] = spent.get(key[1], 0.0) + after.get(key, 0.0) - before.get(key, 0.0)
    return spent


def cpu_now(pid: int | None, daemon) -> dict[str, float]:
    """CPU seconds so far: the machine's, our milter's, the daemon's process tree."""
    now = {"machine": machine_cpu_seconds()}
    if pid:
        now["milter"] = cpu_seconds(pid)
    if getattr(daemon, "proc", None) is not None:
        now["daemon"] = cpu_seconds(daemon.proc.pid, children=True)
    return now


@contextlib.contextmanager
def py_spy(pid: int | None, out: Path | None):
    """`py-spy record` on our milter for the timed part, when asked (--profile)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if pid is None or out is None or not os.access(spy, os.X_OK):
        yield
        return
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format",
                             "raw" if out.suffix == ".txt" else "flamegraph", "-o", str(out),
                             *os.environ.get("PY_SPY_ARGS", "").split()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(60)


class MilterFrom(MilterInstance):
    """Our milter run from another copy of amavisd_client/ (`--baseline DIR`):
    a before and an after measured in one session, on one machine's load."""

    def __init__(self, root: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.root = root

    def argv(self) -> list[str]:
        argv = super().argv()
        assert argv[1:3] == ["-m", "amavisd_client.milter.main"]
        return [argv[0], "-c", f"import sys, runpy; sys.path.insert(0, {self.root!r}); "
                "runpy.run_module('amavisd_client.milter.main', run_name='__main__')",
                *argv[3:]]


@contextlib.contextmanager
def milter_for(row: str, base: Path, daemon: DaemonInstance, baseline: str | None = None):
    """The milter's address for Postfix (None: no milter), and its pid when it is ours."""
    if row == "postfix":
        yield None, None
    elif row in ("ours", "baseline"):
        where = (base / "m", daemon, f"unix:{base}/milter.sock", "--socket-group", "postfix")
        if row == "baseline":
            if not baseline:
                raise SystemExit("row baseline needs --baseline DIR")
            milter: MilterInstance = MilterFrom(baseline, *where)
        else:
            milter = MilterInstance(*where)
        # It drops to the daemon's user, as in production, and must still
        # reach the rig's NOTIFY_SOCKET: bound under umask 0 it is 0777.
        old = os.umask(0)
        try:
            milter.start()
        finally:
            os.umask(old)
        try:
            assert milter.proc is not None
            yield milter.listen, milter.proc.pid
        finally:
            milter.stop()
            for line in milter.log_text().splitlines():
                if "daemon connections:" in line:  # how many it kept (links.py)
                    print(f"  {row}: {line.split('daemon connections:', 1)[1].strip()}")
    elif row == "c-milter":
        with c_milter(base / "c", daemon) as address:
            yield address, None
    elif row == "c-milter+amavisd-new":  # daemon is an AmavisdNewInstance
        with c_milter(base / "c", daemon, AMAVIS_USER) as address:
            yield address, None
    else:
        raise SystemExit(f"unknown row {row!r}")


def warm_up(args) -> int:
    """Messages sent before the clock starts (`--warm`; default 10 a session,
    at least 20): a cold Postfix spawns smtpd, cleanup and the rest on the
    first messages, which in a short run weighs on a fast row far more than on
    a slow one (a fixed half second is a third of 300 messages at 200 msgs/s,
    a twentieth at 40)."""
    warm = getattr(args, "warm", None)
    return max(20, 10 * args.sessions) if warm is None else warm


def run_row(row: str, base: Path, daemon: DaemonInstance, args) -> float:
    """Seconds smtp-source took for args.n messages; raises if any went astray.
    With args.cpu (a dict), CPU seconds in the clock go to args.cpu[row,
    what] (what: machine, milter, daemon; see cpu_now); with args.profile (a path), py-spy records it meanwhile."""
    with smtp_sink(base) as (relay, relay_pid), \
            milter_for(row, base, daemon, getattr(args, "baseline", None)) as (milter, pid):
        main = {"milter_content_timeout": "300s", "in_flow_delay": "0",
                "default_process_limit": "200"}
        if getattr(args, "max_use", None):
            main["max_use"] = str(args.max_use)
        pfx = PostfixInstance(base / "postfix", relay=relay,
                              milters=[milter] if milter else [], main=main).start()
        try:
            def source(count: int) -> list[str]:
                return ["smtp-source", "-s", str(args.sessions), "-m", str(count),
                        "-l", str(args.length), "-f", "bench@example.test",
                        "-t", "rcpt@example.test", f"127.0.0.1:{pfx.smtp_port}"]
            warm = warm_up(args)
            if warm:  # Postfix's processes spawned, every way in used once: steady state
                subprocess.run(source(warm), capture_output=True, timeout=3600, check=True)
                pfx.wait_queue_empty(timeout=600)
            argv = source(args.n)
            profile = getattr(args, "profile", None)
            with py_spy(pid if row == "ours" else None, Path(profile) if profile else None):
                roots = {"milter": pid, "daemon": getattr(getattr(daemon, "proc", None),
                                                          "pid", None),
                         "clamd": getattr(args, "clamd_pid", None), "postfix": pfx.master_pid(),
                         "sink": relay_pid}
                cpu, split = cpu_now(pid, daemon), cpu_split(roots)
                kids = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
                elapsed = time.perf_counter() - started
                if isinstance(getattr(args, "cpu", None), dict):
                    spent = split_delta(split, cpu_split(roots))
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    spent["smtp-source"] = (after.ru_utime + after.ru_stime
                                            - kids.ru_utime - kids.ru_stime)
                    for what, seconds in spent.items():
                        args.split.setdefault((row, what), []).append(seconds)
                    for what, seconds in cpu_now(pid, daemon).items():
                        args.cpu.setdefault((row, what), []).append(seconds - cpu[what])
            if done.returncode:
                raise RuntimeError(f"{row}: smtp-source exit {done.returncode}: "
                                   f"{done.stdout[-500:]}{done.stderr[-500:]}")
            pfx.wait_queue_empty(timeout=600)
            sent = len(pfx.wait_log(r"status=sent", timeout=60, count=warm + args.n))
            if sent != warm + args.n:
                raise RuntimeError(f"{row}: {sent} of {warm + args.n} reached the sink")
            return elapsed
        finally:
            pfx.stop()


def print_split(args, rows: list[str]) -> None:
    """CPU ms a message by process class and row (median over runs): the chain's split."""
    classes = sorted({what for _, what in args.split})
    print("\n| CPU ms/msg | " + " | ".join(rows) + " |\n|:---|"
          + "---:|" * len(rows))
    totals = dict.fromkeys(rows, 0.0)
    for what in classes:
        cells = []
        for row in rows:
            ms = statistics.median(args.split.get((row, what), [0.0])) * 1000 / args.n
            totals[row] += ms
            cells.append(f"{ms:.2f}")
        if any(float(c) for c in cells):
            print(f"| {what} | " + " | ".join(cells) + " |")
    print("| **chain** | " + " | ".join(f"{totals[r]:.2f}" for r in rows) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=500, help="messages a run")
    parser.add_argument("-s", "--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("-l", "--length", type=int, default=4096, help="message size, bytes")
    parser.add_argument("--workers", type=int, default=2, help="daemon workers")
    parser.add_argument("--runs", type=int, default=1, help="runs a row (median)")
    parser.add_argument("--rows", default="postfix,ours,c-milter")
    parser.add_argument("--baseline", metavar="DIR",
                        help="row baseline: our milter from DIR/amavisd_client (a before)")
    parser.add_argument("--max-use", type=int,
                        help="Postfix's max_use (default 100): high, no smtpd exits in the "
                        "clock, so the CPU split shows smtpd and cleanup by name")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy our milter into FILE (.svg flame graph, .txt raw stacks)")
    parser.add_argument("--warm", type=int,
                        help="messages sent before the clock (default 10 a session, >= 20)")
    parser.add_argument("--clamd-temp", choices=("tmpfs", "disk"), default="tmpfs",
                        help="clamd's TemporaryDirectory: /dev/shm (default, as make bench "
                        "and a gateway should run it) or clamd's default /tmp")
    args = parser.parse_args()
    args.cpu, args.split = {}, {}
    if os.geteuid() != 0:
        raise SystemExit("run as root (a private Postfix; the daemon's user)")
    rows = args.rows.split(",")
    if "c-milter" in rows and not os.access(C_MILTER, os.X_OK):
        print(f"(no {C_MILTER}: row c-milter skipped)")
        rows.remove("c-milter")
    ensure_user(DAEMON_USER, DAEMON_USER)
    top = Path(tempfile.mkdtemp(prefix="amb", dir="/tmp"))
    top.chmod(0o755)
    results: dict[str, list[float]] = {row: [] for row in rows}
    clamd_temp = memory_temp_dir("bench-clamd") if args.clamd_temp == "tmpfs" else None
    clamd = ClamdInstance(top / "clamd", mode="nodecomp", temp_dir=clamd_temp).start()
    args.clamd_pid = clamd.pid
    try:
        with DaemonInstance(top / "d", clamd.address, workers=args.workers, user=DAEMON_USER,
                            group=DAEMON_USER, admin_notify=[], log_to=[]) as daemon:
            for run in range(args.runs):
                for row in rows:
                    base = top / f"{row}-{run}"
                    base.mkdir()
                    results[row].append(run_row(row, base, daemon, args))
                    print(f"run {run + 1} {row}: {args.n / results[row][-1]:.0f} msgs/s",
                          flush=True)
    finally:
        clamd.stop()
        shutil.rmtree(top, ignore_errors=True)
        if clamd_temp:
            shutil.rmtree(clamd_temp, ignore_errors=True)
    floor = statistics.median(results["postfix"]) if "postfix" in results else None
    print(f"\n{args.n} messages of {args.length} bytes, {args.sessions} sessions, "
          f"{args.workers} daemon workers, {os.cpu_count()} cores, median of {args.runs}\n")
    print("| Row | seconds | msgs/s | vs postfix | CPU ms/msg: machine | milter | daemon |\n"
          "|:---|---:|---:|---:|---:|---:|---:|")
    for row, times in results.items():
        seconds = statistics.median(times)
        ratio = f"{seconds / floor:.2f}x" if floor else "-"
        cpu = " | ".join(f"{statistics.median(args.cpu[row, what]) * 1000 / args.n:.2f}"
                         if (row, what) in args.cpu else ""
                         for what in ("machine", "milter", "daemon"))
        print(f"| {row} | {seconds:.2f} | {args.n / seconds:.0f} | {ratio} | {cpu} |")
    print_split(args, list(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
