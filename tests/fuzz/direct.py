"""The direct mutation driver for the decoder fuzz targets: no hypothesis on
the hot path, so an input costs its decode and harness.check, not 3 ms of
drawing.

A target (`Target`: a name, a function from a random.Random to an input, and
whether the input is a bare file or a message) is run to a count of inputs
from a seeded generator, so a run is repeatable: the same name, seed and
count give the same inputs. Each input gets harness.check (nothing raised,
no hang, nothing outside the work dir, output within the limits, memory
bounded). A finding is the input bytes under var/fuzz-findings/ and a .txt
beside it with the error and the one line that replays it:

    .venv/bin/python -m tests.fuzz.direct replay <target> <file>

The long run (`make fuzz-mutate`, `run`) forks a child a target: a crash of
the interpreter (a C extension's SIGSEGV), a hang past SIGALRM's reach (a C
loop that never returns to Python) or the address-space cap are then the
child's death, seen by the parent, which saves the input the child had
written to a shared page before decoding it.

    .venv/bin/python -m tests.fuzz.direct run [-n COUNT] [-j JOBS] [--seconds S]
        [--seed N] [--summary FILE] [TARGET ...]
    .venv/bin/python -m tests.fuzz.direct list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import mmap
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz import harness
from tests.fuzz.mutate import MAX_INPUT

REPO = harness.REPO
FINDINGS = REPO / "var" / "fuzz-findings"
HANG = harness.LIMITS.max_time + 2 * harness.HANG_SLACK  # the parent's bound, past SIGALRM's
_SLOT = struct.Struct("<QQd")  # input number, its length, when its decode started
SLOT_BYTES = 4 * MAX_INPUT  # a mutant attached to a message grows by base64's third


@dataclass
class Target:
    name: str
    make: Callable[[random.Random], bytes]
    bare: bool = True
    warm: Callable[[], object] = lambda: None


@dataclass
class Result:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    rss_mib: int = 0
    outcome: str = "passed"
    detail: str = ""
    finding: str = ""
    cpu: float = 0.0
    internal: dict[str, int] = field(default_factory=dict)

    def row(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        detail = (self.detail + (f" ({self.finding})" if self.finding else "")).replace("|", "/")
        return (f"| direct::{self.target} | {self.inputs} | {self.seconds:.0f} | {rate:.0f} | "
                f"{self.rss_mib} | {self.outcome} | {detail[:240]} |\n")


def targets() -> dict[str, Target]:
    """Every target the test modules declare (imported here, late: they
    import this module for their short runs)."""
    from tests.fuzz import test_fuzz_archives, test_fuzz_decoders
    return {t.name: t for t in [*test_fuzz_archives.direct_targets(),
                                *test_fuzz_decoders.direct_targets()]}


def fuzz(target: Target, count: int, seed: int = 0, budget: float = 0.0,
         slot: mmap.mmap | None = None) -> Result:
    """`count` inputs through harness.check; stops at the first failure
    (saved as a finding) or when `budget` seconds are spent."""
    rng = random.Random(f"{target.name}:{seed}")
    result, started, cpu = Result(target.name), time.monotonic(), _cpu()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the check resets it an input
    decode_log, handler = logging.getLogger("amavisd.decode"), _LastTraceback()
    decode_log.addHandler(handler)
    propagate, decode_log.propagate = decode_log.propagate, False  # kept here, not on stderr
    try:
        for number in range(count):
            data = target.make(rng)
            if slot is not None:
                kept = data[:SLOT_BYTES]
                slot[_SLOT.size:_SLOT.size + len(kept)] = kept
                slot[:_SLOT.size] = _SLOT.pack(number, len(kept), time.monotonic())
            result.inputs += 1
            handler.text = ""
            try:
                reasons = harness.check(data, bare=target.bare)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001  every other one is a finding
                result.outcome = "FAILED"
                result.detail = f"input {number}: {type(err).__name__}: {err}".splitlines()[0]
                result.finding = save(target, data, "".join(traceback.format_exception(err)))
                break
            peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            for reason in reasons:
                if reason.kind == "internal":
                    _internal(target, result, reason, data, number, handler.text)
            if budget and time.monotonic() - started > budget:
                result.outcome = "passed (time budget)"
                break
    finally:
        decode_log.removeHandler(handler)
        decode_log.propagate = propagate
        result.seconds = time.monotonic() - started
        result.rss_mib = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024
        result.cpu = _cpu() - cpu
        if not result.detail and result.inputs:
            result.detail = f"CPU {result.cpu:.1f}s, {result.inputs / max(result.cpu, 1e-3):.0f}/CPU-s"
        if result.internal:
            if result.outcome.startswith("passed"):
                result.outcome += ", decoders raised"
            result.detail += "; decoder failures (UNCHECKED, saved): " + ", ".join(
                f"{key} x{n}" for key, n in result.internal.items())
    return result


class _LastTraceback(logging.Handler):
    """Keeps the engine's one traceback a message, for a finding's report."""
    text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text = self.format(record)


def _internal(target: Target, result: Result, reason: str, data: bytes, number: int,
              trace: str) -> None:
    """A decoder that raised: fail-closed (the message is UNCHECKED), so not a
    failed check, but a bug to look at; the first input of each kind is saved."""
    key = reason.rsplit(" (", 1)[0]
    result.internal[key] = result.internal.get(key, 0) + 1
    if result.internal[key] == 1:
        save(target, data, f"input {number}: UNCHECKED {reason}\n\n{trace}\n",
             prefix="internal-")



def _cpu() -> float:
    """CPU seconds of this process and the tools it ran: what a run costs on
    an idle machine, where wall time on a shared one says little."""
    own, tools = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + tools.ru_utime + tools.ru_stime


def save(target: Target, data: bytes, report: str, prefix: str = "") -> str:
    """The input as a file, and beside it what failed and how to replay it."""
    FINDINGS.mkdir(parents=True, exist_ok=True)
    path = FINDINGS / f"{prefix}{target.name}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    shown = os.path.relpath(path, REPO)
    command = f".venv/bin/python -m tests.fuzz.direct replay {target.name} {shown}"
    path.with_suffix(".txt").write_text(f"{command}\n\n{report}")
    return command


def replay(target: Target, path: Path) -> None:
    """One saved input through the same checks; raises what it raised."""
    harness.check(path.read_bytes(), bare=target.bare)


# -- the long run: a child a target ----------------------------------------------

def _child(target: Target, count: int, seed: int, budget: float, slot: mmap.mmap,
           out: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handler is for the parent
    cap = int(os.environ.get("AMAVISD_FUZZ_MEMORY", "2048")) * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY
                                            else min(cap, hard), hard))
    code = 0
    try:
        result = fuzz(target, count, seed, budget, slot)
        os.write(out, json.dumps(result.__dict__).encode())
    except BaseException:  # noqa: BLE001  the parent saves the input
        traceback.print_exc()
        code = 3
    os._exit(code)


def _died(target: Target, slot: mmap.mmap, status: str, seconds: float) -> Result:
    number, length, _ = _SLOT.unpack(slot[:_SLOT.size])
    data = bytes(slot[_SLOT.size:_SLOT.size + length])
    finding = save(target, data, f"the fuzz child {status} at input {number}\n")
    return Result(target.name, number + 1, seconds, 0, "FAILED", f"input {number}: {status}",
                  finding)


def _start(target: Target, count: int, seed: int, budget: float) -> dict:
    slot = mmap.mmap(-1, _SLOT.size + SLOT_BYTES)
    slot[:_SLOT.size] = _SLOT.pack(0, 0, time.monotonic())
    read, write = os.pipe()
    base = harness.new_base()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        harness.use_base(base)
        _child(target, count, seed, budget, slot, write)
    os.close(write)
    return {"pid": pid, "slot": slot, "read": read, "target": target, "at": time.monotonic(),
            "base": base}


def _finish(job: dict, status: int) -> Result:
    reply = b""
    while chunk := os.read(job["read"], 65536):
        reply += chunk
    os.close(job["read"])
    seconds = time.monotonic() - job["at"]
    if reply:
        return Result(**json.loads(reply))
    what = (f"died of signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
            else f"exited {os.waitstatus_to_exitcode(status)}")
    return _died(job["target"], job["slot"], what, seconds)


def run(names: list[str], count: int, jobs: int = 1, seed: int = 0, budget: float = 0.0,
        summary: Path | None = None) -> list[Result]:
    """Each target to `count` inputs, `jobs` at a time, one child each; a
    child on one input past HANG seconds is killed and the input saved."""
    table = targets()
    for name in names:
        table[name].warm()  # seeds made once, before the address-space cap
    pending, running, results = list(names), [], []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                running.append(_start(table[pending.pop(0)], count, seed, budget))
            time.sleep(0.2)
            for job in list(running):
                result = _reap(job)
                if result is None:
                    continue
                running.remove(job)
                shutil.rmtree(job["base"], ignore_errors=True)
                results.append(result)
                print(result.row(), end="", flush=True)
                if summary is not None:
                    with summary.open("a") as fh:
                        fh.write(result.row())
    finally:  # interrupted (make's timeout, ^C): no child left running
        for job in running:
            os.kill(job["pid"], signal.SIGKILL)
            os.waitpid(job["pid"], 0)
            shutil.rmtree(job["base"], ignore_errors=True)
    return results


def _reap(job: dict) -> Result | None:
    """The child's result once it has ended; None while it runs within bounds."""
    pid, status = os.waitpid(job["pid"], os.WNOHANG)
    if pid:
        return _finish(job, status)
    _number, _length, began = _SLOT.unpack(job["slot"][:_SLOT.size])
    if time.monotonic() - began < HANG:
        return None
    os.kill(job["pid"], signal.SIGKILL)
    os.waitpid(job["pid"], 0)
    os.close(job["read"])
    return _died(job["target"], job["slot"], f"hung past {HANG:g}s", time.monotonic() - job["at"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests.fuzz.direct", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("-n", "--count", type=int, default=100_000)
    go.add_argument("-j", "--jobs", type=int, default=1)
    go.add_argument("--seed", type=int, default=int(time.time()))
    go.add_argument("--seconds", type=float, default=0.0, help="each target's time budget")
    go.add_argument("--summary", type=Path)
    go.add_argument("names", nargs="*")
    again = sub.add_parser("replay")
    again.add_argument("name")
    again.add_argument("file", type=Path)
    sub.add_parser("list")
    args = parser.parse_args(argv[1:])
    if args.command == "list":
        print("\n".join(targets()))
        return 0
    if args.command == "replay":
        replay(targets()[args.name], args.file)
        print(f"{args.file}: passed")
        return 0
    names = args.names or list(targets())
    # make's timeout sends TERM to the group: unwind, so no work base is left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = run(names, args.count, args.jobs, args.seed, args.seconds, args.summary)
    return 0 if all(r.outcome != "FAILED" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
