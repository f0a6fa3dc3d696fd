"""cpio: old binary (either byte order), odc (070707), newc (070701) and crc (070702).

Our own small reader: Python has no cpio module worth the name, and the
format is a fixed header, a name and the data. Against bsdtar -x run boxed
and harvested (best of 5): clam.newc.cpio (1 KiB) 0.2 ms vs 15 ms; 10 MiB
with 500 files 10 ms vs 190 ms. The part is read once, front to back.

Regular files become parts, and so does a symlink's data, its target
(flagged `link`: some readers write it as a file); directories, devices and
FIFOs do not. A member's size is bounded by the
budget (it is streamed through a sink) and by the data that is left; names
are labels only (members.clean_name). After "TRAILER!!!" and its padding,
a further header starts a further archive (cpio -A and concatenations);
other non-zero bytes there are reported. Must never extract anything.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from typing import BinaryIO

from amavisd.decode.archives.members import (
    CHUNK,
    Truncated,
    member_chunks,
    read_exact,
    stream_member,
)
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

MAX_NAME = 64 * 1024
TRAILER = b"TRAILER!!!"


@dataclass
class Entry:
    name: bytes
    mode: int
    size: int
    data_align: int  # the data is padded to a multiple of this


_DIGITS = {8: frozenset(b"01234567"), 16: frozenset(b"0123456789abcdefABCDEF")}


def _ascii_fields(header: bytes, widths: tuple[int, ...], base: int) -> list[int]:
    """Digits only: int() would also take a sign, spaces and underscores, and
    a negative mode or size then breaks the reader further on."""
    fields, pos = [], 0
    for width in widths:
        text = header[pos:pos + width]
        pos += width
        if len(text) != width or not set(text) <= _DIGITS[base]:
            raise DecodeError(f"cpio header field {text!r} is not a number")
        fields.append(int(text, base))
    return fields


def _newc(fh: BinaryIO, magic: bytes) -> Entry:
    """070701/070702: 13 eight-digit hex fields; name and data 4-aligned."""
    header = read_exact(fh, 104)
    (_ino, mode, _uid, _gid, _nlink, _mtime, size, _maj, _min, _rmaj, _rmin, namesize,
     _check) = _ascii_fields(header, (8,) * 13, 16)
    name = _read_name(fh, namesize, pad=(4 - (110 + namesize) % 4) % 4)
    return Entry(name, mode, size, 4)


def _odc(fh: BinaryIO, magic: bytes) -> Entry:
    """070707: octal fields, no padding anywhere."""
    header = read_exact(fh, 70)
    (_dev, _ino, mode, _uid, _gid, _nlink, _rdev, _mtime, namesize,
     size) = _ascii_fields(header, (6, 6, 6, 6, 6, 6, 6, 11, 6, 11), 8)
    return Entry(_read_name(fh, namesize, pad=0), mode, size, 1)


def _binary(fh: BinaryIO, magic: bytes) -> Entry:
    """Old binary: 13 16-bit words in the writer's byte order (told by how
    the magic 070707 reads); 32-bit values as two words, high word first;
    name and data 2-aligned."""
    order = "little" if magic == b"\xc7\x71" else "big"
    header = read_exact(fh, 24)
    words = [int.from_bytes(header[i:i + 2], order) for i in range(0, 24, 2)]
    mode, namesize = words[2], words[9]  # dev ino mode uid gid nlink rdev mtime(2) namesize
    size = words[10] << 16 | words[11]
    return Entry(_read_name(fh, namesize, pad=namesize % 2), mode, size, 2)


def _read_name(fh: BinaryIO, namesize: int, pad: int) -> bytes:
    if not 0 < namesize <= MAX_NAME:
        raise DecodeError(f"cpio name size {namesize} out of range")
    name = read_exact(fh, namesize + pad)[:namesize]
    return name.split(b"\0", 1)[0]


FORMATS = {
    b"070701": _newc,
    b"070702": _newc,
    b"070707": _odc,
    b"\xc7\x71": _binary,
    b"\x71\xc7": _binary,
}


def _read_entry(fh: BinaryIO, head: bytes) -> Entry | None:
    magic = head[:6] if head[:6] in FORMATS else head[:2]
    reader = FORMATS.get(magic)
    if reader is None:
        return None
    fh.seek(len(magic) - len(head), io.SEEK_CUR)  # back to just after the magic
    return reader(fh, magic)


def _is_member(entry: Entry) -> bool:
    kind = stat.S_IFMT(entry.mode)
    return kind == stat.S_IFREG or (kind == 0 and entry.size > 0)


@register("cpio")
def decode_cpio(part: Part, ctx: Context) -> None:
    problems: list[str] = []
    with part.open() as fh:
        try:
            _read_archives(fh, part, ctx, problems)
        except Truncated as err:
            part.flags.add("truncated")
            problems.append(str(err))
    if problems:
        raise DecodeError("; ".join(problems))
    part.flags.add("expanded")


def _read_archives(fh: BinaryIO, part: Part, ctx: Context, problems: list[str]) -> None:
    origin, entries = 0, 0  # padding is counted from the start of each archive
    while True:
        ctx.budget.check_time()
        head = fh.read(6)
        if not head:
            return
        entry = _read_entry(fh, head)
        if entry is None:
            if entries == 0:
                raise DecodeError("not a cpio archive")
            if head.strip(b"\0") or _skip_zeros(fh):
                problems.append(f"non-cpio data at offset {fh.tell() - len(head)}")
            return
        entries += 1
        if entry.name == TRAILER:
            if not _skip_zeros(fh):
                return
            origin = fh.tell()  # another archive follows its padding
            continue
        start = fh.tell()
        if _is_member(entry):
            stream_member(ctx, part, entry.name, member_chunks(fh, entry.size, ctx))
        elif entry.size and stat.S_ISLNK(entry.mode):
            link = stream_member(ctx, part, entry.name, member_chunks(fh, entry.size, ctx))
            link.flags.add("link")
        elif entry.size:
            _skip(fh, entry.size)
        end = start + entry.size - origin
        fh.seek(origin + end + (-end) % entry.data_align)


def _skip(fh: BinaryIO, size: int) -> None:
    fh.seek(size - 1, io.SEEK_CUR)
    if not fh.read(1):
        raise Truncated("entry data cut short")


def _skip_zeros(fh: BinaryIO) -> bool:
    """Skip zero bytes; True when something else follows."""
    while chunk := fh.read(CHUNK):
        rest = chunk.lstrip(b"\0")
        if rest:
            fh.seek(-len(rest), io.SEEK_CUR)
            return True
    return False


