"""Python calls a request inside a worker: cProfile of the
real worker code, driven in-process over a socketpair.

A Worker is built as the master builds one (config, Pipeline, dirs), then
serves AM.PDP connections the harness feeds from a client thread (not
profiled: cProfile follows the thread that enabled it). The message is the
milter's 4 KiB smtp-source mail, asked as the milter asks it.

    .venv/bin/python bench/worker_profile.py -n 2000 [--sort tottime] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amavisd import config as configuration  # noqa: E402
from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from amavisd.worker import Worker  # noqa: E402
from bench import ampdp_throughput as at  # noqa: E402
from bench.daemon_ab import ask, smtp_source_message  # noqa: E402


class NoBeat:
    def notify(self) -> None:
        pass


def report(profile: cProfile.Profile, args: argparse.Namespace, each: str) -> None:
    """Python calls `each` (of args.n), the stats to args.out if given, the
    top args.top functions by args.sort."""
    stats = pstats.Stats(profile)
    total = sum(v[1] for v in stats.stats.values())  # primitive + recursive calls
    print(f"{total / args.n:.0f} Python function calls {each}")
    if args.out:
        stats.dump_stats(args.out)
    stats.sort_stats(args.sort).print_stats(args.top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", help="save the stats here")
    ap.add_argument("--plain", action="store_true",
                    help="no cProfile (for py-spy or perf from outside)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="worker-profile", dir="/tmp"))
    clamd = ClamdInstance(tmp / "c", mode="nodecomp", max_threads=2)
    clamd.start()
    try:
        config = configuration.load(None, {
            "workdir": str(tmp / "home"), "clamd": clamd.address, "backup_scanners": [],
            "log_to": ["stderr"], "admin_notify": [], "metrics_listen": "", "max_requests": 0,
            "quarantine_dir": str(tmp / "q"), "myhostname": "scanner.example.test"})
        (tmp / "home").mkdir()
        worker = Worker(1, 1, os.getppid(), config, [], heartbeat=NoBeat())
        worker.ensure_dirs()
        from amavisd.pipeline import Pipeline
        worker.pipeline = Pipeline(config)
        worker.pipeline.spill_base = config.work_base_path
        spool = Path(tempfile.mkdtemp(dir=config.tempbase_path))
        (spool / "email.txt").write_bytes(smtp_source_message())
        attrs = [("request", "AM.PDP"), ("sender", "<bench@example.test>"),
                 ("recipient", "<sink@example.test>"), ("tempdir", str(spool)),
                 ("tempdir_removed_by", "client"), ("mail_file", str(spool / "email.txt")),
                 ("delivery_care_of", "client"), ("queue_id", "4Fq1xZ2Yq3z9sWr"),
                 ("client_address", "127.0.0.1"), ("client_name", "localhost"),
                 ("helo_name", "localhost"), ("protocol_name", "ESMTP")]
        per = 100

        def run(n: int, profile: cProfile.Profile | None) -> None:
            for _ in range(n // per):
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

                def client(sock=theirs) -> None:
                    with sock:
                        for _ in range(per):
                            ask(sock, attrs)
                thread = threading.Thread(target=client)
                thread.start()
                if profile:
                    profile.enable()
                worker.handle(ours, "ampdp")
                if profile:
                    profile.disable()
                thread.join()

        import logging
        logging.basicConfig(stream=sys.stderr if os.environ.get("BENCH_LOG") else open(os.devnull, "w"), level=logging.INFO)
        run(200, None)
        if args.plain:
            started, before = time.process_time(), os.times()
            run(args.n, None)
            after = os.times()
            print(f"{(time.process_time() - started) / args.n * 1e3:.3f} ms CPU a request "
                  f"(the client thread's included; user {(after.user - before.user) / args.n * 1e3:.3f}"
                  f", system {(after.system - before.system) / args.n * 1e3:.3f})")
            return 0
        profile = cProfile.Profile()
        run(args.n, profile)
        report(profile, args, "a request")
    finally:
        clamd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(at.interruptible(main))
