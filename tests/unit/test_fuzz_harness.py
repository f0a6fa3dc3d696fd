"""The fuzz harness' own base dir: reused between inputs (the speed of the
long run), and put back as new after an input that left something behind,
so one finding cannot make every later input fail or pass for the wrong reason."""

from __future__ import annotations

import os

import pytest

from tests.fuzz import harness
from tests.fuzz.harness import _base, check


def test_the_base_is_reused_and_restored_after_a_dirty_input():
    base, sentinel, work = _base()
    assert _base() == (base, sentinel, work)  # one a process
    (work / "amavisd-left").write_bytes(b"x")
    (sentinel / "escaped").write_bytes(b"x")
    os.symlink("/etc/passwd", base / "link")
    assert _base() == (base, sentinel, work)
    assert sorted(os.listdir(base)) == ["outside", "work"]
    assert not any(work.iterdir()) and not any(sentinel.iterdir())
    assert oct(work.stat().st_mode & 0o777) == "0o700"


def test_a_leftover_in_the_work_dir_is_a_finding(monkeypatch):
    """The checks still see what a decoder leaves: cleanup that forgets a
    file fails the input."""
    real = harness.decompose

    def leaky(raw, limits, tempbase, bare_file):
        result = real(raw, limits, tempbase=tempbase, bare_file=bare_file)
        result.cleanup = lambda: open(os.path.join(tempbase, "amavisd-leak"), "wb").close()
        return result

    monkeypatch.setattr(harness, "decompose", leaky)  # a fake: a fault no decoder has today
    with pytest.raises(AssertionError, match="cleanup left files behind"):
        check(b"plain text", bare=True)
    monkeypatch.undo()
    assert check(b"plain text", bare=True) == []
