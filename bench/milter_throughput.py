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
  client nobody here wrote, for scale.

The clock covers smtp-source from start to exit: every message has had its
250 (so the milter's verdict) by then. Each row is then checked, outside
the clock: smtp-source exited 0, and Postfix's log has N `status=sent` to
the sink after its queue drained; a row that fails prints no number.

Usage (as root: Postfix, the daemon's user):
    .venv/bin/python bench/milter_throughput.py [-n 500] [-s 10] [-l 4096] [--workers 2]
        [--runs 3] [--rows postfix,ours,c-milter]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amavisd.testing.clamd import ClamdInstance  # noqa: E402
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
        yield ("127.0.0.1", port)
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


@contextlib.contextmanager
def milter_for(row: str, base: Path, daemon: DaemonInstance):
    if row == "postfix":
        yield None
    elif row == "ours":
        milter = MilterInstance(base / "m", daemon, f"unix:{base}/milter.sock",
                                "--socket-group", "postfix")
        # It drops to the daemon's user, as in production, and must still
        # reach the rig's NOTIFY_SOCKET: bound under umask 0 it is 0777.
        old = os.umask(0)
        try:
            milter.start()
        finally:
            os.umask(old)
        try:
            yield milter.listen
        finally:
            milter.stop()
    elif row == "c-milter":
        with c_milter(base / "c", daemon) as address:
            yield address
    elif row == "c-milter+amavisd-new":  # daemon is an AmavisdNewInstance
        with c_milter(base / "c", daemon, AMAVIS_USER) as address:
            yield address
    else:
        raise SystemExit(f"unknown row {row!r}")


def run_row(row: str, base: Path, daemon: DaemonInstance, args) -> float:
    """Seconds smtp-source took for args.n messages; raises if any went astray."""
    with smtp_sink(base) as relay, milter_for(row, base, daemon) as milter:
        main = {"milter_content_timeout": "300s", "in_flow_delay": "0",
                "default_process_limit": "200"}
        pfx = PostfixInstance(base / "postfix", relay=relay,
                              milters=[milter] if milter else [], main=main).start()
        try:
            argv = ["smtp-source", "-s", str(args.sessions), "-m", str(args.n),
                    "-l", str(args.length), "-f", "bench@example.test",
                    "-t", "rcpt@example.test", f"127.0.0.1:{pfx.smtp_port}"]
            started = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
            elapsed = time.perf_counter() - started
            if done.returncode:
                raise RuntimeError(f"{row}: smtp-source exit {done.returncode}: "
                                   f"{done.stdout[-500:]}{done.stderr[-500:]}")
            pfx.wait_queue_empty(timeout=600)
            sent = len(pfx.wait_log(r"status=sent", timeout=60, count=args.n))
            if sent != args.n:
                raise RuntimeError(f"{row}: {sent} of {args.n} reached the sink")
            return elapsed
        finally:
            pfx.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=500, help="messages a run")
    parser.add_argument("-s", "--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("-l", "--length", type=int, default=4096, help="message size, bytes")
    parser.add_argument("--workers", type=int, default=2, help="daemon workers")
    parser.add_argument("--runs", type=int, default=1, help="runs a row (median)")
    parser.add_argument("--rows", default="postfix,ours,c-milter")
    args = parser.parse_args()
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
    clamd = ClamdInstance(top / "clamd", mode="nodecomp").start()
    try:
        with DaemonInstance(top / "d", clamd.address, workers=args.workers, user=DAEMON_USER,
                            group=DAEMON_USER, admin_notify=[]) as daemon:
            for run in range(args.runs):
                for row in rows:
                    base = top / f"{row}-{run}"
                    base.mkdir()
                    results[row].append(run_row(row, base, daemon, args))
    finally:
        clamd.stop()
        shutil.rmtree(top, ignore_errors=True)
    floor = statistics.median(results["postfix"]) if "postfix" in results else None
    print(f"\n{args.n} messages of {args.length} bytes, {args.sessions} sessions, "
          f"{args.workers} daemon workers, {os.cpu_count()} cores, median of {args.runs}\n")
    print("| Row | seconds | msgs/s | vs postfix |\n|:---|---:|---:|---:|")
    for row, times in results.items():
        seconds = statistics.median(times)
        ratio = f"{seconds / floor:.2f}x" if floor else "-"
        print(f"| {row} | {seconds:.2f} | {args.n / seconds:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
