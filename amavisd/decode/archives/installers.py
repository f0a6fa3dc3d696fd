"""Installers whose payload is no standard archive: NSIS and InstallShield.

sfx.py finds their data inside a program and cuts it out as a child (NSIS's
first header, InstallShield's appended file table); detect.py names that child
"nsis" or "ishield"; it is opened here.

- NSIS (Nullsoft): the first header sits at a multiple of 512 bytes, flags,
  EF BE AD DE "NullsoftInst", the header's length and the length of all that
  follows. 7zz reads NSIS 2 and 3 (zlib, bzip2, LZMA; solid or not), boxed by
  `external.run_tool` like every tool here, `-tNsis` so that it tries no other
  format on the bytes. The block stays unexpanded: its header (the install
  script, the plug-in calls) is not all members, and it is small.
- InstallShield (MSI-based setup.exe, "InstallShield\\0" after the image): a
  file count, then per file a 0x104-byte name, sizes, and the file deflated,
  each byte's nibbles swapped and XORed with a key made from the file name
  (the layout ClamAV's libclamav/ishield.c reads). 7zz, cabextract and unar
  all say "not an archive"; the de-obfuscation is a table lookup and an XOR, and
  zlib inflates, so it is read in-process, every member streamed into the
  budget. Inside is usually an .msi (OLE2, office.py) whose cabinet stream
  (cab.py) holds the installed files. The program it came from is scanned
  whole, as every program is, but a file that does not inflate is content
  nobody here produces: `Undecipherable` (UNCHECKED). Not read: the newer
  "ISSetupStream" layout, and InstallShield's own cabinets ("ISc(": unshield
  reads them, it is not installed here).

An NSIS file 7zz cannot give (an error other than a CRC failure) makes the
block `Undecipherable` too, with what it did give scanned.

Never: use a member name as a path, inflate without an output bound, or trust
a size field before checking it against the file.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from amavisd.decode import external
from amavisd.decode.archives import members
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> at most size bytes

# -- NSIS --------------------------------------------------------------------------

NSIS_MAGIC = b"\xef\xbe\xad\xdeNullsoftInst"  # at offset 4 of the first header
NSIS_FIRST_HEADER = 28
NSIS_ALIGN = 512  # the installer looks for its data at these steps only
NSIS_FLAGS = 0x0F  # uninstall, silent, no CRC, force CRC


def nsis_length(read_at: ReadAt, pos: int, size: int) -> int | None:
    """Bytes from the first header at `pos` to the installer's end, or None
    when the header does not check out."""
    head = read_at(pos, NSIS_FIRST_HEADER)
    if pos % NSIS_ALIGN or len(head) < NSIS_FIRST_HEADER or head[4:20] != NSIS_MAGIC:
        return None
    flags, = struct.unpack_from("<I", head)
    header, total = struct.unpack_from("<II", head, 20)  # header: its unpacked length
    if flags & ~NSIS_FLAGS or not header or not NSIS_FIRST_HEADER < total <= size - pos:
        return None
    return total


@register("nsis")
def decode_nsis(part: Part, ctx: Context) -> None:
    if not external.available("7zz"):
        raise Undecipherable("NSIS needs 7zz, which is not installed")
    work = ctx.scratch_dir(part)
    try:  # the scratch dir goes at once, even when a limit stops the tool
        source = external.input_path(ctx, part, work, "input.nsis")
        out = os.path.join(work, "out")
        os.mkdir(out, 0o700)
        result = external.run_tool(ctx, ["7zz", "x", "-tNsis", "-y", "-aou", "-bd",
                                          f"-o{out}", "--", source], cwd=work, watch=out)
        members.harvest(ctx, part, out)
        report = external.SevenZipReport.read(result, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if report.failed or report.wrong_password:  # a file 7zz could not give
        raise Undecipherable(f"7zz exit {result.returncode} on NSIS: {report.said()}")
    if report.crc_failed:
        raise DecodeError(f"7zz on NSIS: {report.said()}")


# -- InstallShield -------------------------------------------------------------------

ISHIELD_MAGIC = b"InstallShield\0"
ISHIELD_HEADER = len(ISHIELD_MAGIC) + 0x20  # count, a word, six reserved (zero) words
ISHIELD_NAME = 0x104  # MAX_PATH
ISHIELD_ENTRY = ISHIELD_NAME + 52  # name, 2 words, packed size (64 bits), 9 words
ISHIELD_MAX_FILES = 4096
ISHIELD_KEY = bytes((0xEC, 0xCA, 0x79, 0xF8))
ISHIELD_KEY_PERIOD = 1024  # the key index restarts every 1024 bytes of a file
CHUNK = 1 << 20  # a multiple of the key period
OUT_CHUNK = 256 * 1024
_NIBBLES_SWAPPED = bytes(((b >> 4) | (b << 4)) & 0xFF for b in range(256))


@dataclass(frozen=True)
class IshieldFile:
    name: bytes
    start: int  # where its packed bytes begin
    size: int  # packed


def ishield_files(read_at: ReadAt, pos: int, size: int) -> list[IshieldFile] | None:
    """The file table at `pos`, or None when it does not check out: 1 to
    ISHIELD_MAX_FILES files, the reserved words zero, every name non-empty
    and printable, every file's bytes inside the `size` bytes there are."""
    head = read_at(pos, ISHIELD_HEADER)
    if len(head) < ISHIELD_HEADER or not head.startswith(ISHIELD_MAGIC):
        return None
    count, = struct.unpack_from("<I", head, len(ISHIELD_MAGIC))
    if not 0 < count <= ISHIELD_MAX_FILES or any(head[len(ISHIELD_MAGIC) + 8:]):
        return None
    files, at = [], pos + ISHIELD_HEADER
    for _ in range(count):
        entry = read_at(at, ISHIELD_ENTRY)
        if len(entry) < ISHIELD_ENTRY:
            return None
        name = entry[:ISHIELD_NAME].split(b"\0", 1)[0]
        packed, = struct.unpack_from("<Q", entry, ISHIELD_NAME + 8)
        at += ISHIELD_ENTRY
        if not name or any(c < 32 or c == 127 for c in name) or packed > size - at:
            return None
        files.append(IshieldFile(name, at, packed))
        at += packed
    return files


@register("ishield")
def decode_ishield(part: Part, ctx: Context) -> None:
    problems = []
    with part.open() as fh:
        def read_at(offset: int, length: int) -> bytes:
            fh.seek(offset)
            return fh.read(length)

        files = ishield_files(read_at, 0, part.size)
        if files is None:
            raise DecodeError("not an InstallShield file table")
        for item in files:
            try:
                members.stream_member(ctx, part, item.name, _inflated(read_at, item, ctx))
            except DecodeError as err:  # this member is cut short; the next may be fine
                problems.append(f"{members.clean_name(item.name)}: {err}")
    if problems:  # its bytes are all there (the table was checked): they do not inflate
        raise Undecipherable("; ".join(problems[:3]))
    part.flags.add("expanded")


def _inflated(read_at: ReadAt, item: IshieldFile, ctx: Context) -> Iterator[bytes]:
    """One file's bytes: de-obfuscated chunk by chunk, inflated in bounded pieces."""
    key = bytes(c ^ ISHIELD_KEY[n & 3] for n, c in enumerate(item.name))
    period = bytes(key[n % len(key)] for n in range(ISHIELD_KEY_PERIOD))
    mask = period * (CHUNK // ISHIELD_KEY_PERIOD)
    inflater = zlib.decompressobj()
    try:
        for offset in range(0, item.size, CHUNK):
            data = _plain(read_at(item.start + offset, min(CHUNK, item.size - offset)), mask)
            while not inflater.eof:
                out = inflater.decompress(data, OUT_CHUNK)
                if out:
                    yield out
                    ctx.budget.check_time()
                data = inflater.unconsumed_tail
                if not data and len(out) < OUT_CHUNK:  # all taken, nothing held back
                    break
            if inflater.eof:
                break
    except zlib.error as err:
        raise DecodeError(f"inflate: {err}") from None
    if item.size and not inflater.eof:
        raise DecodeError("deflate stream cut short")


def _plain(chunk: bytes, mask: bytes) -> bytes:
    """Nibbles swapped back, then the key XORed off (`chunk` starts at a multiple
    of the key period, `mask` is the key laid out over at least its length)."""
    swapped = chunk.translate(_NIBBLES_SWAPPED)
    return (int.from_bytes(swapped, "little") ^ int.from_bytes(mask[:len(chunk)], "little")
            ).to_bytes(len(chunk), "little")
