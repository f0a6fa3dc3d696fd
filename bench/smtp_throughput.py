"""The SMTP content filter under load: Postfix -> filter -> Postfix -> sink, msgs/s.

Postfix's own load generator (`smtp-source`) sends N messages at
concurrency C into a private Postfix whose `content_filter` is the filter
under test (the amavisfeed service of etc/postfix/*.content_filter, maxproc
= C), which re-injects into Postfix's 127.0.0.1 re-injection smtpd, which
delivers to an SMTP sink that keeps every message. Rows, in the same run,
on the same private clamd (test signatures, no decoding in clamd):

- ours: `amavisd run` with workers = C, smtp_listen on the filter port;
- amavisd-new: Debian's amavisd-new (max_servers = C), its SMTP port;
- postfix-only: the content_filter pointed straight at the re-injection
  port, so Postfix makes the same two passes with no filter between: the
  ceiling any filter can reach on this machine;
- baseline: ours, but the daemon's code from another copy of the package
  (`--baseline DIR`, DIR/amavisd: a before), for side-by-side runs.

On a shared machine msgs/s swing with everything else running, so each row
also reports the CPU it cost a message: the daemon's process tree (master
and workers), clamd's and Postfix's (its master and every child), from the
first message sent to the last one at the sink. `--repeat R` runs the rows
R times alternating (old, new, old, new...) and reports each run; `--strace`
counts the daemon's system calls a message (strace -c -f on the master and
its workers: slow, for counts only, not for rates).

The clock runs from the first message smtp-source sends to the last one
the sink has. Every recipient is unique (smtp-source -N), so the sink
proves each message arrived exactly once; a row whose sink does not end
with exactly N messages, or whose Postfix queue is not empty, is reported
as failed rather than fast. Also shown: the time smtp-source took to hand
all messages to Postfix (its queue absorbs them: the filter runs after).

Usage (as root: Postfix and amavisd-new need it):
    .venv/bin/python bench/smtp_throughput.py [-n 2000] [-c 4] [--size 4096]
        [--rows ours,amavisd-new,postfix-only,baseline] [--baseline DIR]
        [--repeat R] [--strace] [--clamd-temp tmpfs|disk]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ampdp_throughput import (  # noqa: E402
    TICK,
    add_clamd_temp,
    clamd_temp_dir,
    machine_jiffies,
    own_ticks,
    tree_ticks,
)
from milter_throughput import cpu_split, split_delta  # noqa: E402

from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from tests.rigs import amavisd_new  # noqa: E402
from tests.rigs.daemon import ROOT, DaemonInstance  # noqa: E402
from tests.rigs.postfix import PostfixInstance, free_port  # noqa: E402
from tests.rigs.postfix import skip_reason as postfix_skip_reason  # noqa: E402

ETC = Path(ROOT) / "etc" / "postfix"


def snippets(filter_port: int, reinject_port: int, maxproc: int) -> tuple[dict, list[str]]:
    """main.cf settings and master.cf lines of the shipped recipe, ports moved."""
    ports = {"10024": str(filter_port), "10025": str(reinject_port)}

    def moved(text: str) -> str:
        return re.sub(r"\b(1002[45])\b", lambda m: ports[m.group(1)], text)

    main = {}
    for line in (ETC / "main.cf.content_filter").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            main[key.strip()] = moved(value.strip())
    master = []
    for line in (ETC / "master.cf.content_filter").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            if line.startswith("amavisfeed"):
                line = re.sub(r"(\s)2(\s+smtp)$", rf"\g<1>{maxproc}\g<2>", line)
            master.append(moved(line))
    return main, master


class AmavisdNewSMTP(amavisd_new.AmavisdNewInstance):
    """The same private amavisd-new, listening for SMTP and forwarding to Postfix."""

    def __init__(self, workdir: Path, clamd: str, port: int, forward_port: int, servers: int):
        super().__init__(workdir, clamd, virus_destiny="D_DISCARD", max_servers=servers)
        self.port, self.forward_port = port, forward_port

    def _config(self) -> str:
        text = super()._config()
        text = text.replace("$inet_socket_port = [];", f"$inet_socket_port = [{self.port}];")
        forward = f"smtp:[127.0.0.1]:{self.forward_port}"
        text = text.replace("$forward_method = 'smtp:[127.0.0.1]:9';",
                            f"$forward_method = '{forward}';")
        return text.replace("$notify_method = 'smtp:[127.0.0.1]:9';",
                            f"$notify_method = '{forward}';")


def code_from(directory: str) -> list[str]:
    """`python ARGS` that runs the daemon's command line from DIR/amavisd."""
    return ["-c", f"import sys; sys.path.insert(0, {directory!r}); "
            "from amavisd.cli import main; sys.exit(main())"]


def filter_for(name: str, work: Path, clamd: ClamdInstance, conc: int, filter_port: int,
               reinject_port: int, code: dict[str, str]):
    if name == "postfix-only":
        return None
    if name in ("ours", "baseline"):
        forward = f"smtp:[127.0.0.1]:{reinject_port}"
        extra = {}
        if name == "baseline" and not code.get(name):
            raise SystemExit("row baseline needs --baseline DIR")
        if code.get(name):
            extra["python_args"] = code_from(code[name])
        return DaemonInstance(work / "d", clamd.address, workers=conc,
                              smtp_listen=[f"127.0.0.1:{filter_port}"], forward_method=forward,
                              notify_method=forward, log_to=[],  # one file, as amavisd-new's
                              max_requests=0, child_timeout=300.0, **extra)
    return AmavisdNewSMTP(work / "a", clamd.address, filter_port, reinject_port, conc)


def strace_daemon(server) -> subprocess.Popen | None:
    """strace -c -f on the daemon's master and workers (None for other rows)."""
    if not isinstance(server, DaemonInstance):
        return None
    pids = [server.pid, *sorted(server.worker_pids())]
    argv = ["strace", "-c", "-f", "-o", str(server.workdir / "strace.txt")]
    for pid in pids:
        argv += ["-p", str(pid)]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    return proc


def strace_total(server, proc: subprocess.Popen) -> tuple[int, str]:
    """(calls in all, the top lines) once strace is stopped."""
    proc.send_signal(2)
    proc.wait(30)
    text = (server.workdir / "strace.txt").read_text()
    total = re.search(r"^\S+\s+\S+\s+\S+\s+(\d+)\s+(?:\d+\s+)?total$", text, re.M)
    lines = [line for line in text.splitlines()[2:12] if line.strip()]
    return (int(total.group(1)) if total else 0), "\n".join(lines)


def run_row(name: str, base: Path, clamd: ClamdInstance, n: int, conc: int, size: int,
            code: dict[str, str] | None = None, trace: bool = False,
            warm: int | None = None, split: bool = False) -> dict:
    """One row's run: `warm` messages first, off the clock (default 10 a
    session, at least 20: a cold Postfix spawns its processes on the first
    messages, a fixed cost that weighs on a fast row far more than on a slow
    one in a short run), then `n` timed until the sink has them all. With
    `split`, CPU by process class (Postfix's by program: max_use is raised so
    its smtpd and cleanup stay alive and named)."""
    warm = max(20, 10 * conc) if warm is None else warm
    filter_port, reinject_port = free_port(), free_port()
    main, master = snippets(filter_port, reinject_port, conc)
    work = base / name
    if work.exists():
        shutil.rmtree(work)
    if name == "postfix-only":  # the same two passes through Postfix, no filter between
        main["content_filter"] = re.sub(r":\d+$", f":{reinject_port}", main["content_filter"])
    server = filter_for(name, work, clamd, conc, filter_port, reinject_port, code or {})
    if server is not None:
        server.start()
    main["default_process_limit"] = "100"
    if split:
        main["max_use"] = "10000"
    pfx = PostfixInstance(work / "pfx", main=main, master=master)
    pfx.start()
    tracer = None
    try:
        def smtp_source(count: int, rcpt: str = "rcpt@example.test") -> list[str]:
            return ["smtp-source", "-s", str(conc), "-m", str(count), "-l", str(size), "-N",
                    "-f", "load@example.test", "-t", rcpt, f"127.0.0.1:{pfx.smtp_port}"]
        if warm:  # its own recipients: -N numbers each run's from 0 again
            subprocess.run(smtp_source(warm, "warm@example.test"), capture_output=True,
                           timeout=3600, check=True)
            pfx.sink.wait(warm, timeout=max(600.0, warm * 0.5))
            pfx.wait_queue_empty(60)
        tracer = strace_daemon(server) if trace else None
        server_pid = getattr(server, "pid", None) if server is not None else None
        before = (tree_ticks(server_pid), tree_ticks(clamd.pid), tree_ticks(pfx.master_pid()))
        roots = {"filter": server_pid, "clamd": clamd.pid, "postfix": pfx.master_pid()}
        split_before = cpu_split(roots) if split else {}
        (machine_before, _), (sink_before, _) = machine_jiffies(), own_ticks()
        started = time.monotonic()
        source = subprocess.run(smtp_source(n), capture_output=True, text=True, timeout=3600)
        handed = time.monotonic() - started
        if source.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {source.stderr}")
        pfx.sink.wait(warm + n, timeout=max(600.0, n * 0.5))
        done = time.monotonic() - started
        machine = (machine_jiffies()[0] - machine_before) * 1000 / TICK / n
        sink = (own_ticks()[0] - sink_before) * 1000 / TICK / n  # the SMTP sink's threads
        after = (tree_ticks(server_pid), tree_ticks(clamd.pid), tree_ticks(pfx.master_pid()))
        by_class = ({what: seconds * 1000 / n for what, seconds
                     in split_delta(split_before, cpu_split(roots)).items()} if split else {})
        calls, top = strace_total(server, tracer) if tracer is not None else (0, "")
        tracer = None
        time.sleep(2.0)  # a duplicate would arrive now
        pfx.wait_queue_empty(60)
        rcpts = Counter(r for m in pfx.sink.messages for r in m.rcpt_tos)
        ok = (len(pfx.sink.messages) == warm + n and len(rcpts) == warm + n
              and max(rcpts.values()) == 1)
        cpu = [(a - b) * 1000 / TICK / n for a, b in zip(after, before, strict=True)]
        return {"name": name, "n": n, "conc": conc, "handed": handed, "done": done,
                "rate": n / done, "ok": ok, "arrived": len(pfx.sink.messages) - warm,
                "duplicates": sum(c - 1 for c in rcpts.values()),
                "cpu": cpu[0], "machine_cpu": machine, "sink_cpu": sink, "clamd_cpu": cpu[1], "postfix_cpu": cpu[2],
                "syscalls": calls / n if calls else None, "strace": top, "split": by_class}
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        pfx.stop()
        if server is not None:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="messages per row")
    parser.add_argument("-c", "--conc", type=int, default=4, help="smtp-source sessions, "
                        "amavisfeed maxproc and filter workers")
    parser.add_argument("--size", type=int, default=4096, help="message size (smtp-source -l)")
    parser.add_argument("--rows", default="ours,amavisd-new")
    parser.add_argument("--baseline", metavar="DIR",
                        help="row baseline: the daemon from DIR/amavisd (a before)")
    parser.add_argument("--ours-from", metavar="DIR",
                        help="row ours: the daemon from DIR/amavisd (default: this checkout)")
    parser.add_argument("--repeat", type=int, default=1, help="run the rows R times, alternating")
    parser.add_argument("--strace", action="store_true",
                        help="count the daemon's system calls a message (slows it down)")
    parser.add_argument("--split", action="store_true",
                        help="CPU ms a message by process (Postfix's by program)")
    add_clamd_temp(parser)
    args = parser.parse_args()
    reasons = [r for r in (postfix_skip_reason(), shutil.which("smtp-source") is None and
                           "smtp-source missing (Debian package postfix)") if r]
    rows = args.rows.split(",")
    if "amavisd-new" in rows and amavisd_new.skip_reason():
        print(f"amavisd-new row skipped: {amavisd_new.skip_reason()}", file=sys.stderr)
        rows.remove("amavisd-new")
    if reasons:
        print(f"cannot run: {reasons[0]}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="smtpb", dir="/tmp"))
    base.chmod(0o755)
    stack = contextlib.ExitStack()
    clamd = ClamdInstance(base / "clamd", mode="nodecomp",
                          temp_dir=clamd_temp_dir(args.clamd_temp, stack)).start()
    results = []
    try:
        for turn in range(args.repeat):
            for row in rows if turn % 2 == 0 else rows[::-1]:  # old, new, new, old, ...
                results.append(run_row(row, base, clamd, args.n, args.conc, args.size,
                                       {"baseline": args.baseline, "ours": args.ours_from},
                                       args.strace, split=args.split))
                print_row(results[-1], header=len(results) == 1)
    finally:
        clamd.stop()
        stack.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.n} messages of {args.size} bytes, smtp-source -s {args.conc}, "
          f"Postfix content_filter (maxproc {args.conc}) -> filter ({args.conc} workers) -> "
          "Postfix -> sink\n")
    for i, r in enumerate(results):
        print_row(r, header=i == 0)
    classes = sorted({what for r in results for what in r["split"]})
    if classes:
        print("\n| CPU ms/msg | " + " | ".join(r["name"] for r in results) + " |\n|:---|"
              + "---:|" * len(results))
        for what in classes:
            print(f"| {what} | " + " | ".join(f"{r['split'].get(what, 0.0):.2f}"
                                              for r in results) + " |")
    for r in results:
        if r["strace"]:
            print(f"\n{r['name']}: strace -c -f, top calls\n{r['strace']}")
    return 0 if all(r["ok"] for r in results) else 1


def print_row(r: dict, header: bool) -> None:
    if header:
        print("| filter | msgs/s (end to end) | all through | smtp-source done | arrived | "
              "duplicates | filter CPU ms/msg | clamd CPU ms/msg | Postfix CPU ms/msg | "
              "sink CPU ms/msg | machine CPU ms/msg | syscalls/msg |")
        print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    flag = "" if r["ok"] else " **FAILED**"
    calls = f"{r['syscalls']:.0f}" if r["syscalls"] else ""
    print(f"| {r['name']}{flag} | {r['rate']:.1f} | {r['done']:.1f} s | {r['handed']:.1f} s "
          f"| {r['arrived']} | {r['duplicates']} | {r['cpu']:.2f} | {r['clamd_cpu']:.2f} "
          f"| {r['postfix_cpu']:.2f} | {r['sink_cpu']:.2f} | {r['machine_cpu']:.2f} | {calls} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
