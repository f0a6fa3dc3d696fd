"""tar (ustar, GNU, pax, old v7, sparse members), read in-process.

The standard library's tarfile in stream mode ("r|") reads the part once,
front to back, and each regular member is streamed as a child through the
budget. In-process because tarfile is complete and a tar needs no
decompression; against tar(1) -x run boxed and harvested (best of 5):
      t.tar (10 KiB, 1 file)          0.4 ms    tar(1) 6.6 ms
      TestData.tar (26 KiB, 5 files)  0.6 ms    tar(1) 7.4 ms
      10 MiB, 500 files               23 ms     tar(1) 201 ms

Beyond what tarfile does on its own:
- extended headers (pax, GNU long names) over 1 MiB are refused before
  tarfile reads them whole into memory;
- tarfile stops at the first zero or invalid block; what follows is looked
  at block by block: a valid header starts a further run (concatenated
  archives, data after a corrupt header), other non-zero bytes flag the part;
- the member list tarfile keeps is emptied as we go (bounded memory);
- a pax "size" record that differs from the member header's own size field
  makes two readings (tarfile and GNU tar honour the record, a reader that
  ignores pax headers does not, and finds the next header elsewhere, inside
  what the first reading takes for data): both are read.

It must never extract: directories, devices, FIFOs and hard links give no
part; a symlink gives a part holding its target, flagged `link` (7-Zip
without -snl writes a link as a file of its target: scanned, never
followed); member names are only labels (members.clean_name).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from amavisd.decode.archives.members import add_member, is_ours, stream_member
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

BLOCK = 512
MAX_READINGS = 16  # readings a tar: the first, and those by header sizes pax records overrode
CHUNK = 1024 * 1024
MAX_EXTENDED_HEADER = 1024 * 1024
# What tarfile raises on bad input (its pax parsing lets ValueError through).
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, OverflowError, UnicodeError)
PADDING = b"\0\n\r\t "  # what writers leave after the end blocks: harmless, ignored
EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                  tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized or negative sizes before tarfile
    acts on them (tarfile would read an extended header whole)."""

    def _proc_member(self, tarfile_):  # tarfile's (stable, private) dispatch hook
        if self.size < 0:
            raise tarfile.InvalidHeaderError(f"negative size {self.size}")
        if self.type in EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.InvalidHeaderError(f"extended header of {self.size} bytes")
        return super()._proc_member(tarfile_)


@register("tar")
def decode_tar(part: Part, ctx: Context) -> None:
    problems: list[str] = []
    others: list[int] = []  # where a reader ignoring pax sizes finds a next header
    with part.open() as raw:
        starts, done = [0], 0
        while starts and done < MAX_READINGS:
            start, done = starts.pop(0), done + 1
            while start is not None:
                ctx.budget.check_time()
                raw.seek(start)
                end = _read_run(raw, part, ctx, problems, first=start == 0, others=others)
                if end is None:
                    break
                start = _next_header(raw, max(end, start + BLOCK), ctx, problems)
            starts += others
            others.clear()
    if problems:
        raise DecodeError("; ".join(problems[:5]))
    part.flags.add("expanded")


def _read_run(raw: BinaryIO, part: Part, ctx: Context, problems: list[str],
              first: bool, others: list[int]) -> int | None:
    """Members from one tar stream starting at the raw file's position.
    Returns the absolute offset where tarfile stopped, or None when the rest
    cannot be read (truncated member data)."""
    base = raw.tell()
    try:
        archive = tarfile.open(fileobj=raw, mode="r|", tarinfo=_BoundedTarInfo)
    except TAR_ERRORS as err:
        if is_ours(err):
            raise
        if first:
            raise DecodeError(f"not a readable tar: {err}") from None
        problems.append(f"unreadable data at offset {base}")
        return base + BLOCK
    try:
        while True:
            ctx.budget.check_time()
            info = archive.next()
            archive.members.clear()  # kept by tarfile for random access we never use
            if info is None:
                return base + archive.offset
            other = _unextended_end(raw, base, info)
            if other is not None:
                others.append(other)
                problems.append(f"member {info.name!r}: its pax size differs from its "
                                "header's, read both ways")
            _add_member(archive, info, part, ctx, part.size - base)
    except TAR_ERRORS as err:
        if is_ours(err):
            raise
        part.flags.add("truncated")
        problems.append(f"member data cut short or corrupt: {err}")
        return None


def _add_member(archive: tarfile.TarFile, info: tarfile.TarInfo, part: Part, ctx: Context,
                run_size: int) -> None:
    if info.issym():  # its target is what a reader may write as a file
        add_member(ctx, part, info.name.encode("utf-8", "surrogateescape"),
                   info.linkname.encode("utf-8", "surrogateescape"), flags=("link",))
        return
    if info.islnk() or info.isdir() or info.isdev():
        return  # no data of its own; never followed or created
    member = archive.extractfile(info)  # regular, sparse, or an unknown type with data
    if member is None:
        return
    name = info.name.encode("utf-8", "surrogateescape")
    # tarfile drops a short read whole: read what is there, then say it was cut
    available = info.size if info.sparse else min(info.size, run_size - info.offset_data)
    stream_member(ctx, part, name, _member_chunks(member, available, info.size))


def _unextended_end(raw: BinaryIO, base: int, info: tarfile.TarInfo) -> int | None:
    """Where the member's data ends by its header's own size field, when a
    pax record gave it another size (None when not): a reader that ignores
    pax headers looks for the next header there. `raw` is left where it was
    (tarfile's stream reads on from it)."""
    if "size" not in info.pax_headers:
        return None
    here = raw.tell()
    try:
        raw.seek(base + info.offset_data - BLOCK)  # the member's own header
        header = raw.read(BLOCK)
    finally:
        raw.seek(here)
    try:
        size = tarfile.nti(header[124:136])
    except (tarfile.HeaderError, ValueError):
        return None
    if size == info.size or size < 0:
        return None
    return base + info.offset_data + -(-size // BLOCK) * BLOCK


def _member_chunks(member: BinaryIO, available: int, size: int) -> Iterator[bytes]:
    member = getattr(member, "raw", member)  # unbuffered: a buffer would read past `available`
    while available > 0:
        chunk = member.read(min(CHUNK, available))
        if not chunk:
            break
        available -= len(chunk)
        yield chunk
    if member.tell() < size:
        raise tarfile.ReadError(f"member data cut short at {member.tell()} of {size} bytes")


def _next_header(raw: BinaryIO, offset: int, ctx: Context, problems: list[str]) -> int | None:
    """Where the next valid header is after `offset` (zero blocks and garbage
    skipped, garbage noted), or None at the end of the part."""
    raw.seek(offset)
    garbage = 0
    while True:
        block = raw.read(BLOCK)
        if not block:
            break
        if block.strip(PADDING):
            if len(block) == BLOCK and _is_header(block):
                break
            garbage += len(block)
        offset += len(block)
        if offset % (BLOCK * 2048) == 0:
            ctx.budget.check_time()
    if garbage:
        problems.append(f"{garbage} bytes of non-tar data")
    return offset if block else None


def _is_header(block: bytes) -> bool:
    """A tar header: its checksum field matches the sum of its bytes."""
    field = block[148:156].replace(b"\0", b" ").strip()
    if not field or not all(48 <= c <= 55 for c in field):
        return False
    return int(field, 8) == sum(block[:148]) + 8 * 32 + sum(block[156:])


