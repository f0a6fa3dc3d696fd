"""Whole-message throughput, as ratios against reference points run in the same session.

Speed claims are made against yardsticks measured beside us, on the same
messages and the same private clamd (test signatures, mail/archive decoding
off, DisableCache on so a repeated message is really scanned again). Rows:

- ours: the real daemon (`amavisd run`, workers = concurrency, quarantine on,
  no notifications) asked by raw AM.PDP requests over its Unix socket;
- amavisd-new: Debian's amavisd-new (max_servers = concurrency, virus checks
  only) asked by the same AM.PDP requests;
- raw clamd: zINSTREAM of each whole message, clamd not decoding it: the
  physical floor, since clamd sees the bytes once and finds nothing encoded;
- one process per message: `python -m amavisd scan -c CONF --clamd ADDR FILE`
  run once a message: the interpreter start, imports and pipeline a
  non-daemon design pays for every mail.

At concurrency c, c client threads take the next message from a shared list;
for the AM.PDP rows every message is spooled (tempdir/email.txt, as a real
client does) before the clock starts, and the server removes the spool
(tempdir_removed_by=server, amavisd-new's default). Every reply is checked: a
tempfail, a dropped connection or an unexpected exit status aborts the row
rather than printing a fast wrong number.

Usage (as root, so amavisd-new can run as user amavis):
    .venv/bin/python bench/ampdp_throughput.py [--conc 1,2,4] [-n 300] [--runs 3] [--clamd-temp tmpfs|disk]
        [--warmup 20] [--corpus DIR ...] [--rows ours,amavisd-new,clamd,process]
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amavisd.testing import archivers  # noqa: E402
from amavisd.testing.clamd import ClamdInstance, memory_temp_dir  # noqa: E402
from amavisd.testing.messages import clean_message, eicar_message  # noqa: E402
from amavisd_client.wire.ampdp import Decoder, encode_block  # noqa: E402
from tests.rigs import amavisd_new  # noqa: E402
from tests.rigs.daemon import ROOT, DaemonInstance  # noqa: E402

CORPUS = Path(os.environ.get("AMAVISD_CORPUS", Path(ROOT).parent / "shared" / "corpus"))
CORPUS_SAMPLE = 200
TICK = os.sysconf("SC_CLK_TCK")
ROWS = ("ours", "amavisd-new", "clamd", "process")
TITLES = {"ours": "ours (AM.PDP)", "amavisd-new": "amavisd-new (AM.PDP)",
          "clamd": "raw clamd (INSTREAM)", "process": "one process per message",
          "clamd-whole": "clamd decomposing (INSTREAM, ScanMail+ScanArchive)"}
TIMEOUT = 120.0


class RowError(Exception):
    """A reply that is not a verdict: the row's figures would be meaningless."""


@dataclass
class Message:
    name: str
    data: bytes


# -- the message set ---------------------------------------------------------------


def _mail(subject: str, content_type: str, body: str) -> bytes:
    return (f"From: alice@example.test\nTo: bob@example.test\nSubject: {subject}\n"
            f"Message-ID: <{subject}@example.test>\nMIME-Version: 1.0\n"
            f"Content-Type: {content_type}\n\n{body}").encode()


def _attachment(subject: str, data: bytes, filename: str, mime: str) -> bytes:
    encoded = base64.encodebytes(data).decode()
    return _mail(subject, 'multipart/mixed; boundary="=_b"',
                 "--=_b\nContent-Type: text/plain\n\nThe file you asked for.\n"
                 f'--=_b\nContent-Type: {mime}; name="{filename}"\n'
                 f'Content-Disposition: attachment; filename="{filename}"\n'
                 f"Content-Transfer-Encoding: base64\n\n{encoded}--=_b--\n")


def generated_mix(workdir: Path) -> list[Message]:
    """Six messages made at run time, one a verdict path or decoder each (seeded)."""
    rng = random.Random(5)
    words = "mail scanner virus quota header archive message policy worker".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)) + "\n"
    html = "<html><body>" + "".join(f"<p>{line}</p>" for line in text.splitlines()) + "</body></html>\n"
    pdf = b"%PDF-1.4\n" + rng.randbytes(100 * 1024) + b"\n%%EOF\n"
    mix = [
        Message("gen/plain", clean_message("plain", text)),
        Message("gen/alternative", _mail(
            "alternative", 'multipart/alternative; boundary="=_a"',
            f"--=_a\nContent-Type: text/plain\n\n{text}"
            f"--=_a\nContent-Type: text/html\n\n{html}--=_a--\n")),
        Message("gen/pdf", _attachment("pdf", pdf, "report.pdf", "application/pdf")),
    ]
    if archivers.available("zip") is None:
        files = archivers.mixed_files(count=5, total=50 * 1024, seed=5)
        data = archivers.build("zip", files, workdir)
        mix.append(Message("gen/zip", _attachment("zip", data, "files.zip", "application/zip")))
    inner = clean_message("inner", text).decode()
    mix.append(Message("gen/forwarded", _mail(
        "forwarded", 'multipart/mixed; boundary="=_f"',
        "--=_f\nContent-Type: text/plain\n\nForwarding this.\n"
        f"--=_f\nContent-Type: message/rfc822\n\n{inner}\n--=_f--\n")))
    mix.append(Message("gen/eicar", eicar_message()))
    return mix


def corpus_messages(dirs: list[Path], sample: int | None) -> list[Message]:
    files = sorted(p for d in dirs for p in d.rglob("*") if p.is_file())
    if sample is not None and len(files) > sample:
        files = [files[i * len(files) // sample] for i in range(sample)]
    return [Message(str(p), p.read_bytes()) for p in files]


def message_set(args: argparse.Namespace, workdir: Path) -> tuple[list[Message], str]:
    if args.corpus:
        messages = corpus_messages(args.corpus, None)
        return messages, f"{len(messages)} messages from {', '.join(map(str, args.corpus))}"
    messages = generated_mix(workdir)
    real = CORPUS / "mail" / "real"
    what = f"{len(messages)} generated"
    if real.is_dir():
        sampled = corpus_messages([real], CORPUS_SAMPLE)
        messages += sampled
        what += f" + {len(sampled)} from {real}"
    return messages, what


# -- CPU accounting from /proc ---------------------------------------------------


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    total = sum(values[:8])  # guest time is already inside user
    return total - values[3] - values[4], total


def process_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process (its reaped children included)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(v) for v in fields[11:15])


def tree_ticks(pid: int | None) -> int:
    """CPU ticks of a process and all its live descendants."""
    if pid is None:
        return 0
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += process_ticks(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo += [int(p) for p in fh.read().split()]
    return total


def own_ticks() -> tuple[int, int]:
    """(this process, its reaped children) in ticks."""
    t = os.times()
    return round((t.user + t.system) * TICK), round((t.children_user + t.children_system) * TICK)


# -- rows ----------------------------------------------------------------------------


class Row:
    """One way of getting a verdict for a message; subclasses start a server or not."""

    name = ""

    def start(self, concurrency: int) -> None: ...

    def stop(self) -> None: ...

    def prepare(self, messages: list[Message], tag: str) -> list:
        """Untimed: what `send` gets, one per message."""
        return list(messages)

    def send(self, job) -> str:
        raise NotImplementedError

    def finish(self, jobs: list) -> int:
        """Untimed clean-up after a run; returns spool dirs the server left behind."""
        return 0

    def server_ticks(self) -> int:
        return 0


class AmpdpRow(Row):
    """A daemon asked over AM.PDP; the message is spooled into its temp base first."""

    socket_path = ""
    tempbase = ""
    owner: tuple[int, int] | None = None  # who must own the spool
    daemon = None  # the server under test: DaemonInstance or AmavisdNewInstance

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def server_ticks(self) -> int:
        return tree_ticks(self.daemon.pid if self.daemon else None)

    def prepare(self, messages: list[Message], tag: str) -> list:
        jobs = []
        for n, message in enumerate(messages):
            job = Path(self.tempbase) / f"bench-{tag}-{n:05d}"
            job.mkdir(mode=0o750)
            mail = job / "email.txt"
            mail.write_bytes(message.data)
            if self.owner is not None:
                os.chmod(mail, 0o640)
                os.chown(job, *self.owner)
                os.chown(mail, *self.owner)
            jobs.append(job)
        return jobs

    def send(self, job: Path) -> str:
        attrs = [("request", "AM.PDP"), ("tempdir", str(job)),
                 ("tempdir_removed_by", "server"), ("mail_file", str(job / "email.txt")),
                 ("delivery_care_of", "client"), ("protocol_name", "LOCAL"),
                 ("sender", "<alice@example.test>"), ("recipient", "<bob@example.test>")]
        decoder = Decoder()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(self.socket_path)
            sock.sendall(encode_block(attrs))
            while True:
                data = sock.recv(65536)
                if not data:
                    raise RowError("connection closed without a reply")
                blocks = decoder.feed(data)
                if blocks:
                    break
        reply = blocks[0]
        self.last_reply = reply.get("setreply")  # why, for a caller that shows it
        verdict = reply.get("return_value")
        if reply.errors or verdict in (None, "tempfail"):
            raise RowError(f"return_value={verdict}: {reply.get('setreply')} {reply.errors}")
        return verdict

    def finish(self, jobs: list[Path]) -> int:
        left = [job for job in jobs if job.exists()]
        for job in left:
            shutil.rmtree(job, ignore_errors=True)
        return len(left)


class Ours(AmpdpRow):
    name = "ours"

    def __init__(self, base: Path, clamd: ClamdInstance, workers: int | None = None,
                 **settings):
        self.base, self.clamd, self.daemon = base, clamd, None
        self.workers, self.settings = workers, settings  # workers: None = concurrency

    def start(self, concurrency: int) -> None:
        workers = self.workers or concurrency
        self.daemon = DaemonInstance(
            self.base / f"ours{workers}-{concurrency}-{time.monotonic_ns()}", self.clamd.address,
            workers=workers, log_to=[], admin_notify=[], sender_notify=[], recipient_notify=[],
            notify_method="smtp:[127.0.0.1]:9",  # nothing is sent; were it, port 9 refuses
            **self.settings)
        self.daemon.start()
        self.daemon.wait_for_workers(workers)
        self.socket_path, self.tempbase = self.daemon.socket_path, self.daemon.tempbase


class AmavisdNew(AmpdpRow):
    name = "amavisd-new"

    def __init__(self, base: Path, clamd: ClamdInstance, scan_method: str):
        self.base, self.clamd, self.scan_method, self.daemon = base, clamd, scan_method, None
        user = pwd.getpwnam(amavisd_new.AMAVIS_USER)
        self.owner = (user.pw_uid, user.pw_gid)  # it reads and removes our spool as amavis

    def start(self, concurrency: int) -> None:
        self.daemon = amavisd_new.AmavisdNewInstance(
            self.base / f"new{concurrency}", self.clamd.socket_path, virus_destiny="D_DISCARD",
            max_servers=concurrency, scan_method=self.scan_method)
        self.daemon.start()
        self.socket_path, self.tempbase = str(self.daemon.socket_path), str(self.daemon.tempbase)


class RawClamd(Row):
    """The whole message by zINSTREAM: clamd `nodecomp` is the floor, `full` (name
    clamd-whole) is clamd doing the whole decomposition with its C unpackers."""

    name = "clamd"

    def __init__(self, clamd: ClamdInstance, name: str = "clamd"):
        self.clamd, self.name = clamd, name

    def prepare(self, messages: list[Message], tag: str) -> list:
        return [m.data for m in messages]

    def send(self, data: bytes) -> str:
        reply = self.clamd.scan_bytes(data, timeout=TIMEOUT)
        if reply.endswith(" OK"):
            return "OK"
        if reply.endswith(" FOUND"):
            return "FOUND"
        raise RowError(f"clamd: {reply!r}")


class OneProcess(Row):
    """`amavisd scan FILE` per message; its files are written once, untimed."""

    name = "process"
    EXITS = {0: "clean", 1: "infected/banned", 2: "unchecked"}

    def __init__(self, base: Path, clamd: ClamdInstance, messages: list[Message]):
        self.clamd = clamd
        # its own config, like ours' (no backup scanner), never /etc/amavisd's
        self.config = base / "scan.toml"
        self.config.write_text("[scan]\nbackup_scanners = []\n")
        spool = base / "messages"
        spool.mkdir()
        self.paths = {}
        for n, message in enumerate(messages):
            path = spool / f"{n:05d}.eml"
            path.write_bytes(message.data)
            self.paths[id(message)] = str(path)

    def prepare(self, messages: list[Message], tag: str) -> list:
        return [self.paths[id(m)] for m in messages]

    def send(self, path: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "amavisd", "scan", "-c", str(self.config),
             "--clamd", self.clamd.address, path],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, timeout=TIMEOUT, check=False)
        if proc.returncode not in self.EXITS:
            raise RowError(f"exit {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
        return self.EXITS[proc.returncode]

    def server_ticks(self) -> int:
        return own_ticks()[1]  # the scan processes, reaped by our threads


# -- one timed run -----------------------------------------------------------------


@dataclass
class RunResult:
    rate: float = 0.0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    server_ms: float = 0.0  # CPU per message of the row's own processes
    clamd_ms: float = 0.0
    client_ms: float = 0.0  # CPU per message of this process (the client threads)
    busy: float = 0.0  # % of all CPUs
    others: float = 0.0  # % of all CPUs used by processes not part of this run
    load: float = 0.0
    wall: float = 0.0
    left: int = 0
    verdicts: collections.Counter = field(default_factory=collections.Counter)
    rates: list[float] = field(default_factory=list)  # every run's, for the spread


def drive(row: Row, messages: list[Message], concurrency: int, clamd: ClamdInstance,
          tag: str) -> RunResult:
    """Send every message once, `concurrency` at a time; time it and check every reply.
    CPU is metered on the row's own clamd when it has one (the whole-message one)."""
    clamd = getattr(row, "clamd", None) or clamd
    jobs = row.prepare(messages, tag)
    latencies: list[float] = [0.0] * len(jobs)
    verdicts: collections.Counter = collections.Counter()
    errors: list[str] = []
    lock, failed = threading.Lock(), threading.Event()
    next_job = iter(range(len(jobs)))
    gate = threading.Barrier(concurrency + 1)

    def client() -> None:
        gate.wait()
        while not failed.is_set():
            with lock:
                n = next(next_job, None)
            if n is None:
                return
            started = time.perf_counter()
            try:
                verdict = row.send(jobs[n])
            except Exception as err:  # noqa: BLE001 -- any failure voids the row
                with lock:
                    errors.append(f"{messages[n].name}: {err}")
                failed.set()
                return
            latencies[n] = time.perf_counter() - started
            with lock:
                verdicts[verdict] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    busy0, total0 = machine_jiffies()
    self0, server0, clamd0 = own_ticks()[0], row.server_ticks(), tree_ticks(clamd.pid)
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    busy1, total1 = machine_jiffies()
    self1, server1, clamd1 = own_ticks()[0], row.server_ticks(), tree_ticks(clamd.pid)
    left = row.finish(jobs)
    if errors:
        raise RowError(f"{len(errors)} failed, first: {errors[0]}")
    count = len(jobs)
    cpu = total1 - total0 or 1
    ours = (self1 - self0) + (server1 - server0) + (clamd1 - clamd0)
    ordered = sorted(latencies)
    return RunResult(
        rate=count / wall, p50=statistics.median(ordered) * 1e3,
        p95=ordered[min(count - 1, int(0.95 * count))] * 1e3,
        p99=ordered[min(count - 1, int(0.99 * count))] * 1e3,
        server_ms=(server1 - server0) / TICK / count * 1e3,
        clamd_ms=(clamd1 - clamd0) / TICK / count * 1e3,
        client_ms=(self1 - self0) / TICK / count * 1e3,
        busy=100 * (busy1 - busy0) / cpu, others=max(0.0, 100 * (busy1 - busy0 - ours) / cpu),
        load=os.getloadavg()[0], wall=wall, left=left, verdicts=verdicts)


# -- the session ---------------------------------------------------------------------


def median_result(results: list[RunResult]) -> RunResult:
    def med(attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results)

    merged = RunResult(**{a: med(a) for a in ("rate", "p50", "p95", "p99", "server_ms",
                                              "clamd_ms", "client_ms", "busy", "others",
                                              "load", "wall")})
    merged.rates = [r.rate for r in results]
    for r in results:
        merged.verdicts.update(r.verdicts)
    return merged


def verdict_text(counter: collections.Counter) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counter.items()))


def failures(row: Row, messages: list[Message]) -> tuple[dict[str, str], dict[str, str]]:
    """Untimed: each message once, one at a time; the ones the row cannot answer
    (name -> why), and the verdicts on the others (name -> verdict)."""
    jobs = row.prepare(messages, "vet")
    failed, verdicts = {}, {}
    try:
        for message, job in zip(messages, jobs, strict=True):
            try:
                verdicts[message.name] = row.send(job)
            except (RowError, OSError) as err:
                failed[message.name] = str(err).replace("\n", " ")[:200]
    finally:
        row.finish(jobs)
    return failed, verdicts


def vet(rows: list[Row], messages: list[Message], outcome: dict[str, RunResult | str]
        ) -> list[Message]:
    """Drop the few messages a server cannot answer (e.g. amavisd-new dies on one of
    the real ones) from every row's set, so all rows still see the same mail; a row
    that fails on more than a few is misconfigured and aborted instead."""
    limit = max(2, len(messages) // 50)
    dropped: dict[str, str] = {}
    answers: dict[str, dict[str, str]] = {}
    for row in rows:
        if row.name in outcome or row.name == "process":  # process: 0.2 s a message
            continue
        failed, answers[row.name] = failures(row, messages)
        counts = collections.Counter(answers[row.name].values())
        summary = [verdict_text(counts)] if counts else []
        summary += [f"{len(failed)} failed"] if failed else []
        print(f"- vetting the set, {row.name}: {', '.join(summary)}")
        if len(failed) > limit:
            name, reason = next(iter(failed.items()))
            outcome[row.name] = f"aborted: fails on {len(failed)} of {len(messages)}, " \
                                f"first {name}: {reason}"
            continue
        for name, reason in failed.items():
            print(f"- left out of the set for every row: {name}: {row.name} answers {reason}")
            dropped[name] = reason
    ours, new = answers.get("ours", {}), answers.get("amavisd-new", {})
    for name in sorted(n for n in ours.keys() & new.keys() if ours[n] != new[n]):
        print(f"- verdicts differ on {name}: ours {ours[name]}, amavisd-new {new[name]}")
    kept = [m for m in messages if m.name not in dropped]
    if not kept:
        raise SystemExit("every message was left out of the set")
    return kept


def run_concurrency(rows: list[Row], concurrency: int, args: argparse.Namespace,
                    messages: list[Message], clamd: ClamdInstance, first: bool
                    ) -> tuple[dict[str, RunResult | str], list[Message]]:
    outcome: dict[str, RunResult | str] = {}
    runs: dict[str, list[RunResult]] = collections.defaultdict(list)
    print(f"\n## Concurrency {concurrency}\n")
    try:
        for row in rows:
            try:
                row.start(concurrency)
            except (RuntimeError, OSError) as err:
                outcome[row.name] = f"aborted: {err}".replace("\n", " ")[:400]
        if first:
            messages = vet(rows, messages, outcome)
        sequence = [messages[i % len(messages)] for i in range(args.n)]
        warmup = [messages[i % len(messages)] for i in range(args.warmup)]
        for row in rows:
            if row.name in outcome or not warmup:
                continue
            try:
                drive(row, warmup, concurrency, clamd, f"w{concurrency}")
            except RowError as err:
                outcome[row.name] = f"aborted in warm-up: {err}".replace("\n", " ")[:400]
        for run in range(1, args.runs + 1):  # rows take turns, so drift hits them alike
            for row in rows:
                if row.name in outcome:
                    continue
                try:
                    r = drive(row, sequence, concurrency, clamd, f"c{concurrency}r{run}")
                except RowError as err:
                    outcome[row.name] = f"aborted: {err}".replace("\n", " ")[:400]
                    print(f"- run {run}, {row.name}: {outcome[row.name]}")
                    continue
                runs[row.name].append(r)
                note = f", {r.left} spool dirs left behind" if r.left else ""
                print(f"- run {run}, {row.name}: {args.n} messages in {r.wall:.2f} s, "
                      f"{r.rate:.1f}/s; machine busy {r.busy:.0f} % (others {r.others:.0f} %), "
                      f"bench client {r.client_ms:.2f} ms CPU a message, "
                      f"load {r.load:.2f}{note}", flush=True)
    finally:
        for row in rows:
            row.stop()
    for row in rows:
        if row.name not in outcome:
            outcome[row.name] = median_result(runs[row.name])
    print(f"\nMedian of {args.runs} runs, {args.n} messages each:\n")
    print("| row | msgs/s | p50 ms | p95 ms | CPU ms/msg | clamd CPU ms/msg | busy % "
          "| others % | verdicts, all runs |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|:---|")
    for row in rows:
        r = outcome[row.name]
        if isinstance(r, str):
            print(f"| {TITLES[row.name]} | {r} | | | | | | | |")
            continue
        server = "" if row.name.startswith("clamd") else f"{r.server_ms:.1f}"
        print(f"| {TITLES[row.name]} | {r.rate:.1f} | {r.p50:.1f} | {r.p95:.1f} | {server} "
              f"| {r.clamd_ms:.1f} | {r.busy:.0f} | {r.others:.0f} | {verdict_text(r.verdicts)} |")
    return outcome, messages


def print_ratios(table: dict[int, dict[str, RunResult | str]]) -> None:
    print("\n## Ratios: ours' msgs/s divided by the row's (above 1: ours is faster)\n")
    print("| concurrency | ours / amavisd-new | ours / raw clamd | ours / one process per message |")
    print("|---:|---:|---:|---:|")
    for concurrency, outcome in table.items():
        ours = outcome.get("ours")
        cells = []
        for other in ("amavisd-new", "clamd", "process"):
            r = outcome.get(other)
            ok = isinstance(ours, RunResult) and isinstance(r, RunResult) and r.rate
            cells.append(f"{ours.rate / r.rate:.2f}" if ok else "n/a")
        print(f"| {concurrency} | " + " | ".join(cells) + " |")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conc", default="1,2,4", help="concurrency levels (default 1,2,4)")
    ap.add_argument("-n", type=int, default=300, help="messages a run (default 300)")
    ap.add_argument("--runs", type=int, default=3, help="runs per row; the median is shown")
    ap.add_argument("--warmup", type=int, default=20, help="untimed messages a row first")
    ap.add_argument("--corpus", type=Path, action="append", metavar="DIR",
                    help="use every file under DIR instead of the default mix (repeatable)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    ap.add_argument("--amavisd-new-scan", choices=("CONTSCAN", "INSTREAM"), default="CONTSCAN",
                    help="amavisd-new's clamd entry: Debian's CONTSCAN or its built-in INSTREAM")
    add_clamd_temp(ap)
    args = ap.parse_args()
    args.conc = [int(c) for c in args.conc.split(",")]
    args.rows = [r for r in args.rows.split(",") if r]
    if unknown := set(args.rows) - set(ROWS):
        ap.error(f"unknown rows: {', '.join(sorted(unknown))}")
    return args


def session(args: argparse.Namespace) -> int:
    """Start clamd and the rows' servers, run every concurrency, stop it all."""
    base = Path(tempfile.mkdtemp(prefix="bat", dir="/tmp"))
    base.chmod(0o755)  # amavis must traverse it
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        messages, what = message_set(args, base)
        if not messages:
            print("no messages", file=sys.stderr)
            return 1
        clamd = ClamdInstance(base / "c", mode="nodecomp", max_threads=max(4, *args.conc),
                              temp_dir=clamd_temp_dir(args.clamd_temp, stack))
        stack.callback(clamd.stop)
        clamd.start()
        rows: list[Row] = []
        for name in args.rows:
            if name == "ours":
                rows.append(Ours(base, clamd))
            elif name == "amavisd-new":
                if reason := amavisd_new.skip_reason():
                    print(f"(amavisd-new row skipped: {reason})")
                    continue
                rows.append(AmavisdNew(base, clamd, args.amavisd_new_scan))
            elif name == "clamd":
                rows.append(RawClamd(clamd))
            else:
                rows.append(OneProcess(base, clamd, messages))
        for row in rows:
            stack.callback(row.stop)
        size = sum(len(m.data) for m in messages)
        print(f"# AM.PDP throughput: {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}\n")
        print(f"Messages: {what}; {len(messages)} in all, {size / 1e6:.1f} MB, "
              f"mean {size / len(messages) / 1024:.1f} KiB, cycled for {args.n} a run "
              f"after {args.warmup} untimed. clamd: private, nodecomp, DisableCache, "
              f"temp files on {clamd.temp_dir or '/tmp'}. "
              f"amavisd-new's scanner entry: {args.amavisd_new_scan}.")
        table = {}
        for n, concurrency in enumerate(args.conc):
            table[concurrency], messages = run_concurrency(rows, concurrency, args, messages,
                                                           clamd, first=n == 0)
        print_ratios(table)
    failed = any(isinstance(r, str) for outcome in table.values() for r in outcome.values())
    return 1 if failed else 0


def add_clamd_temp(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--clamd-temp", choices=("tmpfs", "disk"), default="tmpfs",
                    help="clamd's TemporaryDirectory: on /dev/shm (default, as a gateway "
                    "should run it) or clamd's default /tmp")


def clamd_temp_dir(choice: str, stack: contextlib.ExitStack) -> str | None:
    """clamd writes each stream to a temp file and makes a dir per scan: on
    tmpfs that costs half the CPU it costs on ext4, for every row alike."""
    if choice != "tmpfs":
        return None
    path = memory_temp_dir("bench-clamd")
    if path is None:
        print("(no tmpfs at /dev/shm: clamd's temp files stay in /tmp)")
    else:
        stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def interruptible(work: Callable[[], int]) -> int:
    """`work()`'s exit status; INT or TERM unwinds it (so what it started is
    stopped on the way out) and gives 130."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # TERM too: stop what we started either way
        signal.signal(sig, signal.default_int_handler)
    try:
        return work()
    except KeyboardInterrupt:
        print("\ninterrupted; clamd and the daemons were stopped", file=sys.stderr)
        return 130


def main() -> int:
    args = parse_args()
    return interruptible(lambda: session(args))


if __name__ == "__main__":
    sys.exit(main())
