"""Archives inside other parts: self-extracting programs, and archives behind a prefix.

A self-extractor is a program with an archive inside it, appended after its
image (7-Zip, WinRAR, LHA, zip -A, NSIS, InstallShield) or kept in a resource
(IExpress cabinets). The part stays a part to scan as it is; each archive found
in it becomes a child `<part name>@<offset>.<ext>` (its bytes from its start to
its computed end, or to the end of the file), which the registry then decodes
by content.

Finding: a signature is searched for, and a hit counts only when its header
checks out: a CRC where the format has one (7z start header, RAR 4/5 main
header, ARJ main header, LHA level 0/1 header sum and level 2 CRC-16), the
central directory walked record by record up to the end record for zip (or a
sane local header), consistent header fields for cab, NSIS and InstallShield.
That keeps plain programs (clam.exe, /bin/true) without children: code is full
of two-byte ARJ ids and "PK\\3\\4" constants. Where it is searched depends on
the part:
- programs (PE/MZ "exe", "elf", DOS "com", Amiga "amiga", Atari "tos"): every
  signature in the first and in the last SCAN_WINDOW bytes;
- binary parts that no decoder opens ("data": images, unknown files; "pdf"):
  what an unpacker itself opens behind a prefix, which is also what a sender
  uses to slip an archive past a type check: a zip from an end record in the
  last 64 KiB + 22 bytes (where the spec puts it, whatever precedes the zip;
  zip -A and every unzip work so), a rar, 7z, cab, arj or lha signature in the
  first PREFIX_WINDOW bytes (unrar's MAXSFXSIZE, 7-Zip's kMaxCheckStartPosition
  outside Windows). Never a zip from a lone local header there, the weakest
  test, nor installer data (only a program reads that). The search is the
  probe, so at the depth limit only a real find makes the part UNCHECKED.
  It costs about 4 ms per MiB searched (a pass per signature), so 17 ms at
  most; on the real-mail corpus 46 us a part on average. Text parts are not
  searched (textual.py decodes them).

Never: mark the part expanded (its own bytes are what the scanners must see),
run it, or read it outside its windows.
"""

from __future__ import annotations

import mmap
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from amavisd.decode import window
from amavisd.decode.archives import installers, legacy
from amavisd.decode.archives.members import clean_name
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, register
from amavisd.decode.textual import has_yenc, yenc_in_text

SCAN_WINDOW = 32 * 1024 * 1024  # bytes of a program searched at its start and at its end
PREFIX_WINDOW = 4 * 1024 * 1024  # bytes of another part searched for a signature
ZIP_TAIL = 22 + 0xFFFF  # an end record and the longest comment it can have
MAX_HITS = 4096  # candidate positions checked per signature and window
MAX_RECORDS = 1 << 18  # table records (zip directory, InstallShield files) one search reads
MAX_CRC16_BYTES = 1 << 20  # header bytes one search runs through the pure-Python CRC-16
MAX_EMBEDDED = 32  # archives taken from one part
CHUNK = 1 << 20
PROGRAMS = ("exe", "elf", "com", "amiga", "tos")
PREFIXED = ("data", "pdf")  # binary parts with no decoder of their own

Buffer = bytes | mmap.mmap


@dataclass(frozen=True)
class Embedded:
    start: int
    end: int
    ext: str


Check = Callable[[Buffer, int], Embedded | None]


@dataclass(frozen=True)
class Finder:
    signature: bytes
    offset: int  # of the signature inside the header `check` reads
    check: Check
    behind_prefix: str  # where a non-program part is searched: "start", "end" or "" (not)


FINDERS: list[Finder] = []


@dataclass
class Work:
    """What one search may still spend past its signatures. Without one shared
    allowance a part full of end records, each pointing at a directory of 65535
    entries, costs MAX_HITS x 65535 steps (400 such records: 9 s)."""

    records: int = MAX_RECORDS
    crc16_bytes: int = MAX_CRC16_BYTES


_work: ContextVar[Work] = ContextVar("sfx_work")


def finder(signature: bytes, offset: int = 0, behind_prefix: str = "start"
           ) -> Callable[[Check], Check]:
    def wrap(fn: Check) -> Check:
        FINDERS.append(Finder(signature, offset, fn, behind_prefix))
        return fn

    return wrap


def has_prefixed_archive(part: Part) -> bool:
    with mapped(part) as buf:
        return bool(find_embedded(buf, program=False)) or has_yenc(buf)


@register(*PROGRAMS)
def decode_sfx(part: Part, ctx: Context) -> None:
    cut_out(part, ctx, program=True)


@register(*PREFIXED, probe=has_prefixed_archive)
def decode_prefixed(part: Part, ctx: Context) -> None:
    cut_out(part, ctx, program=False)
    with mapped(part) as buf:  # a text whose yEnc bytes made it sniff as "data"
        yenc_in_text(part, buf, ctx)


def cut_out(part: Part, ctx: Context, program: bool) -> None:
    """Each archive found in `part` as a child, copied out chunk by chunk."""
    base = clean_name(part.name).rsplit("/", 1)[-1] or part.id
    with mapped(part) as buf:
        for found in find_embedded(buf, ctx, program):
            sink = ctx.sink(part, name=f"{base}@{found.start}.{found.ext}")
            try:  # read from the file, not faulted into the mapping and held there
                for pos in range(found.start, found.end, CHUNK):
                    sink.write(window.copy(buf, pos, min(pos + CHUNK, found.end)))
            except BaseException:
                sink.finish(truncated=True)
                raise
            sink.finish()


def find_embedded(buf: Buffer, ctx: Context | None = None, program: bool = True
                  ) -> list[Embedded]:
    """The archives inside `buf`, in file order, none inside another; `program`
    False searches as for a part that is no program (see the module doc)."""
    token = _work.set(Work(MAX_RECORDS, MAX_CRC16_BYTES))
    try:
        candidates = _candidates(buf, ctx, program)
    finally:
        _work.reset(token)
    kept: list[Embedded] = []
    for hit in sorted(candidates, key=lambda h: (h.start, h.end)):
        if not kept or hit.start >= kept[-1].end:
            kept.append(hit)
            if len(kept) == MAX_EMBEDDED:
                break
    return kept


def _candidates(buf: Buffer, ctx: Context | None, program: bool) -> list[Embedded]:
    candidates: list[Embedded] = []
    for found in FINDERS:
        where = "program" if program else found.behind_prefix
        if not where:
            continue
        for pos in _positions(buf, found.signature, where):
            if ctx is not None:
                ctx.budget.check_time()
            if pos >= found.offset and (hit := found.check(buf, pos - found.offset)) \
                    is not None and hit.start > 0:
                candidates.append(hit)
    return candidates


def _windows(size: int, where: str) -> list[tuple[int, int]]:
    if where == "start":
        return [(0, min(size, PREFIX_WINDOW))]
    if where == "end":
        return [(max(0, size - ZIP_TAIL), size)]
    windows = [(0, min(size, SCAN_WINDOW))]
    if size > SCAN_WINDOW:
        windows.append((max(SCAN_WINDOW, size - SCAN_WINDOW), size))
    return windows


def _positions(buf: Buffer, signature: bytes, where: str) -> Iterator[int]:
    for start, end in _windows(len(buf), where):
        pos, hits = buf.find(signature, start, end), 0
        while pos >= 0 and hits < MAX_HITS:
            yield pos
            hits += 1
            pos = buf.find(signature, pos + 1, end)


@contextmanager
def mapped(part: Part) -> Iterator[Buffer]:
    """The part's bytes without reading a spilled part into memory."""
    if not part.spill_path:
        yield part.data
        return
    with open(part.spill_path, "rb") as fh:
        if part.size == 0:
            yield b""
            return
        view = window.map_fd(fh.fileno(), part.size)
        try:
            yield view
        finally:
            window.close(view)


def _u16(buf: Buffer, pos: int) -> int:
    return struct.unpack_from("<H", buf, pos)[0]


def _u32(buf: Buffer, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


# -- zip ---------------------------------------------------------------------

ZIP_LOCAL = b"PK\x03\x04"
ZIP_CENTRAL = b"PK\x01\x02"
ZIP_SIGNATURE = b"PK\x05\x05"  # the central directory's digital signature
ZIP_METHODS = frozenset({0, 1, 6, 8, 9, 12, 14, 19, 93, 95, 96, 97, 98, 99})


@finder(b"PK\x05\x06", behind_prefix="end")
def zip_from_end(buf: Buffer, pos: int) -> Embedded | None:
    """A zip located from its end record: its central directory, `entries`
    records that end exactly at the end record (after an optional digital
    signature), and the first record says where the first member starts
    (relative to the zip, or to the file when `zip -A` adjusted the offsets)."""
    if pos + 22 > len(buf):
        return None
    entries, cd_size, cd_offset, comment = struct.unpack_from("<HIIH", buf, pos + 10)
    cd_start = pos - cd_size
    if entries == 0 or cd_start < 0 or not _central_directory_ends_at(buf, cd_start, entries, pos):
        return None
    first_local = _u32(buf, cd_start + 42)
    for base in (cd_start - cd_offset, 0):
        start = base + first_local
        if 0 <= start < cd_start and buf[start:start + 4] == ZIP_LOCAL:
            return Embedded(start, min(len(buf), pos + 22 + comment), "zip")
    return None


def _central_directory_ends_at(buf: Buffer, pos: int, entries: int, end: int) -> bool:
    for _ in range(entries):
        if not _spend_record() or pos + 46 > end or buf[pos:pos + 4] != ZIP_CENTRAL:
            return False
        name, extra, comment = struct.unpack_from("<HHH", buf, pos + 28)
        pos += 46 + name + extra + comment
    if pos + 6 <= end and buf[pos:pos + 4] == ZIP_SIGNATURE:
        pos += 6 + _u16(buf, pos + 4)
    return pos == end


@finder(ZIP_LOCAL, behind_prefix="")
def zip_from_local_header(buf: Buffer, pos: int) -> Embedded | None:
    """A zip with no usable end record (cut short): a sane first local header."""
    if pos + 30 > len(buf):
        return None
    version, flags, method = struct.unpack_from("<HHH", buf, pos + 4)
    packed, = struct.unpack_from("<I", buf, pos + 18)
    name_len, extra_len = struct.unpack_from("<HH", buf, pos + 26)
    if (version & 0xFF) > 63 or method not in ZIP_METHODS or not 0 < name_len <= 1024:
        return None
    name = bytes(buf[pos + 30:pos + 30 + name_len])
    if len(name) < name_len or any(c < 32 for c in name) or extra_len > 4096:
        return None
    if not flags & 0x08 and packed != 0xFFFFFFFF and pos + 30 + name_len + packed > len(buf):
        return None
    return Embedded(pos, len(buf), "zip")


# -- rar, 7z, cab --------------------------------------------------------------

@finder(b"Rar!\x1a\x07")
def rar(buf: Buffer, pos: int) -> Embedded | None:
    """RAR 4: main header (type 0x73) with its CRC-16; RAR 5: main header CRC-32."""
    if buf[pos + 6:pos + 7] == b"\x00":
        if pos + 14 > len(buf):
            return None
        crc, kind, _flags, size = struct.unpack_from("<HBHH", buf, pos + 7)
        if kind != 0x73 or size < 13 or (zlib.crc32(buf[pos + 9:pos + 7 + size]) & 0xFFFF) != crc:
            return None
        return Embedded(pos, len(buf), "rar")
    if buf[pos + 6:pos + 8] == b"\x01\x00":
        crc = _u32(buf, pos + 8) if pos + 12 <= len(buf) else -1
        size, width = _vint(buf, pos + 12)
        if size is None or not 0 < size < 1 << 16:
            return None
        if zlib.crc32(buf[pos + 12:pos + 12 + width + size]) != crc:
            return None
        return Embedded(pos, len(buf), "rar")
    return None


def _vint(buf: Buffer, pos: int) -> tuple[int | None, int]:
    value = 0
    for n in range(4):
        if pos + n >= len(buf):
            return None, 0
        byte = buf[pos + n]
        value |= (byte & 0x7F) << (7 * n)
        if not byte & 0x80:
            return value, n + 1
    return None, 0


@finder(b"7z\xbc\xaf\x27\x1c")
def sevenzip(buf: Buffer, pos: int) -> Embedded | None:
    """7z: the start header's CRC-32 covers where the archive ends."""
    if pos + 32 > len(buf) or buf[pos + 6] != 0:
        return None
    if zlib.crc32(buf[pos + 12:pos + 32]) != _u32(buf, pos + 8):
        return None
    next_offset, next_size = struct.unpack_from("<QQ", buf, pos + 12)
    return Embedded(pos, min(len(buf), pos + 32 + next_offset + next_size), "7z")


@finder(b"MSCF\0\0\0\0")
def cab(buf: Buffer, pos: int) -> Embedded | None:
    """A cabinet header whose fields agree: version 1.3, a folder and a file,
    the file table inside the cabinet."""
    if pos + 36 > len(buf):
        return None
    size, files_at = _u32(buf, pos + 8), _u32(buf, pos + 16)
    minor, major, folders, files, flags = struct.unpack_from("<BBHHH", buf, pos + 24)
    if (major, minor) != (1, 3) or not folders or not files or flags > 7:
        return None
    if not 36 <= files_at < size:
        return None
    return Embedded(pos, min(len(buf), pos + size), "cab")


# -- arj, lha ------------------------------------------------------------------

@finder(legacy.ARJ_ID)
def arj(buf: Buffer, pos: int) -> Embedded | None:
    header = legacy.read_arj_header(buf, pos)
    if header is None or header.file_type != legacy.ARJ_MAIN:
        return None
    return Embedded(pos, len(buf), "arj")


LHA_METHOD = re.compile(rb"-(lh[0-7dx]|lz[s45]|pm[0-2s])-")


def _lha(buf: Buffer, pos: int) -> Embedded | None:
    """An LHA header: level 0/1 by its byte sum, level 2 by its CRC-16."""
    head = bytes(buf[pos:pos + 24])
    if len(head) < 24 or not LHA_METHOD.fullmatch(head[2:7]):
        return None
    level = head[20]
    if level in (0, 1):
        size = head[0]
        body = bytes(buf[pos + 2:pos + 2 + size])
        if size < 20 or len(body) < size or sum(body) & 0xFF != head[1]:
            return None
    elif level == 2:
        if not _lha2_crc_ok(buf, pos, _u16(head, 0)):
            return None
    else:
        return None
    return Embedded(pos, len(buf), "lzh")


def _lha2_crc_ok(buf: Buffer, pos: int, size: int) -> bool:
    header = bytearray(buf[pos:pos + size])
    if not 26 <= size <= 4096 or len(header) < size:
        return False
    work = _work.get(Work())
    if work.crc16_bytes < size:
        return False
    work.crc16_bytes -= size
    ext = 24
    while ext + 2 <= size:
        length = _u16(header, ext)
        if length == 0:
            return False
        if length >= 5 and ext + 5 <= size and header[ext + 2] == 0x00:  # the common header
            stored = _u16(header, ext + 3)
            header[ext + 3:ext + 5] = b"\0\0"
            return crc16(header) == stored
        ext += length
    return False


for _id in (b"-lh", b"-lz", b"-pm"):
    finder(_id, offset=2)(_lha)


# -- installers (installers.py reads them) ------------------------------------------

@finder(installers.NSIS_MAGIC, offset=4, behind_prefix="")
def nsis(buf: Buffer, pos: int) -> Embedded | None:
    total = installers.nsis_length(_reader(buf), pos, len(buf))
    return None if total is None else Embedded(pos, pos + total, "nsis")


@finder(installers.ISHIELD_MAGIC, behind_prefix="")
def installshield(buf: Buffer, pos: int) -> Embedded | None:
    files = installers.ishield_files(_reader(buf), pos, len(buf))
    if not files:
        return None
    return Embedded(pos, files[-1].start + files[-1].size, "ishield")


def _reader(buf: Buffer) -> installers.ReadAt:
    """Reads for a table walker, each one a record spent: out of work, they come back empty."""
    return lambda pos, size: bytes(buf[pos:pos + size]) if _spend_record() else b""


def _spend_record() -> bool:
    work = _work.get(Work())  # a check called outside find_embedded gets a fresh allowance
    work.records -= 1
    return work.records >= 0


def _crc16_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes | bytearray) -> int:
    """CRC-16/ARC, the LHA header and member checksum."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC16[(crc ^ byte) & 0xFF]
    return crc
