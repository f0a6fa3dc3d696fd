#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Benchmark: how long does `amavisd-client` take to start, and to get a verdict?

The MTA runs the client once per message, so its start-up is paid on every
mail. This measures wall time of:

  python3 -I -S -c pass            the floor: the interpreter alone (the
                                   real binary, and Debian's /usr/bin/python3)
  python3 -I -S <client> --help    the client, run as its launcher runs it
  amavisd-client --help            the installed launcher (--client PATH)
  python3 -c pass                  with site enabled, for contrast

and prints a Markdown table: mean ± standard deviation, minimum, and the
ratio to `python3 -I -S -c pass`.

--request times a full `amavisd-client FILE` round trip (spool, AM.PDP
request, scan, verdict) against a daemon that is already running; it starts
nothing itself:

  bench/client_startup.py --request --socket /var/lib/amavis/amavisd.sock \\
      --message tests/data/clean.eml

It uses hyperfine (`hyperfine -N`, no shell) when installed, otherwise its own
loop (posix_spawn + waitpid, commands interleaved round by round). Standard
library only. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LAUNCHER = os.path.join(ROOT, ".venv", "bin", "amavisd-client")
SYSTEM_PYTHON = "/usr/bin/python3"
# What the installed launcher does: no site, no user paths, no PYTHON* variables.
CLIENT_CODE = (f"import sys; sys.path.insert(0, {ROOT!r}); "
               "from amavisd_client.client import main; sys.exit(main())")


@dataclass
class Case:
    label: str
    argv: list[str]
    baseline: bool = False
    times: list[float] = field(default_factory=list)  # seconds
    exit_code: int | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.times) if len(self.times) > 1 else 0.0


# -- which commands ---------------------------------------------------------------


def real_interpreter(path: str) -> str:
    """Refuse a pyenv shim: it is a shell script that costs more than Python itself."""
    resolved = os.path.realpath(path)
    with open(resolved, "rb") as fh:
        if fh.read(2) == b"#!":
            sys.exit(f"client_startup: {path} is a script (a pyenv shim?), not an "
                     "interpreter: pass the real binary with --python")
    return path


def startup_cases(args: argparse.Namespace) -> list[Case]:
    py = args.python
    system = (args.system_python and os.access(args.system_python, os.X_OK)
              and os.path.realpath(args.system_python) != os.path.realpath(py))
    cases = [Case("`python3 -I -S -c pass`", [py, "-I", "-S", "-c", "pass"], baseline=True)]
    if system:
        cases.append(Case("`python3 -I -S -c pass` (system)",
                          [args.system_python, "-I", "-S", "-c", "pass"]))
    cases.append(Case("`python3 -I -S` client `--help`",
                      [py, "-I", "-S", "-c", CLIENT_CODE, "--help"]))
    if args.client and os.access(args.client, os.X_OK):
        cases.append(Case("`amavisd-client --help` (launcher)", [args.client, "--help"]))
    elif args.client_given:
        sys.exit(f"client_startup: --client {args.client}: not an executable file")
    cases.append(Case("`python3 -c pass` (site enabled)", [py, "-c", "pass"]))
    if system:
        cases.append(Case("`python3 -c pass` (system, site enabled)",
                          [args.system_python, "-c", "pass"]))
    return cases


def request_cases(args: argparse.Namespace) -> list[Case]:
    if not args.socket or not args.message:
        sys.exit("client_startup: --request needs --socket PATH and --message FILE")
    if not os.path.isfile(args.message):
        sys.exit(f"client_startup: --message {args.message}: no such file")
    py = args.python
    target = ["--socket", args.socket]
    if args.tempbase:
        target += ["--tempbase", args.tempbase]
    message = os.path.abspath(args.message)
    cases = [
        Case("`python3 -I -S -c pass`", [py, "-I", "-S", "-c", "pass"], baseline=True),
        Case("`python3 -I -S` client `--help`", [py, "-I", "-S", "-c", CLIENT_CODE, "--help"]),
        Case("`python3 -I -S` client `FILE` (round trip)",
             [py, "-I", "-S", "-c", CLIENT_CODE, *target, message]),
    ]
    if args.client and os.access(args.client, os.X_OK):
        cases.append(Case("`amavisd-client FILE` (launcher, round trip)",
                          [args.client, *target, message]))
    elif args.client_given:
        sys.exit(f"client_startup: --client {args.client}: not an executable file")
    return cases


def check_runs(cases: list[Case], request: bool) -> None:
    """Run each command once: it must work before it is worth timing."""
    for case in cases:
        proc = subprocess.run(case.argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace")
        case.exit_code = proc.returncode
        if request and "round trip" in case.label:
            line = (proc.stdout or proc.stderr).strip().splitlines()
            print(f"client_startup: {case.label}: exit {proc.returncode}: "
                  f"{line[0] if line else '(no output)'}", file=sys.stderr)
            if proc.returncode == 75:
                print("client_startup: warning: tempfail (daemon down, or clamd?): "
                      "the figures time a failed request", file=sys.stderr)
            elif proc.returncode not in (0, 69, 99):
                sys.exit(f"client_startup: {case.label} failed: {proc.stderr.strip()}")
        elif proc.returncode != 0:
            sys.exit(f"client_startup: {shlex.join(case.argv)} exited "
                     f"{proc.returncode}: {proc.stderr.strip()}")


# -- timing -------------------------------------------------------------------------


def time_with_hyperfine(hyperfine: str, cases: list[Case], runs: int, warmup: int) -> str:
    with tempfile.TemporaryDirectory(prefix="client_startup.") as tmp:
        export = os.path.join(tmp, "results.json")
        cmd = [hyperfine, "-N", "--warmup", str(warmup), "--runs", str(runs),
               "--style", "none", "--export-json", export, "--ignore-failure"]
        for case in cases:
            cmd += ["--command-name", case.label]
        cmd += [shlex.join(case.argv) for case in cases]  # hyperfine splits these itself
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        with open(export) as fh:
            results = json.load(fh)["results"]
    for case, result in zip(cases, results, strict=True):
        case.times = list(result["times"])
    version = subprocess.run([hyperfine, "--version"], capture_output=True, text=True)
    return version.stdout.strip() + " (-N)"


def time_with_loop(cases: list[Case], runs: int, warmup: int) -> str:
    """posix_spawn + waitpid, output to /dev/null; the commands take turns each round,
    so a drift in machine load touches all of them alike."""
    devnull = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
               (os.POSIX_SPAWN_DUP2, devnull, 2)]
    env = dict(os.environ)
    try:
        for round_ in range(warmup + runs):
            for case in cases:
                start = time.perf_counter()
                pid = os.posix_spawn(case.argv[0], case.argv, env, file_actions=actions)
                os.waitpid(pid, 0)
                elapsed = time.perf_counter() - start
                if round_ >= warmup:
                    case.times.append(elapsed)
    finally:
        os.close(devnull)
    return "own loop (posix_spawn + waitpid)"


# -- report -------------------------------------------------------------------------------


def interpreter_version(path: str) -> str:
    out = subprocess.run([path, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def report(cases: list[Case], args: argparse.Namespace, method: str) -> str:
    base = next(c for c in cases if c.baseline)
    lines = [
        f"amavisd-client start-up, {time.strftime('%Y-%m-%d')}: {method}, "
        f"{args.runs} runs after {args.warmup} warm-up; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Linux {platform.release()}",
        "",
        "| Command | Mean ± σ [ms] | Min [ms] | Median [ms] | × `-I -S -c pass` |",
        "|:---|---:|---:|---:|---:|",
    ]
    for case in cases:
        ratio = case.mean / base.mean
        lines.append(f"| {case.label} | {case.mean * 1e3:.1f} ± {case.stdev * 1e3:.1f} | "
                     f"{min(case.times) * 1e3:.1f} | "
                     f"{statistics.median(case.times) * 1e3:.1f} | {ratio:.2f} |")
    lines += ["", "Commands:", ""]
    versions: dict[str, str] = {}
    for case in cases:
        note = ""
        if "python" in os.path.basename(case.argv[0]):
            version = versions.setdefault(case.argv[0], interpreter_version(case.argv[0]))
            note = f" (Python {version})"
        lines.append(f"- {case.label}: `{shlex.join(case.argv)}`{note}")
    if args.request:
        helps = [c for c in cases if c.label.endswith("client `--help`")]
        trips = [c for c in cases if "round trip" in c.label]
        if helps and trips:
            lines += ["", f"Round trip minus `--help` (connect, spool, scan, verdict): "
                          f"{(trips[0].mean - helps[0].mean) * 1e3:.1f} ms."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time amavisd-client's start-up (or, with --request, a full round "
                    "trip against a running daemon) and print a Markdown table.")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter to time (default: the one running this, "
                             f"{sys.executable}); never a pyenv shim")
    parser.add_argument("--system-python", default=SYSTEM_PYTHON,
                        help=f"second interpreter for contrast (default {SYSTEM_PYTHON}; "
                             "empty to skip)")
    parser.add_argument("--client", default=None,
                        help=f"the installed launcher (default {DEFAULT_LAUNCHER} if it "
                             "exists)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    parser.add_argument("--no-hyperfine", action="store_true",
                        help="use the built-in loop even if hyperfine is installed")
    parser.add_argument("--request", action="store_true",
                        help="time `amavisd-client FILE` against a running daemon")
    parser.add_argument("--socket", help="the daemon's socket (--request)")
    parser.add_argument("--tempbase", help="the daemon's temp base, if not <socket dir>/tmp")
    parser.add_argument("--message", help="message file to send (--request)")
    args = parser.parse_args(argv)
    args.client_given = args.client is not None
    if args.client is None:
        args.client = DEFAULT_LAUNCHER
    if args.runs < 2 or args.warmup < 0:
        parser.error("--runs must be at least 2 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.python = real_interpreter(args.python)
    cases = request_cases(args) if args.request else startup_cases(args)
    check_runs(cases, args.request)
    hyperfine = None if args.no_hyperfine else shutil.which("hyperfine")
    print(f"client_startup: timing {len(cases)} commands, {args.runs} runs each, with "
          f"{'hyperfine' if hyperfine else 'the built-in loop'}...", file=sys.stderr)
    if hyperfine:
        method = time_with_hyperfine(hyperfine, cases, args.runs, args.warmup)
    else:
        method = time_with_loop(cases, args.runs, args.warmup)
    sys.stdout.write(report(cases, args, method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
