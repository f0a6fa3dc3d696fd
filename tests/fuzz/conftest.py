"""Hypothesis profiles for the fuzz tests: `ci` (a short run inside `make
test`) and `long` (`make fuzz`: many more examples, still bounded in time).

AMAVISD_FUZZ=long selects the long profile; AMAVISD_FUZZ_EXAMPLES overrides
the number of examples of either. The long run also caps the address space
(AMAVISD_FUZZ_MEMORY MiB, 2048 by default), so a decoder that tries to hold a
bomb in memory fails as MemoryError instead of taking the machine down.

Each hypothesis test is a fuzz target. AMAVISD_FUZZ_SECONDS gives each one a
time budget: past it the target stops early and counts as passed with the
examples it ran, so a long run on a shared machine still covers every target.
AMAVISD_FUZZ_SUMMARY names a file that gets one Markdown table row a target
(target, examples, seconds, outcome).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture,
                                      HealthCheck.filter_too_much])
# `make test` (CI) runs the same examples every time, so a red run is a
# finding to reproduce, never a coin toss; `make fuzz` explores new ones.
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
settings.register_profile("long", max_examples=100_000, derandomize=False, **_common)
PROFILE = os.environ.get("AMAVISD_FUZZ", "ci")
settings.load_profile(PROFILE)
if os.environ.get("AMAVISD_FUZZ_EXAMPLES"):
    settings.register_profile("override", parent=settings.get_profile(PROFILE),
                              max_examples=int(os.environ["AMAVISD_FUZZ_EXAMPLES"]))
    settings.load_profile("override")


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
        return (yield)
    except BudgetSpent:
        return None
    finally:
        hyp.inner_test = inner


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
                    f"{rate:.0f} | {t.outcome} | {t.detail.replace('|', '/')} |\n")
    with Path(SUMMARY).open("a") as fh:
        fh.writelines(rows)
