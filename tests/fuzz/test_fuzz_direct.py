"""The direct mutation driver keeps what it finds: a failed check, a crash
of the interpreter and a hang past SIGALRM each end as the input's bytes
under var/fuzz-findings/ with the line that replays them.

The decoders have no known failure to show this with, so the faults are
fakes, named so: a check that fails on one marked input, one that kills its
process with SIGSEGV (a C extension's crash), one that sleeps where no alarm
reaches. Everything else (seeds, mutations, the forked child, the shared
page the input is saved from) is the real driver.
"""

from __future__ import annotations

import faulthandler
import os
import random
import resource
import signal
import time
from pathlib import Path

import pytest

from amavisd.decode.registry import REGISTRY
from tests.fuzz import direct, harness

MARK = b"the input the fake fault is for"


def counting(rng: random.Random) -> bytes:
    """Inputs numbered 0, 1, 2, ...: the third is MARK."""
    counting.n = getattr(counting, "n", -1) + 1
    return MARK if counting.n % 5 == 2 else rng.randbytes(8)


@pytest.fixture
def findings(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "FINDINGS", tmp_path / "findings")
    counting.n = -1
    return tmp_path / "findings"


def fake_check_failing(data: bytes, bare: bool = False) -> list:
    assert data != MARK, "fake decoder fault"
    return []


def fake_check_crashing(data: bytes, bare: bool = False) -> list:
    if data == MARK:
        faulthandler.disable()  # pytest's traceback of a crash we asked for is noise
        os.kill(os.getpid(), signal.SIGSEGV)
    return []


def fake_check_hanging(data: bytes, bare: bool = False) -> list:
    if data == MARK:
        time.sleep(60)
    return []


def saved(findings: Path) -> tuple[bytes, str]:
    (path,) = findings.glob("*.bin")
    return path.read_bytes(), path.with_suffix(".txt").read_text()


def test_a_failed_check_is_saved_with_its_replay_line(findings, monkeypatch):
    monkeypatch.setattr(harness, "check", fake_check_failing)
    result = direct.fuzz(direct.Target("fake", counting), 10)
    assert (result.outcome, result.inputs) == ("FAILED", 3)
    assert "fake decoder fault" in result.detail
    data, report = saved(findings)
    assert data == MARK
    assert report.startswith(".venv/bin/python -m tests.fuzz.direct replay fake ")
    assert result.finding in report


@pytest.mark.parametrize("fault, status", [(fake_check_crashing, "died of signal 11"),
                                           (fake_check_hanging, "hung past 1s")])
def test_a_dead_or_stuck_child_leaves_its_input(findings, monkeypatch, fault, status):
    monkeypatch.setattr(harness, "check", fault)
    monkeypatch.setattr(direct, "HANG", 1.0)
    monkeypatch.setattr(direct, "targets", lambda: {"fake": direct.Target("fake", counting)})
    started = time.monotonic()
    (result,) = direct.run(["fake"], 10)
    assert time.monotonic() - started < 10
    assert (result.outcome, result.detail) == ("FAILED", f"input 2: {status}")
    assert saved(findings)[0] == MARK


def test_a_clean_run_in_a_child_reports_every_input_and_cleans_up(findings):
    before = set(Path("/dev/shm").glob("amfz*"))
    (result,) = direct.run(["mime"], 40, seed=3)
    assert (result.outcome, result.inputs) == ("passed", 40)
    assert result.rss_mib > 0
    assert "| direct::mime | 40 |" in result.row()
    assert not findings.exists()
    assert set(Path("/dev/shm").glob("amfz*")) <= before  # the child's work base is gone


def test_the_same_seed_gives_the_same_inputs_and_replay_passes_a_clean_one(findings):
    target = direct.targets()["zip"]
    rng_a, rng_b, rng_c = random.Random("zip:7"), random.Random("zip:7"), random.Random("zip:8")
    inputs_a = [target.make(rng_a) for _ in range(20)]
    assert inputs_a == [target.make(rng_b) for _ in range(20)]
    assert inputs_a != [target.make(rng_c) for _ in range(20)]
    path = findings.parent / "one.bin"
    path.write_bytes(inputs_a[5])
    assert direct.main(["direct", "replay", "zip", str(path)]) == 0


def test_each_input_is_held_to_its_own_peak(monkeypatch):
    """harness.check resets the peak RSS before an input, so the bound is on
    what that input took, not on a peak an earlier one reached."""
    ballast = bytearray(96 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched: resident
    del ballast
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = harness.reset_peak()
    if before is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < high - 64 * 1024
    raw = b"Subject: x\n\nhello\n"
    assert harness.check(raw) == []
    monkeypatch.setattr(harness, "INPUT_MEMORY", -2 * len(raw))  # no growth allowed at all
    with pytest.raises(AssertionError, match="one input took"):
        harness.check(raw)


def fake_tnef_decoder(part, ctx):
    raise KeyError("fake decoder bug")


def test_a_decoder_that_raises_is_reported_and_its_input_kept(findings, monkeypatch):
    """Fail-closed (UNCHECKED, kind internal) is not a failed check, but the
    run says so, counts them, and keeps the first input with its traceback."""
    monkeypatch.setitem(REGISTRY, "tnef", fake_tnef_decoder)
    result = direct.fuzz(direct.targets()["tnef"], 20, seed=1)
    assert result.outcome == "passed, decoders raised"
    assert "decoder tnef failed: KeyError x" in result.detail
    (path,) = findings.glob("internal-tnef-*.bin")
    report = path.with_suffix(".txt").read_text()
    assert "fake decoder bug" in report and "Traceback" in report
