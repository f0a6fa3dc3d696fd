"""Where the daemon's time goes at c=4, and why more clients than cores cost throughput.

Two measurements on the `make bench` mix (bench/corpus.py) over AM.PDP:

- a matrix of workers x client concurrency (and clamd's MaxThreads), msgs/s,
  p95 and CPU per message of ours and of clamd: the c=4 < c=2 question is
  whether workers beyond the cores, clamd's threads or the client threads
  compete for the two CPUs;
- py-spy attached to the master and every worker (`--subprocesses`; it
  pauses a process to read a whole stack, `--nonblocking` does not, but then
  stacks may be torn) during a c=4 run: an SVG
  flame graph in bench/profiles/ and the collapsed stacks, summed here into
  the functions with the most samples (self and inclusive).

Usage (root: py-spy reads the daemon's memory):
    .venv/bin/python bench/profile_daemon.py [--matrix] [--flame] [--seconds 10] [-n 300]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import corpus  # noqa: E402
from ampdp_throughput import Ours, RowError, drive  # noqa: E402

from amavisd.testing.clamd import ClamdInstance  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
PROFILES = HERE / "profiles"
EXTRA: list[str] = []  # --nonblocking: do not pause the daemon (stacks may be torn)


def matrix(base: Path, mix: list, n: int, runs: int) -> list[str]:
    """msgs/s by workers, client threads and clamd threads."""
    lines = ["| workers | clients c | clamd threads | msgs/s | p95 ms | ours CPU ms/msg "
             "| clamd CPU ms/msg | client CPU ms/msg | busy % | others % |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sequence = [mix[i % len(mix)] for i in range(n)]
    for threads in (4, 2):
        with ClamdInstance(base / f"clamd{threads}", mode="nodecomp",
                           max_threads=threads) as clamd:
            for workers in (1, 2, 4):
                row = Ours(base, clamd, workers=workers)
                row.start(workers)
                try:
                    drive(row, sequence[:40], workers, clamd, "warm")
                    for c in (1, 2, 4, 8):
                        if threads == 2 and c != 4:
                            continue  # clamd threads only matter under load
                        rs = sorted((drive(row, sequence, c, clamd, f"m{workers}{c}{k}")
                                     for k in range(runs)), key=lambda r: r.rate)
                        r = rs[len(rs) // 2]
                        lines.append(f"| {workers} | {c} | {threads} | {r.rate:.0f} | "
                                     f"{r.p95:.1f} | {r.server_ms:.2f} | {r.clamd_ms:.2f} | "
                                     f"{r.client_ms:.2f} | {r.busy:.0f} | {r.others:.0f} |")
                        print(lines[-1], flush=True)
                finally:
                    row.stop()
    return lines


def record(pid: int, seconds: float, out: Path, fmt: str) -> subprocess.Popen:
    return subprocess.Popen([PY_SPY, "record", "--pid", str(pid), "--subprocesses",
                             *EXTRA, "--rate", "200", "--duration", str(round(seconds)),
                             "--format", fmt, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def flame(base: Path, mix: list, seconds: float, tag: str) -> list[str]:
    """Record the daemon at c=4 (4 workers): SVG and collapsed stacks; summarise."""
    PROFILES.mkdir(exist_ok=True)
    svg, raw = PROFILES / f"{tag}.svg", PROFILES / f"{tag}.txt"
    with ClamdInstance(base / "clamdf", mode="nodecomp", max_threads=4) as clamd:
        row = Ours(base, clamd)
        row.start(4)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    drive(row, mix * 3, 4, clamd, f"f{time.monotonic_ns()}")
                except RowError:
                    if not stop.is_set():  # a failure under load, not the end of the run
                        raise

        try:
            drive(row, mix, 4, clamd, "fwarm")
            thread = threading.Thread(target=load, daemon=True)
            thread.start()
            for path, fmt in ((raw, "raw"), (svg, "flamegraph")):
                spy = record(row.daemon.pid, seconds, path, fmt)
                _, err = spy.communicate(timeout=seconds + 60)
                print(f"- py-spy {fmt}: {path}", flush=True)
                if spy.returncode:
                    raise RuntimeError(f"py-spy: {err.decode()[-400:]}")
            stop.set()
            thread.join(120)
        finally:
            stop.set()
            row.stop()
    return summarise(raw)


FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def _frame(text: str) -> str:
    m = FRAME.match(text)
    if not m:
        return text
    path = m.group(2)
    with contextlib.suppress(ValueError):
        path = path[path.index("amavis"):]
    return f"{m.group(1)} ({path.rsplit('site-packages/', 1)[-1]})"


def summarise(raw: Path, top: int = 25) -> list[str]:
    """The functions with most samples, self and inclusive, from py-spy's raw output."""
    own, inclusive = collections.Counter(), collections.Counter()
    roles, total = collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        roles["master" if "amavisd run" in frames[0] and "worker" not in stack
              else "worker"] += n
        names = [_frame(f) for f in frames[1:] if not f.startswith(("process ", "thread "))]
        if names:
            own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    lines = [f"{total} samples ({', '.join(f'{k} {v}' for k, v in roles.items())}).", "",
             "| function | self % | inclusive % |", "|:---|---:|---:|"]
    keys = [k for k, _ in own.most_common(top)]
    keys += [k for k, _ in inclusive.most_common(top) if k not in keys][: top // 2]
    for key in keys:
        lines.append(f"| `{key}` | {100 * own[key] / total:.1f} | "
                     f"{100 * inclusive[key] / total:.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", action="store_true", help="workers x c x clamd threads")
    ap.add_argument("--flame", action="store_true", help="py-spy flame graph at c=4")
    ap.add_argument("--seconds", type=float, default=10.0, help="py-spy recording time")
    ap.add_argument("-n", type=int, default=300, help="messages a matrix cell")
    ap.add_argument("--runs", type=int, default=3, help="runs a matrix cell (median)")
    ap.add_argument("--nonblocking", action="store_true", help="py-spy --nonblocking")
    ap.add_argument("--gil", action="store_true",
                    help="py-spy --gil: only samples holding the GIL (Python's own CPU)")
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d") + "-c4")
    args = ap.parse_args()
    EXTRA.extend(flag for flag, on in (("--nonblocking", args.nonblocking),
                                        ("--gil", args.gil)) if on)
    if not (args.matrix or args.flame):
        args.matrix = args.flame = True
    base = Path(tempfile.mkdtemp(prefix="benchp", dir="/tmp"))
    try:
        mix, _ = corpus.synthetic(base)
        real = corpus.real(None)
        mix += real[:: max(1, len(real) // 200)]
        if args.matrix:
            print("\n".join(matrix(base, mix, args.n, args.runs)))
        if args.flame:
            print("\n".join(flame(base, mix, args.seconds, args.tag)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
