"""Hypothesis profiles for the fuzz tests: `ci` (a short run inside `make
test`) and `long` (`make fuzz`: many more examples, still bounded in time).
The archive and decoder targets are not hypothesis tests: the direct
mutation driver (tests/fuzz/direct.py) runs them, beside these in `make fuzz`.

AMAVISD_FUZZ=long selects the long profile; AMAVISD_FUZZ_EXAMPLES overrides
the number of examples of either. The long run also caps the address space
(AMAVISD_FUZZ_MEMORY MiB, 2048 by default), so a decoder that tries to hold a
bomb in memory fails as MemoryError instead of taking the machine down.

Each hypothesis test is a fuzz target. AMAVISD_FUZZ_SECONDS gives each one a
time budget: past it the target stops early and counts as passed with the
examples it ran, so a long run on a shared machine still covers every target.
AMAVISD_FUZZ_SUMMARY names a file that gets one Markdown table row a target
(target, examples, seconds, rate, peak RSS of the process so far, outcome).

A long target runs as rounds of ROUND examples, each a fresh hypothesis
engine, and with logging off. The BDAT target hit MemoryError under the 2 GiB
cap at ~48,700 examples while the session itself stayed flat (tracemalloc,
s22): one engine keeps every example it made (its choice tree, ~10 KiB an
example there), and pytest's log capture keeps every record of a test call
for its report (the session logs each refused forward, ~30 KiB an example).
6,000 examples in one engine peaked at 290 MiB with logging, 105 without;
10,000 in rounds of 2,000 at 69 MiB. A finding is replayed with its logs in
the ci profile. Failures are kept: the long run's example database is
var/fuzz-hypothesis (replayed first by the next run), and each failure's
report, with hypothesis' `@reproduce_failure` blob, goes to var/fuzz-findings/.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture,
                                      HealthCheck.filter_too_much])
# `make test` (CI) runs the same examples every time, so a red run is a
# finding to reproduce, never a coin toss; `make fuzz` explores new ones.
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
ROUND = int(os.environ.get("AMAVISD_FUZZ_ROUND", "5000"))  # examples an engine run (long)
REPO = Path(__file__).resolve().parents[2]
FINDINGS = REPO / "var" / "fuzz-findings"
settings.register_profile("long", max_examples=ROUND, derandomize=False,
                          database=DirectoryBasedExampleDatabase(REPO / "var" / "fuzz-hypothesis"),
                          **_common)
PROFILE = os.environ.get("AMAVISD_FUZZ", "ci")
if PROFILE == "long":
    logging.disable(logging.CRITICAL)  # see above: records of 100,000 examples held
EXAMPLES = int(os.environ.get("AMAVISD_FUZZ_EXAMPLES")
               or (100_000 if PROFILE == "long" else settings.get_profile(PROFILE).max_examples))
settings.load_profile(PROFILE)
if os.environ.get("AMAVISD_FUZZ_EXAMPLES"):
    per_run = min(EXAMPLES, ROUND) if PROFILE == "long" else EXAMPLES
    settings.register_profile("override", parent=settings.get_profile(PROFILE),
                              max_examples=per_run)
    settings.load_profile("override")
ROUNDS = -(-EXAMPLES // settings().max_examples)


BUDGET = float(os.environ.get("AMAVISD_FUZZ_SECONDS", "0"))  # 0: no time budget
SUMMARY = os.environ.get("AMAVISD_FUZZ_SUMMARY")


class BudgetSpent(BaseException):
    """Raised inside a target when its time budget is spent. A BaseException,
    so neither hypothesis nor the decode engine takes it for a finding."""


class Target:
    """One fuzz target's figures, counted by wrapping hypothesis' inner test."""

    def __init__(self) -> None:
        self.examples = 0
        self.started = time.monotonic()
        self.stopped_early = False
        self.outcome = "not run"
        self.detail = ""

    def wrap(self, inner):
        def counted(*args, **kwargs):
            self.examples += 1
            result = inner(*args, **kwargs)
            # After the example, not before: a test drawing with st.data() that
            # stopped before its draws would look flaky to hypothesis' replay.
            if BUDGET and time.monotonic() - self.started > BUDGET:
                self.stopped_early = True
                raise BudgetSpent
            return result
        return counted


TARGETS: dict[str, Target] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    hyp = getattr(item.obj, "hypothesis", None)
    target = TARGETS[item.nodeid] = Target()
    if hyp is None:  # a plain test: one input
        target.examples = 1
        return (yield)
    inner = hyp.inner_test
    hyp.inner_test = target.wrap(inner)
    try:
        result = yield  # the first round; pluggy wants the yield whatever happens after
        for _ in range(ROUNDS - 1):  # a fresh engine a round
            before = target.examples
            item.runtest()
            if target.examples - before < settings().max_examples:
                break  # the strategy ran out of new examples: more rounds add nothing
        return result
    except BudgetSpent:
        return None
    finally:
        hyp.inner_test = inner
        target.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def pytest_collection_finish(session):
    """Seeds first (a module's `warm_up()`: the real archivers, the Java jlha
    among them, need more address space than the cap), then the cap."""
    if PROFILE != "long":
        return
    for module in {item.module for item in session.items if hasattr(item, "module")}:
        if hasattr(module, "warm_up"):
            module.warm_up()
    cap = int(os.environ.get("AMAVISD_FUZZ_MEMORY", "2048")) * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def pytest_runtest_logreport(report):
    target = TARGETS.get(report.nodeid)
    if target is None or report.when != "call" and not report.failed:
        return
    if report.when == "call":
        target.seconds = report.duration
    if report.failed:
        target.outcome = "FAILED"
        crash = getattr(report.longrepr, "reprcrash", None)
        target.detail = (crash.message if crash else str(report.longrepr)).splitlines()[0][:200]
        if PROFILE == "long":
            FINDINGS.mkdir(parents=True, exist_ok=True)
            name = report.nodeid.split("::", 1)[-1].translate(str.maketrans("/[]", "___"))
            (FINDINGS / f"{name}.txt").write_text(f"{report.nodeid}\n\n{report.longrepr}\n")
    elif report.skipped:
        target.outcome = "skipped"
    elif report.when == "call":
        target.outcome = "passed (time budget)" if target.stopped_early else "passed"


def pytest_sessionfinish(session):
    if not SUMMARY or not TARGETS:
        return
    rows = []
    for nodeid, t in TARGETS.items():
        seconds = getattr(t, "seconds", 0.0)
        rate = t.examples / seconds if seconds else 0.0
        rows.append(f"| {nodeid.split('tests/fuzz/', 1)[-1]} | {t.examples} | {seconds:.0f} | "
                    f"{rate:.0f} | {getattr(t, 'rss', 0)} | {t.outcome} | "
                    f"{t.detail.replace('|', '/')} |\n")
    with Path(SUMMARY).open("a") as fh:
        fh.writelines(rows)
