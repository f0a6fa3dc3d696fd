# SPDX-License-Identifier: MIT
"""`make soak`: 20,000 messages through the SMTP content filter while workers
recycle every 200 requests and one is SIGKILLed every 3 s; nothing lost,
nothing delivered twice, memory and descriptors flat, nothing left behind.

    .venv/bin/python -m tests.soak.soak [--messages 20000] [--concurrency 8]
        [--kill-every 3] [--max-requests 200] [--workers 4] [--summary var/soak-summary.md]

A private real clamd (test signatures, no archive or mail decoding, as the
tests run it), the real daemon (tests/rigs/daemon.py) with an SMTP listener
forwarding to a sink in this process, and `--concurrency` sender threads
speaking smtplib as an MTA's content_filter client does: a 4xx or a dropped
connection is retried (counted), a 5xx is a rejection, a 250 a delivery or a
discard (its text says which). Infected and banned mail is rejected
(virus_destiny, banned_destiny = reject) after quarantine.

Real corpus mail is first sent once each with no fault (calibration): the
soak then expects each copy of it to end the same way. The script's name
keeps pytest from collecting it; tests/integration/test_soak_short.py runs
`run()` small. Exits 1 if any check fails; prints the summary as Markdown.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from amavisd.testing import clamd as clamd_testing
from tests.rigs.daemon import ROOT, DaemonInstance, children
from tests.rigs.postfix import free_port, smtp_send
from tests.soak import probe
from tests.soak.mix import Mix, Planned
from tests.soak.report import Outcome, summary
from tests.soak.tally import SlimSink, Tally

RETIRED = re.compile(r"(?m)\bworker \d+ exited$")  # master.reap_workers, status 0
CORPUS = Path(os.environ.get("AMAVISD_CORPUS", Path(ROOT).parent / "shared" / "corpus"))


@dataclass
class Options:
    messages: int = 20000
    concurrency: int = 8
    kill_every: float = 3.0  # seconds; 0 = never
    max_requests: int = 200
    workers: int = 4
    retries: int = 30  # per message, tempfails and dropped connections alike
    corpus: Path | None = field(default_factory=lambda: CORPUS if CORPUS.is_dir() else None)
    progress: bool = False
    keep: bool = False  # leave the daemon's dir (log, quarantine) behind
    strict: bool = False  # a copy made when a worker died before answering fails too


def send_all(port: int, mix: Mix, plans: list[Planned], tally: Tally, opts: Options,
             stop: threading.Event, phase: str) -> None:
    """Send `plans` from `opts.concurrency` threads, each retrying its tempfails."""
    todo = iter(plans)
    lock = threading.Lock()
    started, done = time.monotonic(), [0]

    def sender() -> None:
        while not stop.is_set():
            with lock:
                planned = next(todo, None)
            if planned is None:
                return
            data = mix.build(planned)
            for attempt in range(opts.retries + 1):
                sent = smtp_send(port, "alice@example.test", ["bob@example.test"], data, 120.0)
                if tally.told(planned, sent.code, sent.text) != "tempfail":
                    break
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
            with lock:
                done[0] += 1
                if opts.progress and done[0] % 1000 == 0:
                    rate = done[0] / (time.monotonic() - started)
                    print(f"  {phase}: {done[0]} sent, {rate:.1f} msgs/s", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=sender, name=f"sender-{i}", daemon=True)
               for i in range(opts.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Killer(threading.Thread):
    """SIGKILLs a random worker every `every` seconds; notes every worker it saw,
    and takes the start snapshot once `warm_at` messages were answered (workers
    that served some mail, of every age, as at the end: not fresh forks)."""

    def __init__(self, daemon: DaemonInstance, every: float, tally: Tally, warm_at: int):
        super().__init__(name="killer", daemon=True)
        self.target, self.every = daemon, every
        self.tally, self.warm_at = tally, warm_at
        self.start_snapshot: probe.Snapshot | None = None
        self.stop_event = threading.Event()
        self.killed: list[int] = []
        self.seen: set[int] = set(daemon.worker_pids())
        self.initial = set(self.seen)

    def run(self) -> None:
        rng = random.Random(3)
        next_kill = time.monotonic() + self.every
        while not self.stop_event.wait(0.1):
            pids = self.target.worker_pids()
            self.seen |= pids
            if self.start_snapshot is None and len(self.tally.records) >= self.warm_at:
                self.start_snapshot = probe.snapshot(self.target.pid, pids)
            if self.every and time.monotonic() >= next_kill and pids:
                victim = rng.choice(sorted(pids))
                try:
                    os.kill(victim, signal.SIGKILL)
                    self.killed.append(victim)
                except ProcessLookupError:
                    pass  # it retired on its own a moment ago
                next_kill += self.every


def start_daemon(base: Path, clamd_address: str, sink: SlimSink, opts: Options
                 ) -> tuple[DaemonInstance, int]:
    host, sink_port = sink.address
    for attempt in range(3):  # a free port may be taken before the daemon binds it
        port = free_port()
        daemon = DaemonInstance(
            base / f"d{attempt}", clamd_address, workers=opts.workers,
            smtp_listen=[f"127.0.0.1:{port}"], forward_method=f"smtp:[{host}]:{sink_port}",
            notify_method=f"smtp:[{host}]:{sink_port}", max_requests=opts.max_requests,
            max_requests_jitter=max(1, opts.max_requests // 10),
            virus_destiny="reject", banned_destiny="reject", forward_timeout=30.0,
            child_timeout=60.0)
        try:
            return daemon.start(), port
        except RuntimeError:
            if "cannot bind" not in daemon.log_text() + daemon.stderr_text() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def run(opts: Options, clamd_address: str | None = None, base: Path | None = None) -> Outcome:
    """The whole soak; starts its own clamd unless given one's address."""
    own_base = base is None
    base = Path(tempfile.mkdtemp(prefix="soak", dir="/tmp")) if base is None else base
    base.chmod(0o755)
    clamd = None
    if clamd_address is None:
        reason = clamd_testing.skip_reason()
        if reason:
            raise RuntimeError(reason)
        clamd = clamd_testing.ClamdInstance(base / "clamd", mode="nodecomp").start()
        clamd_address = clamd.address
    try:
        with SlimSink() as sink:
            return _soak(opts, clamd_address, sink, base)
    finally:
        if clamd is not None:
            clamd.stop()
        if own_base and not opts.keep:
            shutil.rmtree(base, ignore_errors=True)


def _soak(opts: Options, clamd_address: str, sink: SlimSink, base: Path) -> Outcome:
    mix = Mix(opts.corpus, opts.messages)
    daemon, port = start_daemon(base, clamd_address, sink, opts)
    stop = threading.Event()
    outcome = Outcome(opts=vars(opts) | {"corpus": str(opts.corpus)})
    try:
        config = daemon.config
        bases = (config.work_base_path, config.tempbase_path)
        # calibration: each corpus file once, no fault
        calibration = Tally()
        started = time.monotonic()
        send_all(port, mix, mix.calibration(), calibration, opts, stop, "calibration")
        outcome.calibration_seconds = time.monotonic() - started
        tally = Tally(expected_real={r.planned.source: r.final
                                     for r in calibration.records.values() if r.final})
        outcome.calibration = calibration.outcomes()
        before = len(sink.messages)
        warm_at = min(opts.messages // 10, opts.workers * opts.max_requests)
        killer = Killer(daemon, opts.kill_every, tally, warm_at)
        killer.start()
        started = time.monotonic()
        send_all(port, mix, mix.plan, tally, opts, stop, "soak")
        outcome.seconds = time.monotonic() - started
        killer.stop_event.set()
        killer.join()
        outcome.start = killer.start_snapshot
        outcome.killed, outcome.workers_seen = len(killer.killed), len(killer.seen)
        outcome.workers_spawned = len(killer.seen - killer.initial)
        time.sleep(1.0)  # the last replies' cleanup, a killed worker's reaping
        daemon.wait_for_workers(opts.workers, timeout=10.0)
        outcome.end = probe.snapshot(daemon.pid, daemon.worker_pids())
        outcome.leftovers_idle = probe.leftovers(*bases)
        outcome.zombies = probe.zombies(daemon.worker_pids)
        log = daemon.log_text()
        outcome.counts, outcome.checks = tally.check(
            sink.messages[before:], daemon.settings["quarantine_dir"], set(killer.killed),
            log, opts.strict)
        outcome.retired = len(RETIRED.findall(log))
        outcome.log_errors = [line for line in log.splitlines()  # our kills aside
                              if (" ERROR " in line or "Traceback" in line)
                              and "killed by SIGKILL" not in line]
        outcome.counts["sink connections dropped mid-message"] = sink.dropped
    finally:
        stop.set()
        master = daemon.pid
        outcome.exit_code = daemon.stop()
    outcome.leftovers_stopped = probe.leftovers(*bases)
    outcome.survivors = probe.survivors(str(daemon.config_path), master)
    outcome.zombies += probe.zombies(lambda: children(os.getpid()), settle=1.0)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--messages", type=int, default=defaults.messages)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--kill-every", type=float, default=defaults.kill_every,
                        help="seconds between two worker SIGKILLs; 0 = none")
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--retries", type=int, default=defaults.retries)
    parser.add_argument("--corpus", type=Path, default=defaults.corpus,
                        help="corpus dir with mail/real/ (default $AMAVISD_CORPUS)")
    parser.add_argument("--summary", type=Path, default=Path(ROOT) / "var" / "soak-summary.md")
    parser.add_argument("--keep", action="store_true",
                        help="keep the daemon's directory (log, quarantine) under /tmp")
    parser.add_argument("--strict", action="store_true",
                        help="fail on a duplicate even where a worker was killed between "
                        "handing the message on (or quarantining it) and answering")
    args = parser.parse_args(argv)
    opts = Options(messages=args.messages, concurrency=args.concurrency,
                   kill_every=args.kill_every, max_requests=args.max_requests,
                   workers=args.workers, retries=args.retries, corpus=args.corpus,
                   progress=True, keep=args.keep, strict=args.strict)
    outcome = run(opts)
    text = summary(outcome)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(text)
    print(text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
