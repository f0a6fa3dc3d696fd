"""One fuzz target per in-process reader: zip, tar, cpio, ar/deb, rpm, ISO,
OLE2, freeze, 7z, the single-stream decompressors, TNEF, BinHex, uuencode
and the self-extractor scanner.

Blind bytes never get past a magic number, so each target mutates real
seeds: archives made now by the real archivers (amavisd.testing.archivers)
and the shared corpus' samples of that format (under 256 KiB; bombs,
encrypted and corrupt ones are other tests' business), mutated by
tests/fuzz/mutate.py; checksums a reader verifies first are repaired after
mutating (tests/fuzz/repair.py). Each input goes through the real engine as
a bare file, with the assertions of `harness.check`, driven by the direct
driver (tests/fuzz/direct.py): CI_INPUTS a target here, the same ones every
run; `make fuzz-mutate` runs 100,000 a target from a fresh seed. Readers that hand the bytes to an external tool (arj, lha,
arc, zoo, cab, rar, NSIS) stay in test_fuzz_decoders' mixed target: there
the tool is what is fuzzed, at ~25 ms an input.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from collections import defaultdict
from functools import cache

import lz4.frame
import pytest

from amavisd.decode.engine import decompose
from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from tests.fuzz import direct
from tests.fuzz.harness import ARCHIVES, MAX_SEED
from tests.fuzz.mutate import mutate
from tests.fuzz.repair import FIXUPS, fix_7z, fix_gzip, fix_lz4, fix_tar, fix_zip

# target -> (formats the real archivers make here, corpus folders)
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "zip": (["zip"], ["zip"]),
    "tar": (["tar"], ["tar"]),
    "cpio": (["cpio"], ["cpio"]),
    "ar": (["ar", "deb"], ["deb-ar"]),
    "rpm": (["rpm"], ["rpm"]),
    "iso": (["iso"], ["iso"]),
    "ole2": ([], ["ole2-office"]),
    "freeze": ([], ["freeze-F"]),
    "7z": (["7z"], ["7z"]),
    "gzip": (["gz"], ["gzip"]),
    "bzip2": (["bz2"], ["bzip2"]),
    "xz": (["xz", "lzma"], ["xz"]),
    "zstd": (["zst"], ["zstd"]),
    "lz4": (["lz4"], ["lz4"]),
    "lzip": (["lz"], []),
    "compress": (["Z"], ["compress-Z"]),
    "tnef": ([], ["tnef"]),
    "binhex": ([], ["binhex"]),
    "uuencode": ([], ["uuencode"]),
    "sfx": ([], ["sfx-exe"]),
}
FILES = {"eicar.com": EICAR, "readme.txt": b"hello " * 50, "dir/deeper/a.bin": bytes(range(256))}


@cache
def seeds(target: str) -> tuple[bytes, ...]:
    formats, folders = TARGETS[target]
    out = []
    for fmt in formats:
        if archivers.available(fmt) is None:
            files = {"eicar.com": EICAR} if fmt in archivers.SINGLE_STREAM else FILES
            try:
                out.append(archivers.build(fmt, files))
            except ValueError:  # a flat format (ar): no directories
                out.append(archivers.build(fmt, {n.rsplit("/", 1)[-1]: d
                                                 for n, d in files.items()}))
    for folder in folders:
        if (ARCHIVES / folder).is_dir():
            out += [p.read_bytes() for p in sorted((ARCHIVES / folder).rglob("*"))
                    if p.is_file() and p.stat().st_size <= MAX_SEED]
    if target == "sfx" and archivers.available("zip") is None:
        # a DOS stub with a zip behind it, the shape the sfx scanner looks for
        out.append(b"MZ" + bytes(62) + b"This program cannot be run in DOS mode" + bytes(400)
                   + archivers.build("zip", FILES))
    return tuple(out)


def warm_up() -> None:
    for target in TARGETS:
        seeds(target)


def direct_targets() -> list[direct.Target]:
    def maker(target: str):
        return lambda rng: mutate(rng, seeds(target), FIXUPS.get(target))
    return [direct.Target(name, maker(name), bare=True, warm=lambda name=name: seeds(name))
            for name in TARGETS]


# Inputs a target in the default run, by cost, so the file stays well under
# 20 s: in-process readers at 400-6,000 inputs a CPU-second get 200; the
# single-stream ones (a salvage tool run on most damaged streams), ar, ISO,
# 7z and uuencode, at 100-300, get 100; freeze (a pure-Python decoder, ~30)
# and sfx (a tool run most inputs, ~40) get 30.
CI_INPUTS = 100
CI_COUNTS = {"zip": 200, "tar": 200, "cpio": 200, "rpm": 200, "ole2": 200, "tnef": 200,
             "binhex": 200, "freeze": 30, "sfx": 30}


@pytest.mark.parametrize("target", list(TARGETS))
def test_mutated_seeds(target):
    if not seeds(target):
        pytest.skip(f"no {target} seed here: no archiver and no corpus sample")
    count = CI_COUNTS.get(target, CI_INPUTS)
    result = direct.fuzz(direct.targets()[target], count, seed=0)
    # "passed" only: a decoder that raised on an input (kept UNCHECKED, so
    # fail-closed, but a bug) says "passed, decoders raised"
    assert result.outcome == "passed", f"{result.detail}; replay: {result.finding}"
    assert result.inputs == count


def test_every_target_has_seeds_here():
    """The fuzz run is only as wide as its seeds: on this machine each target
    has a real sample, and the checksum repairs give valid files back."""
    assert [t for t in TARGETS if not seeds(t)] == []
    kept = 0
    for target, fix in FIXUPS.items():
        for seed in seeds(target) if target in TARGETS else ():
            mended = bytearray(seed)
            fix(mended)
            if bytes(mended) != seed:
                # only a corpus sample broken on purpose (a bad CRC) may change
                assert BROKEN[target](seed), f"{target}: the repair changed a valid sample"
            kept += 1
    assert kept >= 100


def _zip_broken(data: bytes) -> bool:
    return zipfile.ZipFile(io.BytesIO(data)).testzip() is not None


def _gzip_broken(data: bytes) -> bool:
    try:
        gzip.decompress(data)
    except (OSError, EOFError):
        return True
    return False


BROKEN = defaultdict(lambda: lambda data: False, zip=_zip_broken, gzip=_gzip_broken)


def member_names(data: bytearray) -> list[str]:
    result = decompose(bytes(data), bare_file=True)
    result.cleanup()
    return [part.name for part in result.root.children]


def test_repairs_take_a_mutant_past_the_checksums():
    """A mutated tar header is a tar again after fix_tar; a zip whose stored
    member changed passes zipfile's CRC test after fix_zip; a 7z whose
    header changed has both header CRCs right after fix_7z."""
    tar = bytearray(archivers.build("tar", {"a.txt": b"x" * 10}))
    tar[0] = ord("b")  # the first member's name
    assert member_names(tar) == []
    fix_tar(tar)
    assert member_names(tar) == ["b.txt"]

    stored = bytearray(archivers.build("zip", {"a.txt": b"ab"}))  # too short to compress
    at = stored.index(b"ab", 30)
    stored[at] = ord("X")
    assert zipfile.ZipFile(io.BytesIO(bytes(stored))).testzip() == "a.txt"
    fix_zip(stored)
    assert zipfile.ZipFile(io.BytesIO(bytes(stored))).testzip() is None

    sz = bytearray(archivers.build("7z", {"a.txt": b"x" * 10}))
    offset, size = struct.unpack_from("<QQ", sz, 12)
    sz[32 + offset + size - 1] ^= 0xFF
    fix_7z(sz)
    header = sz[32 + offset:32 + offset + size]
    assert struct.unpack_from("<I", sz, 8)[0] == zlib.crc32(sz[12:32])
    assert struct.unpack_from("<I", sz, 28)[0] == zlib.crc32(header)


def test_repairs_of_compressed_members_and_frames():
    """A deflated zip member whose data changed gets the CRC and size of
    what it now inflates to, and a member spliced in front moves the end
    record's offset; a gzip member with a changed block gets its trailer
    back; an lz4 frame whose descriptor changed gets its header checksum."""
    data = archivers.build("zip", {"a.txt": b"hello " * 200})
    deflated = bytearray(data)
    at = deflated.index(b"PK\x03\x04") + 30 + len("a.txt") + 2
    deflated[at] ^= 0x04  # a literal in the first deflate block
    fix_zip(deflated)
    with zipfile.ZipFile(io.BytesIO(bytes(deflated))) as archive:
        assert archive.testzip() is None
        assert archive.read("a.txt") != b"hello " * 200

    shifted = bytearray(data)
    shifted[:0] = b"junk" * 10
    fix_zip(shifted)
    with zipfile.ZipFile(io.BytesIO(bytes(shifted))) as archive:
        assert archive.read("a.txt") == b"hello " * 200

    gz = bytearray(gzip.compress(b"hello " * 200, mtime=0))
    gz[12] ^= 0x04
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(bytes(gz))
    fix_gzip(gz)
    assert gzip.decompress(bytes(gz)) != b"hello " * 200

    lz = bytearray(lz4.frame.compress(b"hello " * 200, content_checksum=False))
    lz[5] = 0x50  # block maximum 64 KiB -> 256 KiB
    with pytest.raises(RuntimeError):
        lz4.frame.decompress(bytes(lz))
    fix_lz4(lz)
    assert lz4.frame.decompress(bytes(lz)) == b"hello " * 200
