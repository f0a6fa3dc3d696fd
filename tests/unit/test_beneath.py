"""amavisd.beneath: client paths opened and removed below a base, never through a link.

The race tests swap a directory of the path for a symlink with
renameat2(RENAME_EXCHANGE) in a tight loop while the other thread opens or
removes; they run AMAVISD_RACE_SECONDS (default 1 here) and must see ZERO
reads and ZERO removals outside the base.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from amavisd.beneath import DIR_FLAGS, Base, OutsideBase, components, open_beneath, remove_beneath

RACE_SECONDS = float(os.environ.get("AMAVISD_RACE_SECONDS", "1"))
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture
def tree(tmp_path):
    """base/job/email.txt inside; outside/secret beside the base; links to it inside."""
    base = tmp_path / "base"
    (base / "job").mkdir(parents=True)
    (base / "job" / "email.txt").write_bytes(b"inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "email.txt").write_bytes(b"SECRET")
    (base / "dirlink").symlink_to(outside)
    (base / "job" / "filelink").symlink_to(outside / "email.txt")
    return base, outside


def read(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_components_are_lexical_and_strict():
    assert components("/b/x/y", "/b") == ["x", "y"]
    assert components("/b/x/", "/b") == ["x"]
    assert components("/real/x", "/b", "/real") == ["x"]
    for bad in ("/b", "/b/", "/bx/y", "/b/../etc", "/b/./x", "/b//x", "b/x", "", "/b/x\0y"):
        with pytest.raises(OutsideBase):
            components(bad, "/b")


def test_open_reads_inside_and_refuses_a_link_at_any_component(tree):
    base, outside = tree
    assert read(open_beneath(str(base), str(base / "job" / "email.txt"))) == b"inside"
    for path in (base / "dirlink" / "email.txt", base / "job" / "filelink"):
        with pytest.raises(OSError) as err:
            open_beneath(str(base), str(path))
        assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)
    with pytest.raises(OSError):
        open_beneath(str(base), str(base / "dirlink"), DIR_FLAGS)
    with pytest.raises(OutsideBase):
        open_beneath(str(base), str(outside / "email.txt"))


def test_the_base_may_be_named_through_an_admins_link(tree, tmp_path):
    base, _ = tree
    (tmp_path / "alias").symlink_to(base)
    with Base(str(tmp_path / "alias")) as held:
        for spelling in (tmp_path / "alias", base):  # clients send either one
            assert read(held.open(str(spelling / "job" / "email.txt"))) == b"inside"


def test_a_path_into_an_avoided_dir_is_refused(tree):
    base, _ = tree
    (base / "work").mkdir()
    (base / "work" / "email.txt").write_bytes(b"ours")
    with Base(str(base), avoid=[str(base / "work")]) as held:
        with pytest.raises(OutsideBase):
            held.open(str(base / "work" / "email.txt"))
        with pytest.raises(OutsideBase):
            held.remove(str(base / "work"))
    assert (base / "work" / "email.txt").exists()


def test_remove_empties_a_tree_without_following_its_links(tree):
    base, outside = tree
    job = base / "job"
    (job / "sub" / "deeper").mkdir(parents=True)
    (job / "sub" / "deeper" / "f").write_bytes(b"x")
    (job / "sub" / "out").symlink_to(outside)
    assert remove_beneath(str(base), str(job))
    assert not job.exists()
    assert sorted(os.listdir(outside)) == ["email.txt"]
    with pytest.raises(OSError):  # a link, not a dir: refused, not followed
        remove_beneath(str(base), str(base / "dirlink"))
    assert (outside / "email.txt").read_bytes() == b"SECRET"


def test_remove_only_the_directory_that_was_checked(tree):
    base, _ = tree
    job = base / "job"
    st = os.stat(job)
    other = base / "other"
    other.mkdir()
    assert not Base(str(base)).remove(str(other), expect=(st.st_dev, st.st_ino))
    assert other.exists()
    assert Base(str(base)).remove(str(job), expect=(st.st_dev, st.st_ino))


def swapping(a: Path, b: Path, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            exchange(a, b)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_race_no_read_outside_while_a_dir_is_swapped_for_a_link(tree):
    """base/race/x is a real dir or a link to `outside`, flipping all the time."""
    base, outside = tree
    race = base / "race"
    (race / "x").mkdir(parents=True)
    (race / "x" / "email.txt").write_bytes(b"inside")
    (race / "y").symlink_to(outside)
    stop = threading.Event()
    thread = swapping(race / "x", race / "y", stop)
    seen = {b"inside": 0, b"SECRET": 0, "refused": 0}
    deadline = time.monotonic() + RACE_SECONDS
    with Base(str(base)) as held:
        while time.monotonic() < deadline:
            try:
                seen[read(held.open(str(race / "x" / "email.txt")))] += 1
            except OSError:
                seen["refused"] += 1
    stop.set()
    thread.join()
    assert seen[b"SECRET"] == 0, seen
    assert seen[b"inside"] and seen["refused"], seen  # both states were hit


def test_race_no_removal_outside_while_a_dir_is_swapped_for_a_link(tree):
    base, outside = tree
    race = base / "race"
    race.mkdir()
    (race / "x").mkdir()
    (race / "y").symlink_to(outside.parent)  # x/outside would be the real `outside`
    stop = threading.Event()
    thread = swapping(race / "x", race / "y", stop)
    removed = refused = 0
    deadline = time.monotonic() + RACE_SECONDS
    with Base(str(base)) as held:
        while time.monotonic() < deadline and (outside / "email.txt").exists():
            for parent in (race / "x", race / "y"):  # whichever is the real dir now
                try:
                    (parent / "outside").mkdir()
                    (parent / "outside" / "f").write_bytes(b"x")
                except OSError:
                    pass
            try:
                removed += held.remove(str(race / "x" / "outside"))
            except OSError:
                refused += 1
    stop.set()
    thread.join()
    assert (outside / "email.txt").read_bytes() == b"SECRET"
    assert removed and refused, (removed, refused)
