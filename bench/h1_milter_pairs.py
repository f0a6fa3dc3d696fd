"""bench/milter_throughput.py with each run's CPU shown, row against row (H1, session 25).

The bench prints medians; on a VM whose speed drifts a before/after needs the
pairs: run k of `baseline` against run k of `ours` (rows alternate in a run).
Same arguments as the bench; prints, per run, milter CPU ms/msg, the chain's
CPU ms/msg and their ratios ours/baseline.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import milter_throughput as bench  # noqa: E402

_print_split = bench.print_split


def print_split(args, rows: list[str]) -> None:
    _print_split(args, rows)
    if not {"baseline", "ours"} <= set(rows):
        return
    per = {}
    for row in ("baseline", "ours"):
        classes = {what for r, what in args.split if r == row}
        runs = len(args.split[row, "milter"])
        chain = [sum(args.split[row, what][k] for what in classes) for k in range(runs)]
        per[row] = ([s * 1000 / args.n for s in args.split[row, "milter"]],
                    [s * 1000 / args.n for s in chain])
    print("\n| run | milter base | milter ours | ratio | chain base | chain ours | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ratios = ([], [])
    for k, (mb, mo, cb, co) in enumerate(zip(per["baseline"][0], per["ours"][0],
                                             per["baseline"][1], per["ours"][1], strict=True)):
        ratios[0].append(mo / mb)
        ratios[1].append(co / cb)
        print(f"| {k + 1} | {mb:.3f} | {mo:.3f} | {mo / mb:.3f} | {cb:.2f} | {co:.2f} "
              f"| {co / cb:.3f} |")
    print(f"| median | | | {statistics.median(ratios[0]):.3f} | | | "
          f"{statistics.median(ratios[1]):.3f} |")


bench.print_split = print_split
sys.exit(bench.main())
