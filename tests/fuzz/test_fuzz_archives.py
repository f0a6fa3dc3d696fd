"""One fuzz target per in-process reader: zip, tar, cpio, ar/deb, rpm, ISO,
OLE2, freeze, 7z, the single-stream decompressors, TNEF, BinHex, uuencode
and the self-extractor scanner.

Blind bytes never get past a magic number, so each target mutates real
seeds: archives made now by the real archivers (amavisd.testing.archivers)
and the shared corpus' samples of that format (under 256 KiB; bombs,
encrypted and corrupt ones are other tests' business). Checksums a reader
verifies first are repaired after mutating (harness.FIXUPS). Each input goes
through the real engine as a bare file, with the assertions of
`harness.check`. Readers that hand the bytes to an external tool (arj, lha,
arc, zoo, cab, rar, NSIS) stay in test_fuzz_decoders' mixed target: there
the tool is what is fuzzed, at ~25 ms an input.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amavisd.decode.engine import decompose
from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from tests.fuzz.harness import (
    ARCHIVES,
    FIXUPS,
    MAX_SEED,
    check,
    fix_7z,
    fix_tar,
    fix_zip,
    mutate,
)

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


@st.composite
def mutants(draw, target: str):
    return mutate(draw, st, list(seeds(target)), FIXUPS.get(target))


@pytest.mark.parametrize("target", list(TARGETS))
@given(data=st.data())
def test_mutated_seeds(target, data):
    if not seeds(target):
        pytest.skip(f"no {target} seed here: no archiver and no corpus sample")
    check(data.draw(mutants(target), label="input"), bare=True)


def test_every_target_has_seeds_here():
    """The fuzz run is only as wide as its seeds: on this machine each target
    has a real sample, and the checksum repairs give valid files back."""
    assert [t for t in TARGETS if not seeds(t)] == []
    for target, fix in FIXUPS.items():
        for seed in seeds(target)[:3]:
            repaired = bytearray(seed)
            fix(repaired)
            assert bytes(repaired) == seed, f"{target}: the repair changed a valid sample"


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
