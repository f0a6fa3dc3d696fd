"""Memory of the daemon: what master and workers hold, and what one message costs.

Two measurements, both on the real daemon over AM.PDP:

- footprint: RSS and PSS (from /proc/PID/smaps_rollup) of the master and each
  worker after a warm-up, at 4 workers. PSS divides shared pages among their
  sharers, so it is what a worker really adds; the target is under 30 MiB.
- ladder: one worker; before each message its peak RSS is reset (`5` to
  /proc/PID/clear_refs, root only) and afterwards VmHWM - VmHWM-after-reset is that
  message's cost. The target is at most 2x the message's size whatever its
  shape, and linear time: sizes 10 KB .. 50 MB (an attachment and short text
  lines), part counts 1 .. 1000; with `--shapes`, every shape of
  tests/rigs/shapes.py (QP, uuencode, archives in attachments, a forwarded
  message, ...) at each size.

    .venv/bin/python bench/memory.py [--sizes 1,5,10,50] [--shapes all|attachment,...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run alone: the bench's modules and the project's
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import corpus  # noqa: E402
from ampdp_throughput import Message, Ours  # noqa: E402

from tests.rigs import shapes as message_shapes  # noqa: E402

TARGET = 2.0  # growth / message size

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
    nominal: int = 0  # the size asked for (shapes come out a few percent off it)

    @property
    def ratio(self) -> float:
        return self.growth_kib * KIB / self.size

    @property
    def over(self) -> bool:
        return self.ratio > TARGET


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
    tag = f"{shape}-{len(data)}".replace("/", "-").replace(" ", "-")  # a directory name
    (job,) = row.prepare([Message(shape, data)], tag)
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


def ladder(row: Ours, sizes: list[int], parts: list[int],
           shapes: list[str] | None = None) -> list[Step]:
    """Attachments and short-line texts of each size (or each of `shapes`),
    then each part count."""
    steps = []
    for size in sizes:
        if shapes is None:
            steps.append(measure(row, "attachment", corpus.sized_attachment(size)))
            steps.append(measure(row, "short lines", corpus.sized_text(size)))
            continue
        for shape in shapes:
            step = measure(row, shape, message_shapes.SHAPES[shape](size))
            step.nominal = size
            steps.append(step)
    for count in parts:
        steps.append(measure(row, f"{count} parts", corpus.many_parts(count)))
    return steps


def table(steps: list[Step]) -> list[str]:
    """Markdown: one row a shape, growth / size at each size, over TARGET flagged."""
    sizes = sorted({s.nominal or s.size for s in steps if not s.shape.endswith(" parts")})
    by_shape: dict[str, dict[int, Step]] = {}
    for step in steps:
        by_shape.setdefault(step.shape, {})[step.nominal or step.size] = step
    lines = ["| shape | " + " | ".join(f"~{size / 1e6:g} MB" for size in sizes) + " |",
             "|:---|" + "---:|" * len(sizes)]
    for shape, row in by_shape.items():
        cells = []
        for size in sizes:
            step = row.get(size)
            if step is None:
                cells.append("")
                continue
            flag = " **over**" if step.over else ""
            bad = "" if step.verdict == "continue" else f" ({step.verdict[:40]})"
            cells.append(f"+{step.growth_kib / 1024:.1f} MiB {step.ratio:.2f}x{flag}{bad}")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    over = [f"{s.shape} {(s.nominal or s.size) / 1e6:g} MB" for s in steps if s.over]
    lines += ["", f"Target: growth <= {TARGET:g} x the message. Over: {', '.join(over) or 'none'}."]
    return lines


def main() -> int:
    from amavisd.testing.clamd import ClamdInstance

    ap = argparse.ArgumentParser(description="peak-RSS growth per message shape and size")
    ap.add_argument("--sizes", default="1,5,10,50", help="message sizes in MB")
    ap.add_argument("--shapes", default="all", help=f"all, or of {list(message_shapes.SHAPES)}")
    args = ap.parse_args()
    shapes = list(message_shapes.SHAPES) if args.shapes == "all" else args.shapes.split(",")
    sizes = [int(float(mb) * 1e6) for mb in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="mem", dir="/tmp"))
    base.chmod(0o755)
    clamd = ClamdInstance(base / "cn", mode="nodecomp").start()
    row = Ours(base / "one", clamd, clamd_max_stream=100 * 1024 * 1024)
    (base / "one").mkdir()
    try:
        row.start(1)
        steps = ladder(row, sizes, [], shapes)
    finally:
        row.stop()
        clamd.stop()
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(table(steps)))
    return 1 if any(s.over for s in steps) else 0


if __name__ == "__main__":
    raise SystemExit(main())
