"""Python calls a message in a worker's SMTP content filter:
cProfile of the real worker code, driven in-process over a socketpair.

A Worker is built as the master builds one, then serves SMTP sessions the
harness feeds from a client thread (not profiled) the way Postfix's smtp
client does (EHLO once, then XFORWARD, MAIL, RCPT, DATA pipelined, the
message, "."); it forwards to Postfix's smtp-sink (a process of its own) on
a kept session. `--tree DIR` imports amavisd from DIR (a before).

    .venv/bin/python bench/smtp_worker_profile.py -n 2000 [--plain] [--tree /tmp/before]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("-n", type=int, default=2000)
ap.add_argument("--sort", default="tottime")
ap.add_argument("--top", type=int, default=45)
ap.add_argument("--out", help="save the stats here")
ap.add_argument("--plain", action="store_true", help="no cProfile: CPU a message")
ap.add_argument("--tree", help="import amavisd from this tree")
ap.add_argument("--rounds", type=int, default=1, help="--plain: print this many figures")
args = ap.parse_args()
sys.path.insert(0, args.tree or str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from amavisd import config as configuration  # noqa: E402
from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from amavisd.worker import Worker  # noqa: E402
from bench.daemon_ab import smtp_source_message  # noqa: E402
from bench.worker_profile import report  # noqa: E402


class NoBeat:
    def notify(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expect(sock: socket.socket, lines: int) -> None:
    """Read until `lines` final reply lines came."""
    got = b""
    while got.count(b"\r\n") - got.count(b"-") < lines or not got.endswith(b"\r\n"):
        more = sock.recv(65536)
        if not more:
            raise RuntimeError(f"closed after {got!r}")
        got += more
        finals = sum(1 for line in got.split(b"\r\n") if len(line) > 3 and line[3:4] == b" ")
        if finals >= lines and got.endswith(b"\r\n"):
            return


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="smtp-profile", dir="/tmp"))
    clamd = ClamdInstance(tmp / "c", mode="nodecomp", max_threads=2)
    clamd.start()
    port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "100"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        config = configuration.load(None, {
            "workdir": str(tmp / "home"), "clamd": clamd.address, "backup_scanners": [],
            "log_to": ["stderr"], "admin_notify": [], "metrics_listen": "", "max_requests": 0,
            "quarantine_dir": str(tmp / "q"), "myhostname": "scanner.example.test",
            "forward_method": f"smtp:[127.0.0.1]:{port}", "smtp_listen": ["127.0.0.1:10999"],
            "max_connection_requests": 100000})
        (tmp / "home").mkdir()
        worker = Worker(1, 1, os.getppid(), config, [], heartbeat=NoBeat())
        worker.ensure_dirs()
        from amavisd.pipeline import Pipeline
        worker.pipeline = Pipeline(config)
        worker.pipeline.spill_base = config.work_base_path
        body = smtp_source_message().replace(b"\n", b"\r\n")
        per = 100

        def message(i: int) -> bytes:
            return (b"XFORWARD NAME=localhost ADDR=127.0.0.1 PROTO=ESMTP HELO=localhost\r\n"
                    b"XFORWARD IDENT=4Fq1xZ2Yq%06d SOURCE=LOCAL\r\n"
                    b"MAIL FROM:<bench@example.test> SIZE=%d BODY=8BITMIME\r\n"
                    b"RCPT TO:<sink%d@example.test> ORCPT=rfc822;sink@example.test\r\n"
                    b"DATA\r\n" % (i, len(body), i))

        spent = [0.0]

        def run(n: int, profile: cProfile.Profile | None) -> None:
            for _ in range(n // per):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

                def client(sock=theirs) -> None:
                    with sock:
                        expect(sock, 1)
                        sock.sendall(b"EHLO localhost\r\n")
                        expect(sock, 1)
                        for i in range(per):
                            sock.sendall(message(i))
                            expect(sock, 5)
                            sock.sendall(body + b".\r\n")
                            expect(sock, 1)
                        sock.sendall(b"QUIT\r\n")
                        expect(sock, 1)
                thread = threading.Thread(target=client)
                thread.start()
                if profile:
                    profile.enable()
                began = time.thread_time()
                worker.handle(ours, "smtp")
                spent[0] += time.thread_time() - began
                if profile:
                    profile.disable()
                thread.join()

        import logging
        logging.basicConfig(stream=sys.stderr if os.environ.get("BENCH_LOG")
                            else open(os.devnull, "w"), level=logging.INFO)
        run(200, None)
        if args.plain:
            for _ in range(args.rounds):
                spent[0] = 0.0
                started = time.process_time()
                run(args.n, None)
                print(f"{spent[0] / args.n * 1e3:.3f} ms worker CPU a message (with the client "
                      f"thread {(time.process_time() - started) / args.n * 1e3:.3f})", flush=True)
            return 0
        profile = cProfile.Profile(time.thread_time)
        run(args.n, profile)
        report(profile, args, "a message")
    finally:
        sink.terminate()
        sink.wait()
        clamd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
