"""Daemon CPU a request, before and after, side by side.

Two daemons on one private clamd: "base" runs the amavisd package of another
tree (`--base DIR`, e.g. an unpacked `git archive HEAD`), "ours" this
checkout's. Batches alternate between them so the VM's drift hits both alike;
each batch reports the daemon tree's CPU (master + workers, /proc ticks) a
message. Cases:

- small: one 4 KiB plain message as the milter asks (kept connection, spool
  path, tempdir_removed_by=client), c=1, one worker;
- mix: `make bench`'s AM.PDP mix (ampdp_throughput's messages), a connection
  a message, tempdir_removed_by=server, c=4, four workers.

    .venv/bin/python bench/daemon_ab.py --base /tmp/before --case small --pairs 3 -n 2000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from amavisd_client.wire.ampdp import Decoder, encode_block  # noqa: E402
from bench import ampdp_throughput as at  # noqa: E402
from tests.rigs.daemon import DaemonInstance  # noqa: E402


def smtp_source_message(size: int = 4096) -> bytes:
    """What the milter spools of an smtp-source message through Postfix."""
    head = ("Received: from localhost (localhost [127.0.0.1])\n"
            "\tby mail.example.test (Postfix) with ESMTP id 4Fq1xZ2Yq3z9sWr\n"
            "\tfor <sink@example.test>; Fri,  4 Dec 2026 21:00:00 +0000 (UTC)\n"
            "From: <bench@example.test>\nTo: <sink@example.test>\n"
            "Date: Fri,  4 Dec 2026 21:00:00 +0000 (UTC)\n"
            "Message-Id: <20261204210000.4Fq1xZ2Yq3z9sWr@mail.example.test>\n\n")
    body = "La la la\n" * ((size - len(head)) // 9)
    return (head + body).encode()


class Side:
    def __init__(self, name: str, tree: str | None, base: Path, clamd: ClamdInstance,
                 workers: int, **settings):
        args = None
        if tree:
            args = ["-c", f"import sys; sys.path.insert(0, {tree!r}); "
                    "from amavisd.cli import main; sys.exit(main())"]
        self.name = name
        self.daemon = DaemonInstance(base / name, clamd.address, workers=workers,
                                     python_args=args, admin_notify=[], sender_notify=[],
                                     recipient_notify=[], max_requests=0, **settings)
        self.daemon.start()
        self.daemon.wait_for_workers(workers)

    def stop(self) -> None:
        self.daemon.stop()


def ask(sock: socket.socket, attrs) -> str:
    sock.sendall(encode_block(attrs))
    decoder = Decoder()
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("closed without a reply")
        blocks = decoder.feed(data)
        if blocks:
            verdict = blocks[0].get("return_value")
            if verdict in (None, "tempfail"):
                raise RuntimeError(f"{verdict}: {blocks[0].get('setreply')}")
            return verdict


def small_batch(side: Side, data: bytes, n: int) -> None:
    """n requests on one kept connection; the client spools and removes (as the milter)."""
    spool = Path(tempfile.mkdtemp(dir=side.daemon.tempbase))
    mail = spool / "email.txt"
    mail.write_bytes(data)
    attrs = [("request", "AM.PDP"), ("sender", "<bench@example.test>"),
             ("recipient", "<sink@example.test>"), ("tempdir", str(spool)),
             ("tempdir_removed_by", "client"), ("mail_file", str(mail)),
             ("delivery_care_of", "client"), ("queue_id", "4Fq1xZ2Yq3z9sWr"),
             ("client_address", "127.0.0.1"), ("client_name", "localhost"),
             ("helo_name", "localhost"), ("protocol_name", "ESMTP")]
    done = 0
    while done < n:  # the daemon ends a connection after max_connection_requests (100)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(side.daemon.socket_path)
            for _ in range(min(100, n - done)):
                ask(sock, attrs)
                done += 1
    shutil.rmtree(spool)


def mix_batch(side: Side, messages: list, n: int, conc: int, tag: str) -> None:
    row = at.AmpdpRow()
    row.socket_path, row.tempbase = side.daemon.socket_path, side.daemon.tempbase
    jobs = row.prepare([messages[i % len(messages)] for i in range(n)], tag)
    todo = iter(jobs)
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                job = next(todo, None)
            if job is None or errors:
                return
            try:
                row.send(job)
            except Exception as err:  # noqa: BLE001
                errors.append(str(err))

    threads = [threading.Thread(target=client) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row.finish(jobs)
    if errors:
        raise RuntimeError(errors[0])


def syscalls(side: Side, work) -> int:
    """System calls the side's workers make while `work` runs (strace -c)."""
    out = Path(tempfile.mktemp(prefix="daemon-ab-strace"))
    argv = ["strace", "-f", "-o", str(out)] if os.environ.get("BENCH_STRACE_FULL") else \
        ["strace", "-c", "-f", "-o", str(out)]
    for pid in side.daemon.worker_pids():
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    work()
    tracer.send_signal(signal.SIGINT)
    tracer.wait()
    text = out.read_text()
    out.unlink()
    print(text)
    total = [line for line in text.splitlines() if line.rstrip().endswith("total")]
    return int(total[-1].split()[3]) if total else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="tree whose amavisd/ is 'base'")
    ap.add_argument("--case", choices=("small", "mix"), default="small")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("-n", type=int, default=2000, help="messages a batch")
    ap.add_argument("--conc", type=int, default=None)
    ap.add_argument("--strace", type=int, default=0, metavar="N",
                    help="then N more messages a side under strace -c -f on its workers: "
                    "system calls a message")
    args = ap.parse_args()
    conc = args.conc or (1 if args.case == "small" else 4)
    tmp = Path(tempfile.mkdtemp(prefix="daemon-ab", dir="/tmp"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        temp = at.clamd_temp_dir("tmpfs", stack)
        clamd = ClamdInstance(tmp / "c", mode="nodecomp", max_threads=4, temp_dir=temp)
        stack.callback(clamd.stop)
        clamd.start()
        sides = []
        for name, tree in (("base", args.base), ("ours", None)):
            # logs as each bench has them: the milter's to stderr, AM.PDP's none
            logging = {} if args.case == "small" else {"log_to": []}
            side = Side(name, tree, tmp, clamd, conc, **logging)
            stack.callback(side.stop)
            sides.append(side)
        if args.case == "small":
            data = smtp_source_message()

            def batch(side, n, tag):
                small_batch(side, data, n)
        else:
            messages, what = at.message_set(argparse.Namespace(corpus=None), tmp)
            print(f"mix: {what}")

            def batch(side, n, tag):
                mix_batch(side, messages, n, conc, tag)
        for side in sides:
            batch(side, 50, f"w{side.name}")
        results: dict[str, list[float]] = {s.name: [] for s in sides}
        for pair in range(args.pairs):
            order = sides if pair % 2 == 0 else sides[::-1]
            for side in order:
                t0, c0 = at.tree_ticks(side.daemon.pid), at.tree_ticks(clamd.pid)
                w0 = time.perf_counter()
                batch(side, args.n, f"{side.name}{pair}")
                wall = time.perf_counter() - w0
                t1, c1 = at.tree_ticks(side.daemon.pid), at.tree_ticks(clamd.pid)
                ms = (t1 - t0) / at.TICK / args.n * 1e3
                results[side.name].append(ms)
                print(f"pair {pair + 1} {side.name}: daemon {ms:.3f} ms/msg, clamd "
                      f"{(c1 - c0) / at.TICK / args.n * 1e3:.3f}, {args.n / wall:.0f} msgs/s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        for side in sides if args.strace else ():
            calls = syscalls(side, lambda s=side: batch(s, args.strace, "st"))
            print(f"{side.name}: {calls / args.strace:.1f} system calls a message (workers)")
        if not args.pairs:
            return 0
        b, o = statistics.median(results["base"]), statistics.median(results["ours"])
        print(f"median daemon CPU ms/msg: base {b:.3f} -> ours {o:.3f} ({(o / b - 1) * 100:+.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(at.interruptible(main))
