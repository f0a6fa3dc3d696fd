"""`make bench`: every ingress at every concurrency against amavisd-new and clamd, one run.

One command, unattended: it builds the seeded message set (bench/corpus.py),
starts one private clamd for every daemon row (`nodecomp`) and a second one
decomposing itself (`full`, the C-unpacker yardstick), and measures

- AM.PDP: ours, amavisd-new, clamd-whole, raw clamd (ampdp_throughput rows);
- SMTP content filter: Postfix -> ours / amavisd-new -> Postfix -> sink;
- milter: Postfix + our amavisd-milter + ours vs Postfix + Debian's C
  amavisd-milter + amavisd-new;
- latency at c=1 on the real-mail corpus, amavisd-client's round trip, the
  memory of master and workers, and a message's cost by size and part count;

at c = 1, 2, 4, 8 (`--quick`: c = 1, 4, one run, fewer messages), and writes
Markdown tables and PNG plots to bench/results/. A part that cannot run here
is skipped with its reason; a section that fails is reported as failed and
makes the exit status 1, the others still run.

Usage (as root: amavisd-new, Postfix, the daemon's users):
    .venv/bin/python bench/run.py [--quick] [--sections ampdp,smtp,milter,single,memory]
        [--conc 1,2,4,8] [--runs 3] [--clamd-temp tmpfs|disk] [--write-readme]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import corpus  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402
import sections  # noqa: E402
from ampdp_throughput import add_clamd_temp, clamd_temp_dir, interruptible  # noqa: E402

from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from amavisd.testing.clamd import skip_reason as clamd_skip_reason  # noqa: E402

SECTIONS = ("ampdp", "smtp", "milter", "single", "memory")
MB = 1_000_000


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: c=1,4, one run, ~3 min")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    ap.add_argument("--conc", help="concurrencies (default 1,2,4,8; quick 1,4)")
    ap.add_argument("--runs", type=int, help="runs a row, medians shown (default 3; quick 1)")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="output folder")
    ap.add_argument("--write-readme", action="store_true",
                    help="also fill the README's Performance section from this run")
    ap.add_argument("--readme", type=Path, default=HERE.parent / "README.md",
                    help="the README --write-readme fills (default the project's)")
    add_clamd_temp(ap)
    args = ap.parse_args()
    q = args.quick
    args.conc = [int(c) for c in (args.conc or ("1,4" if q else "1,2,4,8")).split(",")]
    args.runs = args.runs or (1 if q else 3)
    args.sections = [s for s in args.sections.split(",") if s]
    if unknown := set(args.sections) - set(SECTIONS):
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def session(args: argparse.Namespace, base: Path, stack: contextlib.ExitStack
            ) -> sections.Session:
    q = args.quick
    mix, missing = corpus.synthetic(base)
    real = corpus.real(None)
    sample = real[:: max(1, len(real) // (60 if q else 200))]
    temp = clamd_temp_dir(args.clamd_temp, stack)  # one choice for both: same conditions
    clamd = ClamdInstance(base / "cn", mode="nodecomp", max_threads=max(4, *args.conc),
                          temp_dir=temp)
    whole = ClamdInstance(base / "cf", mode="full", max_threads=max(4, *args.conc),
                          temp_dir=temp)
    for instance in (clamd, whole):
        stack.callback(instance.stop)
        instance.start()
    s = sections.Session(
        base=base, clamd=clamd, clamd_whole=whole, mix=mix + sample,
        real=real[:: 4] if q else real, conc=args.conc, runs=args.runs,
        n=120 if q else 400, mta_n=100 if q else 300,
        sizes=[10_000, 100_000, MB, 5 * MB] if q else [10_000, 100_000, MB, 10 * MB, 50 * MB],
        parts=[1, 10, 100] if q else [1, 10, 100, 1000])
    s.notes += [f"synthetic kind not made: {m}" for m in missing]
    s.notes.append(f"both clamds write their temp files to {temp or '/tmp'}"
                   + (" (tmpfs)" if temp else " (clamd's default)"))
    s.notes.append(f"mix: {len(mix)} synthetic + {len(sample)} of {len(real)} real messages "
                   f"({corpus.CORPUS / 'mail' / 'real'}); latency on {len(s.real)} real")
    return s


def run(args: argparse.Namespace) -> int:
    if reason := clamd_skip_reason():
        raise SystemExit(f"bench: cannot run: {reason}")
    started = time.time()
    base = Path(tempfile.mkdtemp(prefix="bench", dir="/tmp"))
    base.chmod(0o755)  # amavis must traverse it
    results: dict = {}
    failed = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        s = session(args, base, stack)
        for name in args.sections:
            print(f"\n# section {name}\n", flush=True)
            t0 = time.monotonic()
            try:
                results[name] = getattr(sections, {"single": "single_worker",
                                                   "memory": "footprint"}.get(name, name))(s)
            except sections.Skip as why:
                results[name] = f"skipped: {why}"
            except Exception as err:  # noqa: BLE001 -- one section failing must not hide the rest
                traceback.print_exc()
                results[name] = f"**failed**: {type(err).__name__}: {err}"[:500]
                failed.append(name)
            print(f"(section {name}: {time.monotonic() - t0:.0f} s)", flush=True)
    stamp = time.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
    args.results.mkdir(parents=True, exist_ok=True)
    pictures = [plot.concurrency({k: v for k, v in results.items()
                                  if k in report.INGRESS_TITLES}, args.results / f"{stamp}.png")]
    single = results.get("single")
    if isinstance(single, dict):
        pictures.append(plot.ladder(single["ladder"], args.results / f"{stamp}-cost.png"))
    body = markdown(args, s, results, [p for p in pictures if p], time.time() - started)
    (args.results / f"{stamp}.md").write_text(body)
    print("\n" + body)
    print(f"written: {args.results / f'{stamp}.md'}")
    if args.write_readme:
        folder = os.path.relpath(args.results, args.readme.resolve().parent)
        report.write_readme(args.readme, body.replace("](", f"]({folder}/"))
    return 1 if failed else 0


def markdown(args, s: sections.Session, results: dict, pictures: list[Path], took: float) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.machine())
    lines = [f"## make bench{' --quick' if args.quick else ''}, {time.strftime('%Y-%m-%d %H:%M')}",
             "", f"Machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
             f"Python {platform.python_version()}; load average at the end "
             f"{os.getloadavg()[0]:.2f}. c = {args.conc}, {args.runs} run(s) a row, "
             f"{s.n} AM.PDP messages a run, {s.mta_n} through Postfix; took {took / 60:.1f} min.",
             "", *[f"- {n}" for n in s.notes], ""]
    for name in ("ampdp", "smtp", "milter"):
        if name in results:
            lines += report.ingress_table(name, results[name])
    lines += report.ratios({k: v for k, v in results.items() if k in report.INGRESS_TITLES})
    if "single" in results:
        lines += report.single(results["single"])
    if "memory" in results:
        lines += report.footprint(results["memory"])
    lines += [f"![{p.stem}]({p.name})" for p in pictures]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    return interruptible(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
