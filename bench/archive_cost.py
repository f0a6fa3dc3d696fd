"""Per-format decoding cost: what `decompose(bare_file=True)` pays for one
archive made by the real archiver, next to the plain external extraction of
the same archive, boxed (`external.run_tool` + `members.harvest`, what a
tool-based decoder pays) and bare (the tool alone, no box).

Each fixture holds 10 members, about 1 MiB, half text and half random bytes
(`archivers.mixed_files`); a single-stream compressor holds their
concatenation. Prints a Markdown table of medians over --runs runs. The
decoders expose no in-process/external switch: their docstrings carry their
own comparisons; this gives the same yardstick to every format.

    .venv/bin/python bench/archive_cost.py [--runs N] [FORMAT ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from amavisd.decode.archives.members import harvest
from amavisd.decode.engine import decompose
from amavisd.decode.external import input_path, run_tool
from amavisd.decode.limits import Limits
from amavisd.decode.registry import Context
from amavisd.testing import archivers

IN, OUT = "{in}", "{out}"
# format -> argv of a usual extractor; IN is the archive, OUT the output dir
# (the cwd too). For a compressor IN lies in OUT and is replaced by its output.
EXTRACTORS: dict[str, list[str]] = {
    "zip": ["unzip", "-q", IN, "-d", OUT],
    "7z": ["7zz", "x", "-y", "-bd", f"-o{OUT}", IN],
    "tar": ["tar", "-xf", IN, "-C", OUT],
    "tgz": ["tar", "-xzf", IN, "-C", OUT],
    "tar.bz2": ["tar", "-xjf", IN, "-C", OUT],
    "tar.xz": ["tar", "-xJf", IN, "-C", OUT],
    "gz": ["gzip", "-d", IN],
    "bz2": ["bzip2", "-d", IN],
    "xz": ["xz", "-d", IN],
    "lzma": ["xz", "--format=lzma", "-d", IN],
    "zst": ["zstd", "-d", "-q", "--rm", IN],
    "lz4": ["lz4", "-d", "-q", "--rm", IN, f"{OUT}/input"],
    "lz": ["lzip", "-d", IN],
    "Z": ["compress", "-d", IN],
    "arj": ["7zz", "x", "-y", "-bd", f"-o{OUT}", IN],
    "lha": ["lhasa", "xqf", IN],  # not `lha`: jlha-utils (Java) may own that alternative
    "arc": ["nomarch", IN],
    "cab": ["cabextract", "-q", "-d", OUT, IN],
    "cpio": ["cpio", "-idm", "--quiet", "-F", IN],
    "ar": ["ar", "x", IN],
    "deb": ["dpkg-deb", "-x", IN, OUT],
    "rpm": ["bsdtar", "-xf", IN, "-C", OUT],
    "iso": ["7zz", "x", "-y", "-bd", f"-o{OUT}", IN],
}


def fixture(fmt: str, workdir: Path) -> bytes:
    files = archivers.mixed_files(10, 1 << 20)
    if fmt in archivers.SINGLE_STREAM:
        files = {"mixed.bin": b"".join(files.values())}
    return archivers.build(fmt, files, workdir)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def time_decompose(data: bytes, tempbase: str, runs: int) -> tuple[float, int, int]:
    result = decompose(data, tempbase=tempbase, bare_file=True)
    leaves = [p for p in result.root.walk() if not p.children]
    parts, out = len(leaves), sum(p.size for p in leaves)
    result.cleanup()

    def once() -> None:
        decompose(data, tempbase=tempbase, bare_file=True).cleanup()

    return median_ms(once, runs), parts, out


def argv_for(fmt: str, source: str, out: str) -> list[str]:
    return [a.replace(IN, source).replace(OUT, out) for a in EXTRACTORS[fmt]]


def place_input(fmt: str, data: bytes, work: str, out: str) -> str:
    """Where the tool reads the archive: beside its output for a compressor."""
    name = f"input.{archivers.EXTENSIONS[fmt]}"
    path = os.path.join(out if fmt in archivers.SINGLE_STREAM else work, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def time_boxed(fmt: str, data: bytes, tempbase: str, runs: int) -> float:
    def once() -> None:
        ctx = Context(Limits(), len(data), tempbase)
        part = ctx.new_part(data)
        work = ctx.scratch_dir(part)
        out = os.path.join(work, "out")
        os.mkdir(out, 0o700)
        source = place_input(fmt, data, work, out) if fmt in archivers.SINGLE_STREAM \
            else input_path(ctx, part, work, f"input.{archivers.EXTENSIONS[fmt]}")
        result = run_tool(ctx, argv_for(fmt, source, out), cwd=out, watch=out)
        if result.returncode:
            raise RuntimeError(f"{fmt}: {result.text[-300:]}")
        harvest(ctx, part, out)
        ctx.cleanup()

    return median_ms(once, runs)


def time_bare(fmt: str, data: bytes, tempbase: str, runs: int) -> float:
    def once() -> None:
        work = tempfile.mkdtemp(dir=tempbase)
        out = os.path.join(work, "out")
        os.mkdir(out)
        source = place_input(fmt, data, work, out)
        subprocess.run(argv_for(fmt, source, out), cwd=out, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        shutil.rmtree(work)

    return median_ms(once, runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("formats", nargs="*", help="default: every buildable format")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    formats = args.formats or list(archivers.BUILDERS)
    print("| format | archive | leaves | out | decompose ms | tool (boxed + harvest) ms "
          "| tool bare ms | tool |")
    print("|:---|---:|---:|---:|---:|---:|---:|:---|")
    with tempfile.TemporaryDirectory(prefix="ambench") as tmp:
        for fmt in formats:
            reason = archivers.available(fmt)
            tool = EXTRACTORS[fmt][0]
            if reason or shutil.which(tool) is None:
                print(f"| {fmt} | skipped: {reason or tool + ' not installed'} |||||||")
                continue
            data = fixture(fmt, Path(tmp))
            decoded, parts, out = time_decompose(data, tmp, args.runs)
            boxed = time_boxed(fmt, data, tmp, args.runs)
            bare = time_bare(fmt, data, tmp, args.runs)
            print(f"| {fmt} | {len(data) / 1024:.0f} KiB | {parts} | {out / 1024:.0f} KiB "
                  f"| {decoded:.1f} | {boxed:.1f} | {bare:.1f} | `{tool}` |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
