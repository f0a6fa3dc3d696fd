"""7z archives: py7zr in-process where its memory stays bounded, 7zz for the rest.

Measured on the corpus (archives/7z, 36 samples, per archive): py7zr about
1 ms, `7zz x` alone 3-5 ms (fork, exec, disk); a whole decode is 0.6 ms median
in-process, 25 ms through 7zz and run_tool (8 ms if run_tool waited on the
process instead of sleeping 20 ms). Where both read an archive they give the
same bytes. So py7zr goes first, and 7zz takes what py7zr cannot read, or
cannot read safely:
- methods py7zr lacks: BCJ2, ARM64 (7zz reads them);
- Deflate, Deflate64, brotli: py7zr's decoders for them ignore the output
  bound, so one 1 MiB input block of a Deflate bomb became 1 GB in memory
  (2.4 GiB RSS, 9 s). 7zz reads Deflate boxed; Debian's 7zz has no brotli;
- members larger than the spill threshold: py7zr hands a member over in one
  piece of up to 128 MB (the 1 GiB LZMA bomb: 286 MiB RSS). Such a member would
  go to disk anyway, and 7zz writes it there itself, watched and killed at the
  budget;
- PPMd: pyppmd 1.3.1 crashed the interpreter (SIGSEGV, heap corruption) on 3
  of the first 21 corpus PPMd samples with a few bytes changed; a crash takes
  the worker and its message down, so PPMd is only ever decoded by 7zz. LZMA,
  LZMA2, BCJ, Delta, BZip2 and Copy went through 12,000 such samples cleanly;
- an archive whose compressed header would decode to more than MAX_HEADER.
Every member py7zr decodes is written chunk by chunk into the budget.
zstd and lz4 folders (7-Zip-zstd, libarchive) are read here instead: py7zr's
zstd ignores the bound, it has no lz4, and Debian's 7zz has neither. Such a
folder is decoded frame by frame under the bound and cut into its members by
the sizes and CRCs of the header (a 120 MiB zstd bomb: stopped at the quota,
42 MiB RSS).

Fail closed, and scan every reading. When py7zr fails on a member, 7zz
reads the archive too. When `7zz x` fails (a member it could not decode, or
could not write: a link entry `docs` and a member `docs/invoice.txt` make it
refuse the second), `7zz e` reads it again, flat, as 7-Zip's "extract
without paths" does: every member it writes is scanned too. A member whose CRC
alone failed is kept (decode-error); one that no reading produced makes the
archive `Undecipherable`, UNCHECKED with all that was read scanned.

Never: let py7zr write to disk (members go to a writer factory), follow or
create a link (py7zr hands a link's target to the factory, harvest reads what
7zz made with readlink; both become parts flagged `link`), or wait for a
password (7zz gets a dummy one; stdin is /dev/null anyway).
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import lz4.frame
import py7zr
from py7zr.archiveinfo import HeaderStreamsInfo
from py7zr.exceptions import PasswordRequired
from py7zr.io import Py7zIO, WriterFactory
from py7zr.properties import COMPRESSION_METHOD as M
from py7zr.properties import PROPERTY

from amavisd.decode import external
from amavisd.decode.archives import members
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Sink, Undecipherable, register

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd

SIGNATURE_HEADER = 32
MAX_HEADER = 16 * 1024 * 1024  # decoded header bytes py7zr may build in memory
DUMMY_PASSWORD = "-pamavisd-no-password"
AES = M.CRYPT_AES256_SHA256
# Coders py7zr decodes in bounded memory and without crashing on hostile data.
BOUNDED = frozenset({
    M.COPY, M.DELTA, M.LZMA, M.LZMA2, M.MISC_BZIP2, M.P7Z_BCJ, M.BCJ_PPC,
    M.BCJ_IA64, M.BCJ_ARM, M.BCJ_ARMT, M.BCJ_SPARC, AES,
})
# Single-coder folders read here, frame by frame under an output bound: py7zr's
# zstd decoder ignores the bound and it has no lz4; Debian's 7zz has neither.
STREAMED = {M.MISC_ZSTD: zstd.ZstdDecompressor, M.MISC_LZ4: lz4.frame.LZ4FrameDecompressor}
CHUNK = 1024 * 1024
WRONG_PASSWORD = re.compile(r"Wrong password\? : (.+)$", re.M)


@register("7z")
def decode_7z(part: Part, ctx: Context) -> None:
    with part.open() as fh:
        if _cut_short(fh, part.size):
            part.flags.add("truncated")
            raise DecodeError("7z cut short: its header lies past the end (one volume of a set?)")
        try:
            archive = py7zr.SevenZipFile(fh) if _header_in_bounds(fh) else None
        except PasswordRequired:
            _mark_encrypted(part, ctx, [], "encrypted 7z headers")
            return
        except MemoryError:  # an encoded header asking liblzma for a huge dictionary:
            archive = None  # 7zz, under its memory limit, decides
        except Exception as err:  # whatever py7zr cannot parse, 7zz may
            if members.is_ours(err):
                raise
            archive = None
        if archive is None:
            _with_7zz(part, ctx, locked=None)
            return
        with archive:
            locked = [f.filename for f in archive.files if _encrypted(f)]
            readable = [f for f in archive.files if f.folder is not None and not _encrypted(f)]
            wanted = [f for f in archive.files if _wanted(f)]
            # py7zr gets the members with data outside zstd/lz4 folders only: for an
            # empty file it would first decode (to check) the members before it.
            by_py7zr = [f for f in wanted if f.folder is not None and not _streamed(f.folder)]
            in_process = all(_in_process(f, ctx) for f in readable) and _one_stream_each(archive)
            if not in_process or not _with_py7zr(part, ctx, archive, by_py7zr):
                _with_7zz(part, ctx, locked)  # another reading, which decides
                return
            problem = _with_streams(part, ctx, archive, fh)
            for member in wanted:
                if member.folder is None:  # an empty file: no data, but a name
                    members.add_member(ctx, part, member.filename, b"")
    if locked:
        _mark_encrypted(part, ctx, locked, "encrypted 7z member")
    elif not problem:
        part.flags.add("expanded")
    if problem:
        raise problem


def _cut_short(fh: BinaryIO, size: int) -> bool:
    """The start header points past the end: a first volume, or a cut file."""
    head = fh.read(SIGNATURE_HEADER)
    fh.seek(0)
    if len(head) < SIGNATURE_HEADER:
        return True
    offset, length = struct.unpack_from("<QQ", head, 12)
    return SIGNATURE_HEADER + offset + length > size


def _header_in_bounds(fh: BinaryIO) -> bool:
    """A compressed header must decode with bounded coders to at most MAX_HEADER."""
    head = fh.read(SIGNATURE_HEADER)
    offset, length = struct.unpack_from("<QQ", head, 12)
    fh.seek(SIGNATURE_HEADER + offset)
    header = fh.read(min(length, 1 << 16))
    fh.seek(0)
    if header[:1] != PROPERTY.ENCODED_HEADER:
        return True
    try:
        folders = HeaderStreamsInfo.retrieve(io.BytesIO(header[1:])).unpackinfo.folders
    except Exception:
        return False
    return (all(_bounded(folder) for folder in folders)
            and sum(folder.unpacksizes[-1] for folder in folders) <= MAX_HEADER)


def _bounded(folder) -> bool:
    return all(coder["method"] in BOUNDED for coder in folder.coders)


def _streamed(folder) -> bool:
    return folder is not None and len(folder.coders) == 1 \
        and folder.coders[0]["method"] in STREAMED


def _one_stream_each(archive: py7zr.SevenZipFile) -> bool:
    """Every folder packed as one stream (only BCJ2 makes several), so folder i
    is packed stream i."""
    streams = archive.header.main_streams if hasattr(archive, "header") else None
    if streams is None:
        return True
    if streams.unpackinfo is None:  # streams without folders: not for us to guess
        return False
    return all(c["numinstreams"] == 1 for folder in streams.unpackinfo.folders
               for c in folder.coders)


def _encrypted(member) -> bool:
    folder = member.folder
    return folder is not None and any(c["method"] == AES for c in folder.coders)


def _wanted(member) -> bool:
    """Members that become parts: files, empty ones too (their names matter),
    and every entry with data, whatever its attributes say: `7zz x` writes a
    "directory" that has a stream as a regular file, and a link's data is
    its target (scanned, flagged `link`)."""
    if _encrypted(member):
        return False
    return member.folder is not None or not (
        member.is_directory or member.is_symlink or member.is_junction or member.is_socket)


def _is_link(member) -> bool:
    return member.is_symlink or member.is_junction


def _dropped_by_py7zr(member) -> bool:
    """py7zr hands no writer a directory or socket entry's data (it decodes
    it only to check the CRC): such an entry with data goes to 7zz."""
    return member.folder is not None and (member.is_directory or member.is_socket)


def _in_process(member, ctx: Context) -> bool:
    """py7zr decodes data it writes nowhere (a directory's, to check the
    CRC), so neither the budget nor the clock would see that work: such
    members, and big ones, go to the boxed 7zz."""
    if _streamed(member.folder):
        return True  # read here in bounded chunks, every byte charged
    return _bounded(member.folder) and member.uncompressed <= ctx.limits.spill_threshold \
        and not _dropped_by_py7zr(member)


class _MemberWriter(Py7zIO):
    """One member as py7zr decodes it, each chunk charged to the budget as it comes."""

    def __init__(self, sink: Sink, ctx: Context):
        self.sink = sink
        self.ctx = ctx
        self.finished = False

    def write(self, data: bytes | bytearray) -> int:
        self.sink.write(data)
        self.ctx.budget.check_time()
        return len(data)

    def close(self) -> None:  # py7zr calls this only when the member decoded and its CRC held
        if not self.finished:
            self.finished = True
            self.sink.finish()

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self.sink.size


class _MemberFactory(WriterFactory):
    def __init__(self, part: Part, ctx: Context):
        self.part = part
        self.ctx = ctx
        self.writers: list[_MemberWriter] = []

    def create(self, filename: str) -> Py7zIO:
        sink = self.ctx.sink(self.part, name=members.clean_name(filename))
        self.writers.append(_MemberWriter(sink, self.ctx))
        return self.writers[-1]

    def finish_unfinished(self, truncated: bool) -> None:
        """After an error: members cut short. After success: members a py7zr
        older than the Py7zIO.close() hook (1.1) left open, all complete."""
        for writer in self.writers:
            if not writer.finished:
                writer.finished = True
                writer.sink.finish(truncated=truncated)


def _with_py7zr(part: Part, ctx: Context, archive: py7zr.SevenZipFile, wanted: list) -> bool:
    """False when py7zr failed (it refuses a whole archive for one name like
    '../x'; a member's data or CRC is bad): the members it gave are kept, and
    7zz reads the archive too, as the reading that decides."""
    if not wanted:
        return True
    factory = _MemberFactory(part, ctx)
    before = len(part.children)
    try:
        archive.extract(targets={f.filename for f in wanted}, factory=factory)
    except Exception as err:  # py7zr's own errors, and whatever corrupt input makes it raise
        factory.finish_unfinished(truncated=True)
        if members.is_ours(err):
            raise
        return False
    factory.finish_unfinished(truncated=False)
    links = {members.clean_name(f.filename) for f in wanted if _is_link(f)}
    for child in part.children[before:]:
        if child.name in links:
            child.flags.add("link")
    return True


def _with_streams(part: Part, ctx: Context, archive: py7zr.SevenZipFile, fh: BinaryIO
                  ) -> DecodeError | None:
    """The zstd and lz4 folders: their unpacked stream cut into the folder's
    files by the sizes the header gives. A folder that breaks does not stop
    the next; returned: Undecipherable when a member could not be produced,
    DecodeError when only CRCs failed (the members are kept), else None."""
    streams = archive.header.main_streams
    if streams is None:
        return None
    start = archive.afterheader + streams.packinfo.packpos
    positions = streams.packinfo.packpositions
    lost, crc_failed = [], []
    for index, folder in enumerate(streams.unpackinfo.folders):
        if not _streamed(folder):
            continue
        fh.seek(start + positions[index])
        new_decoder = STREAMED[folder.coders[0]["method"]]
        stream = _FolderStream(_unpacked(fh, positions[index + 1] - positions[index],
                                         new_decoder), ctx)
        try:
            for member in folder.files:
                chunks = stream.take(member.uncompressed, member.filename, member.crc32)
                if _wanted(member):
                    child = members.stream_member(ctx, part, member.filename, chunks)
                    if stream.crc_failed:
                        child.flags.add("corrupt")
                    if _is_link(member):
                        child.flags.add("link")
                else:
                    for _ in chunks:  # an encrypted member's: not in these folders
                        pass
                crc_failed += [f"7z member {member.filename!r}: CRC mismatch"] \
                    if stream.crc_failed else []
        except DecodeError as err:  # this folder's stream broke: its members from here on
            lost.append(str(err))
    if lost:
        return Undecipherable("; ".join(lost[:3]))
    return DecodeError("; ".join(crc_failed[:3])) if crc_failed else None


def _unpacked(fh: BinaryIO, packed: int, new_decoder) -> Iterator[bytes]:
    """A folder's packed stream decoded in chunks of at most CHUNK, frame after frame."""
    decoder, pending = new_decoder(), b""
    while True:
        if decoder.eof:
            pending, decoder = decoder.unused_data + pending, new_decoder()
        data = b""
        if decoder.needs_input:
            if not pending:
                pending = fh.read(min(CHUNK, packed))
                packed -= len(pending)
                if not pending:
                    return
            data, pending = pending, b""
        try:
            chunk = decoder.decompress(data, CHUNK)
        except Exception as err:  # ZstdError, lz4's RuntimeError
            raise DecodeError(f"7z {type(err).__name__}: {err}") from None
        if not (chunk or data):
            return  # no input taken, no output given: it will not move again
        if chunk:
            yield chunk


class _FolderStream:
    """A folder's unpacked stream, handed out member by member."""

    def __init__(self, chunks: Iterator[bytes], ctx: Context):
        self.chunks = chunks
        self.ctx = ctx
        self.rest = b""
        self.crc_failed = False  # the last member taken came out whole, its CRC did not match

    def take(self, size: int, name: str, crc: int | None) -> Iterator[bytes]:
        """`size` bytes; a short stream raises DecodeError (the member is kept,
        truncated); a CRC that does not match sets `crc_failed`."""
        self.crc_failed = False
        seen = 0
        while size > 0:
            chunk, self.rest = self.rest or next(self.chunks, b""), b""
            if not chunk:
                raise DecodeError(f"7z member {name!r} cut short")
            chunk, self.rest = chunk[:size], chunk[size:]
            size -= len(chunk)
            seen = zlib.crc32(chunk, seen)
            self.ctx.budget.check_time()
            yield chunk
        self.crc_failed = crc is not None and seen != crc


def _with_7zz(part: Part, ctx: Context, locked: list[str] | None) -> None:
    """Extract with 7zz into a watched scratch dir. `locked`: the encrypted
    members py7zr saw, or None when py7zr could not read the listing. When
    `7zz x` fails on a member, `7zz e` reads the archive again."""
    if not external.available("7zz"):
        raise Undecipherable("7z needs 7zz, which is not installed")
    work = ctx.scratch_dir(part)
    source = external.input_path(ctx, part, work, "input.7z")
    report, result = _7zz_reading(part, ctx, work, source, "x")
    text = result.text
    if "Cannot open encrypted archive" in text:
        _mark_encrypted(part, ctx, [], "encrypted 7z headers")
        return
    refused = WRONG_PASSWORD.findall(text)
    if locked is None:
        locked = refused
    if locked:
        _mark_encrypted(part, ctx, locked, "encrypted 7z member")
    if report.failed:  # a member not written, or not whole: read again, flat
        flat, _ = _7zz_reading(part, ctx, work, source, "e")
        if flat.failed:
            raise Undecipherable(f"7zz x and 7zz e failed: {flat.said()}")
        raise DecodeError(f"7zz x failed, 7zz e read it: {report.said()}")
    if report.crc_failed:  # written whole, only the check failed: scanned as it is
        raise DecodeError(f"7zz: {report.said()}")
    if not locked:
        part.flags.add("expanded")


def _7zz_reading(part: Part, ctx: Context, work: str, source: str, command: str
                 ) -> tuple[external.SevenZipReport, external.ToolResult]:
    """One 7zz extraction (`x` with paths, `e` without) into its own dir, harvested."""
    out = os.path.join(work, f"out-{command}")
    os.mkdir(out, 0o700)
    # -mmt=1: multithreaded LZMA2 took 517 MiB on the 10 GB bomb, one thread 70 MiB.
    argv = ["7zz", command, "-t7z", "-mmt=1", "-y", "-aou", "-bd", DUMMY_PASSWORD, f"-o{out}",
            "--", source]
    result = external.run_tool(ctx, argv, cwd=work, watch=out)
    members.harvest(ctx, part, out)
    return external.SevenZipReport.read(result, work), result


def _mark_encrypted(part: Part, ctx: Context, names: list[str], what: str) -> None:
    """Flag the archive; each encrypted member is kept as an empty named part,
    so the banned-name rules still see 'invoice.exe' inside a locked 7z."""
    part.flags.add("encrypted")
    for name in names:
        members.add_member(ctx, part, name, b"", flags=("encrypted",))
    more = f" {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "") \
        if names else ""
    ctx.note_unchecked(part, what + more, kind="encrypted")
