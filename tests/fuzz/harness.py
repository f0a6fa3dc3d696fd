"""What every decoder fuzz target asserts about one input.

`check(raw)` runs the real decode engine with a private work dir under a
base of its own (one a process, see `_base`) and asserts, after each input:
nothing escapes (a decoder's failure is a flag plus an UNCHECKED reason),
every spilled byte and every entry on disk lies in the message's own work
dir, no symlink or hard link was made, the output stays within the limits
(parts, depth, bytes), the input took bounded time (SIGALRM: a hang is a
failure, not a stuck run) and memory, and cleanup leaves nothing behind.

The inputs come from tests/fuzz/mutate.py (real samples mutated, with
tests/fuzz/repair.py's checksum repairs), driven by tests/fuzz/direct.py.
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits

REPO = Path(__file__).resolve().parents[2]
ARCHIVES = Path(os.environ.get("AMAVISD_CORPUS", REPO.parent / "shared" / "corpus")) / "archives"
MAX_SEED = 256 * 1024  # corpus samples used as seeds; bigger ones make slow inputs
LIMITS = Limits(max_time=10.0, min_quota=16 * 1024 * 1024, max_parts=500, tool_timeout=5.0)
HANG_SLACK = 20  # seconds past max_time before an input counts as a hang
MEMORY_CEILING = 1536 * 1024 * 1024  # the whole process's peak RSS while an input decodes
INPUT_MEMORY = 256 * 1024 * 1024  # what one input may add to it (and twice its size)
CHUNK_SLACK = 1024 * 1024  # a bomb stops within one chunk of the quota


class Hang(BaseException):
    """Not an Exception: the engine must not turn a hang into a decoder flag."""


def _hang(signum, frame):
    raise Hang(f"decompose ran past {LIMITS.max_time + HANG_SLACK:g}s")


def check(raw: bytes, bare: bool = False) -> list:
    """Decode `raw` under every assertion above; the UNCHECKED reasons back."""
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(int(LIMITS.max_time + HANG_SLACK))
    try:
        return run_checks(raw, bare)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_checks(raw: bytes, bare: bool) -> list:
    """`check` without the alarm, for a driver that bounds time itself (libFuzzer)."""
    base, sentinel, work = _base()
    before = reset_peak()
    started = time.monotonic()
    dec = decompose(raw, LIMITS, tempbase=str(work), bare_file=bare)
    try:
        assert time.monotonic() - started < LIMITS.max_time + HANG_SLACK
        parts = list(dec.root.walk())
        for part in parts:
            if part.spill_path:
                assert Path(part.spill_path).resolve().is_relative_to(work.resolve())
            if part.flags & {"internal-error", "undecipherable"}:
                assert dec.unchecked, f"{part.path} failed without an UNCHECKED reason"
        for reason in dec.unchecked:
            assert reason.kind  # every reason carries a kind policy can act on
        assert_bounded(parts, len(raw))
        assert not any(sentinel.iterdir())
        assert set(os.listdir(base)) == {"outside", "work"}
        assert all(p.name.startswith("amavisd-") for p in work.iterdir())
        assert_no_links(base)
    finally:
        dec.cleanup()
    assert not any(work.iterdir()), "cleanup left files behind"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < MEMORY_CEILING
    if before is not None:  # this input's own peak, not one an earlier input reached
        grew = peak - before
        assert grew < INPUT_MEMORY + 2 * len(raw), f"one input took {grew >> 20} MiB"
    return dec.unchecked


_CLEAR_REFS: dict[int, int] = {}


def reset_peak() -> int | None:
    """Reset the process' peak RSS to its RSS now (Linux: "5" to
    /proc/self/clear_refs, ~7 us), so ru_maxrss after an input is that
    input's own peak; the RSS now back, or None where it cannot be reset
    (ru_maxrss is then the process' peak so far, still under MEMORY_CEILING).
    A jump of the whole process' peak (s22: ~1 GiB once in a random-MIME
    run, not reproduced in 30,000 inputs since) is then pinned on one input."""
    fd = _CLEAR_REFS.get(os.getpid())
    if fd is None:
        try:
            fd = _CLEAR_REFS[os.getpid()] = os.open("/proc/self/clear_refs", os.O_WRONLY)
        except OSError:
            fd = _CLEAR_REFS[os.getpid()] = -1
    if fd < 0:
        return None
    try:
        os.write(fd, b"5")
    except OSError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_BASES: dict[int, Path] = {}


def _base() -> tuple[Path, Path, Path]:
    """One base a process, made once and emptied after a failed input: a
    fresh temp dir an input cost a third of a small input's time (rmdir on
    ext4), and tmpfs, where there is one, is cheaper still. An input that
    passed left it as it found it (the checks above), so reuse hides nothing."""
    base = _BASES.get(os.getpid())
    if base is None:
        base = _BASES[os.getpid()] = new_base()
        atexit.register(shutil.rmtree, base, True)
    sentinel, work = base / "outside", base / "work"
    if set(os.listdir(base)) != {"outside", "work"} or any(sentinel.iterdir()) \
            or any(work.iterdir()):
        for entry in os.listdir(base):  # after a failure: back to a clean base
            path = base / entry
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        sentinel.mkdir()
        work.mkdir(mode=0o700)
    return base, sentinel, work


def new_base() -> Path:
    return Path(tempfile.mkdtemp(prefix="amfz", dir="/dev/shm" if os.access("/dev/shm", os.W_OK)
                                 else None))


def use_base(base: Path) -> None:
    """This process' inputs go under `base` (made and removed by a parent
    that outlives it: a forked child leaves with os._exit, or is killed)."""
    _BASES[os.getpid()] = base


def assert_bounded(parts: list, message_size: int) -> None:
    assert len(parts) <= LIMITS.max_parts + 1, f"{len(parts)} parts"
    assert max(p.depth for p in parts) <= LIMITS.max_depth + 1
    produced = sum(p.size for p in parts[1:])
    assert produced <= LIMITS.quota(message_size) + CHUNK_SLACK, f"{produced} bytes decoded"


def assert_no_links(top: Path) -> None:
    """No symlink and no second name for a file anywhere under `top`: an
    archive's link member is a flagged part, never a link on disk."""
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            assert not stat.S_ISLNK(st.st_mode), f"symlink {name} made in the work dir"
            assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), \
                f"{name}: not a regular file ({stat.filemode(st.st_mode)})"
            assert stat.S_ISDIR(st.st_mode) or st.st_nlink == 1, f"hard link {name} made"
