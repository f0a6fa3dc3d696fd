"""Benchmark: decomposition cost on a corpus of real messages (no scanner).

Reports CPU seconds for the whole set, per-message mean/p50/p99/max, parts
found, and the flags and UNCHECKED reasons seen, once without and once with
libmagic naming every part. Not a test: it asserts nothing.

    .venv/bin/python bench/decompose_corpus.py [DIR ...]   (default: the shared corpus mail/real)
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
from pathlib import Path

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits

DEFAULT = Path(os.environ.get("AMAVISD_CORPUS", Path(__file__).resolve().parents[2]
                              / "shared" / "corpus")) / "mail" / "real"


def run(files: list[Path], use_magic: bool) -> dict:
    times, parts = [], 0
    flags: collections.Counter = collections.Counter()
    unchecked = 0
    cpu = time.process_time()
    for path in files:
        raw = path.read_bytes()
        start = time.perf_counter()
        dec = decompose(raw, Limits(), use_magic=use_magic)
        times.append(time.perf_counter() - start)
        for part in dec.root.walk():
            parts += 1
            flags.update(part.flags - {"expanded"})
        unchecked += bool(dec.unchecked)
        dec.cleanup()
    times.sort()
    return {"cpu": time.process_time() - cpu, "times": times, "parts": parts,
            "flags": flags, "unchecked": unchecked}


def main() -> int:
    dirs = [Path(a) for a in sys.argv[1:]] or [DEFAULT]
    files = sorted(p for d in dirs for p in d.rglob("*") if p.is_file())
    if not files:
        print(f"no messages under {dirs}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in files)
    print(f"{len(files)} messages, {size / 1e6:.1f} MB\n")
    print("| libmagic | CPU s (all) | mean ms | p50 ms | p99 ms | max ms | parts | unchecked |")
    print("|---|---|---|---|---|---|---|---|")
    for use_magic in (False, True):
        r = run(files, use_magic)
        t = r["times"]
        print(f"| {'yes' if use_magic else 'no'} | {r['cpu']:.2f} | "
              f"{statistics.mean(t) * 1e3:.2f} | {t[len(t) // 2] * 1e3:.2f} | "
              f"{t[int(len(t) * 0.99)] * 1e3:.2f} | {t[-1] * 1e3:.1f} | {r['parts']} | "
              f"{r['unchecked']} |")
    print(f"\nflags seen: {dict(r['flags'].most_common())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
