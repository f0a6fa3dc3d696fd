"""What every decoder fuzz target asserts about one input, and the mutations
that make its inputs.

`check(raw)` runs the real decode engine with a private work dir under a
base of its own (one a process, see `_base`) and asserts, after each input:
nothing escapes (a decoder's failure is a flag plus an UNCHECKED reason),
every spilled byte and every entry on disk lies in the message's own work
dir, no symlink or hard link was made, the output stays within the limits
(parts, depth, bytes), the input took bounded time (SIGALRM: a hang is a
failure, not a stuck run) and memory, and cleanup leaves nothing behind.

`mutate(draw, seeds, fixup)` starts from real samples (made by the real
archivers, or from the shared corpus) and flips, cuts, repeats, splices and
overwrites integer fields; `fixup` then repairs the checksums that would stop
a mutant at the first gate (tar header sums, 7z header CRCs, stored zip
member CRCs), so the mutation reaches the code behind them.
"""

from __future__ import annotations

import atexit
import os
import resource
import shutil
import signal
import stat
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits

REPO = Path(__file__).resolve().parents[2]
ARCHIVES = Path(os.environ.get("AMAVISD_CORPUS", REPO.parent / "shared" / "corpus")) / "archives"
MAX_SEED = 256 * 1024  # corpus samples used as seeds; bigger ones make slow inputs
LIMITS = Limits(max_time=10.0, min_quota=16 * 1024 * 1024, max_parts=500, tool_timeout=5.0)
HANG_SLACK = 20  # seconds past max_time before an input counts as a hang
MEMORY_CEILING = 1536 * 1024 * 1024  # VmHWM of the whole test process
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
    return dec.unchecked


_BASES: dict[int, Path] = {}


def _base() -> tuple[Path, Path, Path]:
    """One base a process, made once and emptied after a failed input: a
    fresh temp dir an input cost a third of a small input's time (rmdir on
    ext4), and tmpfs, where there is one, is cheaper still. An input that
    passed left it as it found it (the checks above), so reuse hides nothing."""
    base = _BASES.get(os.getpid())
    if base is None:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        base = _BASES[os.getpid()] = Path(tempfile.mkdtemp(prefix="amfz", dir=shm))
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


# -- mutations -----------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def mutate(draw, st, seeds: list[bytes], fixup: Callable[[bytearray], None] | None = None
           ) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        kind = draw(st.sampled_from(list(MUTATIONS)))
        at = draw(st.integers(0, len(data) - 1))
        MUTATIONS[kind](draw, st, data, at, seeds)
    if fixup is not None and draw(st.integers(0, 3)):  # mostly repaired, sometimes not
        try:
            fixup(data)
        except (struct.error, IndexError, ValueError):
            pass  # mutated past repair: the decoder gets it as it is
    return bytes(data)


def _flip(draw, st, data, at, seeds):
    data[at] ^= draw(st.integers(1, 255))


def _cut(draw, st, data, at, seeds):
    del data[at:]


def _dup(draw, st, data, at, seeds):
    data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))


def _insert(draw, st, data, at, seeds):
    data[at:at] = draw(st.binary(min_size=1, max_size=32))


def _zero(draw, st, data, at, seeds):
    data[at:at + draw(st.integers(1, 16))] = b"\0" * 4


def _integer(draw, st, data, at, seeds):
    """A size, count or offset field set to an edge value: the usual way a
    reader is talked into a huge allocation or a read past the end."""
    fmt = draw(st.sampled_from(["<H", "<I", ">H", ">I", "<Q"]))
    value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * struct.calcsize(fmt))) - 1)
    packed = struct.pack(fmt, value)
    data[at:at + len(packed)] = packed


def _splice(draw, st, data, at, seeds):
    other = draw(st.sampled_from(seeds))
    if other:
        start = draw(st.integers(0, len(other) - 1))
        chunk = other[start:start + draw(st.integers(1, 4096))]
        data[at:at + len(chunk)] = chunk  # over what was there: offsets behind stay put


MUTATIONS = {"flip": _flip, "cut": _cut, "dup": _dup, "insert": _insert, "zero": _zero,
             "integer": _integer, "splice": _splice}


# -- checksum repairs ------------------------------------------------------------

def fix_tar(data: bytearray) -> None:
    """Every 512-byte block that looks like a ustar/gnu header gets its sum back."""
    for off in range(0, len(data) - 511, 512):
        block = data[off:off + 512]
        if block[257:262] != b"ustar" and not (off == 0 and any(block[:100])):
            continue
        stored = block[148:156]
        block[148:156] = b" " * 8
        total = sum(block) & 0o777777
        try:
            if int(bytes(stored).strip(b" \0") or b"-1", 8) == total:
                continue
        except ValueError:
            pass
        data[off + 148:off + 156] = b"%06o\0 " % total


def fix_7z(data: bytearray) -> None:
    """The next header's CRC, then the start header's CRC over it."""
    if data[:6] != b"7z\xbc\xaf\x27\x1c" or len(data) < 32:
        return
    offset, size = struct.unpack_from("<QQ", data, 12)
    header = data[32 + offset:32 + offset + size]
    if len(header) == size:
        struct.pack_into("<I", data, 28, zlib.crc32(header))
    struct.pack_into("<I", data, 8, zlib.crc32(data[12:32]))


def fix_zip(data: bytearray) -> None:
    """Stored members' CRCs, in the local and the central header, from the
    bytes that now follow the local header."""
    at = data.find(b"PK\x01\x02")
    while at != -1 and at + 46 <= len(data):
        (method,) = struct.unpack_from("<H", data, at + 10)
        (size,) = struct.unpack_from("<I", data, at + 20)
        (local,) = struct.unpack_from("<I", data, at + 42)
        if method == 0 and data[local:local + 4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
            start = local + 30 + name_len + extra_len
            crc = zlib.crc32(data[start:start + size])
            struct.pack_into("<I", data, local + 14, crc)
            struct.pack_into("<I", data, at + 16, crc)
        at = data.find(b"PK\x01\x02", at + 46)


FIXUPS: dict[str, Callable[[bytearray], None]] = {"tar": fix_tar, "7z": fix_7z, "zip": fix_zip}
