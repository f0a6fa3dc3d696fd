"""Memory of the daemon: what master and workers hold, and what one message costs.

Two measurements, both on the real daemon over AM.PDP:

- footprint: RSS and PSS (from /proc/PID/smaps_rollup) of the master and each
  worker after a warm-up, at 4 workers. PSS divides shared pages among their
  sharers, so it is what a worker really adds; the target is under 30 MiB.
- ladder: one worker; before each message its peak RSS is reset (`5` to
  /proc/PID/clear_refs, root only) and afterwards VmHWM - VmHWM-after-reset is that
  message's cost. The target is at most 2x the message's size whatever its
  shape, and linear time: sizes 10 KB .. 50 MB (an attachment and short text
  lines), part counts 1 .. 1000.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import corpus
from ampdp_throughput import Message, Ours

KIB = 1024


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss and Pss of one process in KiB."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0])
    return values


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def footprint(row: Ours, warmup: list[Message]) -> list[dict]:
    """Rows of (process, RSS MiB, PSS MiB) after the warm-up messages went through."""
    for job in row.prepare(warmup, "mem"):
        row.send(job)
    daemon = row.daemon
    out = [{"process": "master", **smaps_rollup(daemon.pid)}]
    for n, pid in enumerate(sorted(daemon.worker_pids()), 1):
        out.append({"process": f"worker {n}", **smaps_rollup(pid)})
    return out


@dataclass
class Step:
    shape: str
    size: int  # message bytes
    growth_kib: int  # peak RSS over the RSS before
    ms: float
    verdict: str

    @property
    def ratio(self) -> float:
        return self.growth_kib * KIB / self.size


def _only_worker(row: Ours) -> int:
    pids = row.daemon.worker_pids()
    if len(pids) != 1:
        raise RuntimeError(f"expected one worker, found {sorted(pids)}")
    return next(iter(pids))


def measure(row: Ours, shape: str, data: bytes) -> Step:
    """One message through the single worker; its peak-RSS growth and latency."""
    pid = _only_worker(row)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib(pid, "VmHWM")
    (job,) = row.prepare([Message(shape, data)], f"{shape}-{len(data)}")
    started = time.perf_counter()
    try:
        verdict = row.send(job)
        if verdict != "continue":  # clean mail: say why not
            verdict = f"{verdict}: {row.last_reply}"[:120]
    except Exception as err:  # noqa: BLE001 -- reported in the table, not fatal
        verdict = f"failed: {err}"[:120]
    ms = (time.perf_counter() - started) * 1e3
    row.finish([job])
    if _only_worker(row) != pid:
        raise RuntimeError(f"the worker changed while it held {shape} {len(data)} B")
    # the kernel's RSS counters are batched per CPU: a few hundred KiB either way is
    # noise, and a peak below the start is zero
    return Step(shape, len(data), max(0, status_kib(pid, "VmHWM") - before), ms, verdict)


def ladder(row: Ours, sizes: list[int], parts: list[int]) -> list[Step]:
    """Attachments and short-line texts of each size, then each part count."""
    steps = []
    for size in sizes:
        steps.append(measure(row, "attachment", corpus.sized_attachment(size)))
        steps.append(measure(row, "short lines", corpus.sized_text(size)))
    for count in parts:
        steps.append(measure(row, f"{count} parts", corpus.many_parts(count)))
    return steps
