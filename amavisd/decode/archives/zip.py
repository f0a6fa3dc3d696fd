"""ZIP, and what is a zip inside (zipx, jar, apk, epub, OOXML), read in-process.

Why in-process: the standard library's `zipfile` parses the central directory
(zip64, cp437/UTF-8 names, SFX prefixes) and no fork is paid. Measured per
archive, this decoder vs `7zz x` to a dir (corpus samples, best of 30):
clam.zip 0.06 ms vs 2.6 ms, TestData.zip 0.16 vs 4.6, 7z_deflate.zip 0.25 vs
4.7, high_compression.zip (262 KB out) 0.43 vs 3.0, t.apk 0.26 vs 4.5,
clam.bz2.zip 0.06 vs 3.0, lzma.zipx 0.11 vs 3.8, xz_multi.zipx 0.18 vs 3.2,
zstd.zipx 0.07 vs 3.0, clam.d64.zip (Deflate64, `inflate64`) 0.05 vs 2.4. On
27 MB out, both counting the part spilled: deflate 99 ms vs 197 ms through
run_tool + harvest, Deflate64 178 vs 170 ms (even; small ones decide). So 7zz
runs only for methods nothing in-process reads (implode, PPMd, shrink,
reduce, WavPack): once per archive, on a zip repacked with just those members;
clam.impl.zip and ppmd8.zipx take ~25 ms that way (run_tool polls every 20 ms).

`zipfile` lists; the members are read here, from the local data, by
decompressors given an output bound (CHUNK), with the CRC checked, and charged
chunk by chunk. Not `ZipFile.open()`: its bzip2 and LZMA paths decompress a
whole read's input with no output bound (a 3.5 KB zip of bzip2 zeros took
6 GiB and 27 s to return its first MiB), it refuses members whose local name
differs from the central one (Info-ZIP Unicode-path zips), and a CRC failure
loses the last chunk read, which we keep for the scanners.

Fail closed, and scan every reading:
- a member whose data decoded to its end but fails its CRC is kept (flagged
  `corrupt`, the archive decode-error): we scan what unzip -p gives;
- a member we could not produce (a method nothing here reads, 7zz failing on
  one it should read, corrupt compressed data, a stream that stops short of
  its end while the archive goes on, no local header where the directory
  points) makes the archive `Undecipherable`: UNCHECKED, after every
  member that could be read was added;
- the central directory and the local headers are two readings (unzip and
  Python use the first, streaming readers the second): a member whose local
  header gives another method, stored size or name is read both ways (a
  "directory" by the one can be a file by the other), and a local header no
  directory entry points at (outside every member's data: another zip in
  front, which 7-Zip opens first) is read as a member too, by 7zz for the
  methods only it reads; the archive is then scanned whole as well;
- an entry with data is read whatever it says it is: a symlink's data (its
  target; Python's extractall writes it as a file) becomes a part flagged
  `link`, a directory's data a part when it is not empty.

Never: `read()` or `extract()` a member, use a member name as a path, open an
encrypted member, or follow central-directory entries that overlap (the
zbsm-style bomb: many entries sharing one deflate stream).
"""

from __future__ import annotations

import bisect
import bz2
import contextlib
import io
import itertools
import logging
import lzma
import mmap
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import inflate64

from amavisd.decode import external, window
from amavisd.decode.archives.members import clean_name, harvest, is_ours, stream_member
from amavisd.decode.decompressors import LZMA_MEMLIMIT
from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part, create_private
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

log = logging.getLogger("amavisd.decode")

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd

CHUNK = 1024 * 1024
DEFLATE64_FEED = 1024  # one code can make 64 KiB: ~30 MiB out per KiB in at worst
LOCAL = b"PK\x03\x04"
END = b"PK\x05\x06"
DESCRIPTOR = b"PK\x07\x08"
ENCRYPTED_BITS = 0x0001 | 0x0040  # traditional (or AES) encryption, PKWARE strong encryption
AES = 99
DATA_DESCRIPTOR_BIT = 0x0008
UTF8_BIT = 0x0800
MARKER_PREFIX = 8  # "PK\x07\x08" / "PK00" spanning markers are not foreign data
ENTRIES_PER_PART = 10  # more entries than 10 x max_parts: not even listed (memory)
MAX_NOTES = 20
# What decompressors raise on corrupt data (bz2 says OSError; no file is read there).
MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, zstd.ZstdError, EOFError,
                 OSError, ValueError, NotImplementedError, struct.error, DecodeError)
MAX_LOST = 5  # members named in the UNCHECKED reason


@dataclass
class Entry:
    """One member as the central directory (or, failing that, its local header) says."""
    name: str
    method: int
    flags: int
    csize: int
    usize: int
    crc: int | None  # None: not known (a data descriptor we did not read)
    header: int  # offset of the local header
    volume: int = 0
    skip: bool = False  # no data to read: an empty directory or link, another volume's member
    data: int | None = None  # offset of the data, once the local header was found
    link: bool = False  # a symlink: its data, the target, is read (flagged `link`)
    folder: bool = False  # looks like a directory: read when it has data, kept if not empty
    # the central directory's Unicode Path (0x7075) where it differs from `name`:
    # 7-Zip and unzip list and extract the member under it
    unicode_name: str = ""

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & ENCRYPTED_BITS) or self.method == AES

    @classmethod
    def from_info(cls, info: zipfile.ZipInfo) -> Entry:
        """A link or directory entry with data is read all the same: Python's
        extractall writes a link's data as a regular file, 7-Zip a directory
        attribute's, and its name is the directory's only by the central one."""
        link = info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)
        folder = info.filename.endswith("/") or bool(info.external_attr & 0x10)
        unicode_name = _unicode_path(info.extra) or ""
        return cls(info.filename, info.compress_type, info.flag_bits, info.compress_size,
                   info.file_size, info.CRC, info.header_offset, info.volume,
                   skip=(link or folder) and not info.compress_size, link=link, folder=folder,
                   unicode_name="" if unicode_name == info.filename else unicode_name)


@register("zip")
def decode_zip(part: Part, ctx: Context) -> None:
    with _archive_bytes(part) as (fh, buf):
        ZipDecoding(part, ctx, fh, buf).run()


@contextlib.contextmanager
def _archive_bytes(part: Part) -> Iterator[tuple[io.BufferedIOBase, bytes | mmap.mmap]]:
    """The part as a file for zipfile and as a buffer for everything else:
    a spilled one mapped (`decode.window`), its members' data read from the
    file, never faulted into the mapping and held there (+39 MiB for a 37 MiB
    member, it was)."""
    if not part.spill_path:
        yield io.BytesIO(part.data), part.data
        return
    with open(part.spill_path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = window.map_fd(fh.fileno(), size) if size else b""
        try:
            yield fh, buf
        finally:
            window.close(buf)


class ZipDecoding:
    def __init__(self, part: Part, ctx: Context, fh: io.BufferedIOBase, buf: bytes | mmap.mmap):
        self.part, self.ctx, self.fh, self.buf = part, ctx, fh, buf
        self.problems: list[str] = []  # decode-error: the archive is flagged, not UNCHECKED
        self.lost: list[str] = []  # content that could not be produced: UNCHECKED
        self.complete = True  # every member became a part, nothing foreign around them
        self.notes = 0
        self.note_kinds: set[str] = set()  # of the notes over MAX_NOTES

    def run(self) -> None:
        entries = self.entries()
        if any(e.name.lower().endswith("vbaproject.bin") for e in entries):
            self.part.flags.add("macros")  # informational, for the banned rules
        by_tool: list[Entry] = []
        readable, empty = self.screen(entries)
        for entry in readable:
            self.ctx.budget.check_time()
            if entry.method in DECOMPRESSORS:
                self.extract(entry)
            elif entry.method in TOOL_METHODS:
                by_tool.append(entry)
            else:  # nothing here reads it: what it holds cannot be scanned
                self.lose(entry, f"unknown compression method {entry.method}")
        for entry in readable + empty:  # an empty directory by the central one, a file locally
            for other in _local_readings(self.buf, entry):
                self.complete = False
                self.problems.append(f"member {clean_name(entry.name)}: its local header "
                                     "disagrees with the central directory, read both ways")
                self.extract(other) if other.method in DECOMPRESSORS else by_tool.append(other)
        by_tool += self.read_hidden(entries)
        if by_tool:
            self.extract_with_7zz(by_tool)
        if self.notes > MAX_NOTES:
            kind = self.note_kinds.pop() if len(self.note_kinds) == 1 else "limit"
            self.ctx.note_unchecked(self.part, f"{self.notes - MAX_NOTES} more zip members "
                                               "encrypted or unreadable", kind=kind)
        if self.lost:
            more = f" and {len(self.lost) - MAX_LOST} more" if len(self.lost) > MAX_LOST else ""
            raise Undecipherable("; ".join(self.lost[:MAX_LOST]) + more)
        if self.problems:
            raise DecodeError("; ".join(self.problems[:3]))
        if self.complete and entries:
            self.part.flags.add("expanded")

    # -- listing -------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        disk, declared = _end_record(self.buf)
        if declared > ENTRIES_PER_PART * self.ctx.limits.max_parts:
            raise LimitExceeded(f"zip declares {declared} entries", scope="branch")
        entries: list[Entry] = []
        try:
            with zipfile.ZipFile(self.fh) as listing:
                entries = [Entry.from_info(info) for info in listing.infolist()]
        except Exception as err:  # zipfile raises many kinds on hostile input; no budget here
            if is_ours(err):
                raise
            self.problems.append(f"central directory unusable: {err}")
        for entry in entries:
            if entry.volume not in (disk, 0xFFFF):  # in another piece of a split archive
                entry.skip = True
                self.part.flags.add("truncated")
                self.complete = False
            else:
                entry.data = _data_offset(self.buf, entry.header)
        wanted = [e for e in entries if not e.skip]
        if not entries or (wanted and all(e.data is None for e in wanted)):
            scanned = _scan_local_headers(self.buf, ENTRIES_PER_PART * self.ctx.limits.max_parts)
            if scanned:
                if entries:
                    self.problems.append("central directory points nowhere")
                entries, self.complete = scanned, False
        heads = [e.header for e in entries if e.data is not None]
        if heads and min(heads) > MARKER_PREFIX:
            self.complete = False  # an SFX stub or other data before the first member
        return entries

    def screen(self, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """The members to read (not encrypted, overlapping or lost), and the
        entries with no data here (empty directories and links), whose local
        headers are still compared with them."""
        overlapping = _overlapping(entries)
        if overlapping:
            self.part.flags.add("limit")
            self.ctx.note_unchecked(self.part, f"overlapping zip entries ({len(overlapping)})")
            self.complete = False
        readable, empty = [], []
        for index, entry in enumerate(entries):
            if index in overlapping:
                continue
            if entry.skip:
                if entry.data is not None and not entry.encrypted:
                    empty.append(entry)
                continue
            if entry.encrypted:
                self.part.flags.add("encrypted")
                self.note(f"encrypted zip member {clean_name(entry.name)}", "encrypted")
            elif entry.data is None:
                self.lose(entry, "no local header where the central directory points")
            else:
                readable.append(entry)
        return readable, empty

    def note(self, reason: str, kind: str = "limit") -> None:
        self.complete = False
        self.notes += 1
        if self.notes <= MAX_NOTES:
            self.ctx.note_unchecked(self.part, reason, kind)
        else:
            self.note_kinds.add(kind)

    # -- reading -------------------------------------------------------------------------------

    def extract(self, entry: Entry, hidden: bool = False) -> None:
        """One member into a part. `hidden`: found by its local header only, so
        maybe no member at all (a signature inside a stub): its failures are
        noted, never counted as content lost."""
        ends: list[str] = []
        try:
            chunks = self.decoded_chunks(entry, ends)
            if entry.folder:  # a directory's empty data (a deflate end block): no part
                first = next((chunk for chunk in chunks if chunk), b"")
                if not first and not ends:
                    return
                chunks = itertools.chain((first,), chunks)
            also = {"alt_names": (clean_name(entry.unicode_name),)} if entry.unicode_name else {}
            child = stream_member(self.ctx, self.part, entry.name, chunks, **also)
        except MEMBER_ERRORS as err:
            why = f"corrupt data: {str(err) or type(err).__name__}"
            self.fail(entry, why) if hidden else self.lose(entry, why)
            return
        if entry.link:
            child.flags.add("link")
        if "crc" in ends:  # decoded to its end: what unzip -p gives, nothing hidden
            child.flags.add("corrupt")
            self.fail(entry, "CRC mismatch (the data is kept and scanned)")
        if "short" in ends:  # the archive ends inside it: there is no more
            child.flags.add("truncated")
            self.fail(entry, "cut short by the end of the archive")
        if "stopped" in ends:  # the archive goes on, the member's stream did not
            child.flags.add("truncated")
            why = "compressed data stops before its stream ends"
            self.fail(entry, why) if hidden else self.lose(entry, why)

    def fail(self, entry: Entry, why: str) -> None:
        self.complete = False
        self.problems.append(f"member {clean_name(entry.name)}: {why}")

    def lose(self, entry: Entry, why: str) -> None:
        """A member whose content could not be produced."""
        self.complete = False
        self.lost.append(f"zip member {clean_name(entry.name)}: {why}")

    def decoded_chunks(self, entry: Entry, ends: list[str]) -> Iterator[bytes]:
        """Bounded decompression of the raw data, with the CRC checked when
        known; how the data ended is put in `ends` (crc, short, stopped)."""
        new_decompressor, feed = DECOMPRESSORS.get(entry.method, (None, CHUNK))
        raw = self.raw_chunks(entry, feed)
        crc = 0
        if new_decompressor is None:  # stored
            for chunk in raw:
                crc = zlib.crc32(chunk, crc)
                yield chunk
            ended = True
        else:
            decompressor = new_decompressor()
            for out in _bounded(decompressor, raw):
                crc = zlib.crc32(out, crc)
                yield out
            ended = decompressor.eof or entry.method not in ENDS_ITSELF
        end = entry.data + entry.csize
        if end > len(self.buf) or (not ended and end == len(self.buf)):
            ends.append("short")  # the data runs to the end of the archive: there is no more
        elif not ended:
            ends.append("stopped")
        elif entry.crc is not None and crc != entry.crc:
            ends.append("crc")

    def raw_chunks(self, entry: Entry, size: int) -> Iterator[bytes]:
        end = min(entry.data + entry.csize, len(self.buf))
        for pos in range(entry.data, end, size):
            yield window.copy(self.buf, pos, min(pos + size, end))
            self.ctx.budget.check_time()

    def extract_with_7zz(self, entries: list[Entry]) -> None:
        """Methods nothing in-process reads: their raw data repacked into a
        zip of their own, named by index, so 7zz sees only those members."""
        if not external.available("7zz"):
            for entry in entries:
                self.lose(entry, f"method {entry.method} needs 7zz, which is not installed")
            return
        workdir = self.ctx.scratch_dir(self.part)
        outdir = os.path.join(workdir, "out")
        os.mkdir(outdir, 0o700)
        repacked = os.path.join(workdir, "members.zip")
        labels = _repack(self.buf, entries, repacked)
        result = external.run_tool(self.ctx, ["7zz", "x", "-y", "-bd", "-pX", f"-o{outdir}",
                                              repacked], cwd=workdir, watch=outdir)
        log.debug("%s: 7zz read %d zip members in %.3fs", self.part.path, len(entries),
                  result.elapsed)
        before = len(self.part.children)
        harvest(self.ctx, self.part, outdir)
        found = set()
        links = {label for label, entry in zip(labels, entries, strict=True) if entry.link}
        for child in self.part.children[before:]:
            found.add(child.name)
            if child.name in links:
                child.flags.add("link")
            child.name = clean_name(labels.get(child.name, child.name))
        missing = [labels[k] for k in labels if k not in found]
        report = external.SevenZipReport.read(result, workdir)
        said = report.said(1000)
        for label, name in labels.items():  # its messages name our labels
            said = said.replace(label, clean_name(name))
        if missing or report.failed or report.wrong_password:
            self.complete = False
            self.lost.append(f"7zz exit {result.returncode} on {len(labels)} zip members, "
                             f"{len(missing)} not written: {said[:200]}")
        elif report.crc_failed:  # each member written whole, its CRC failed: kept, scanned
            self.fail(entries[0], f"7zz: {said[:200]}")

    def read_hidden(self, entries: list[Entry]) -> list[Entry]:
        """Members only a local-header reader sees: a local header that no
        directory entry points at and that lies outside every member's data
        (a stored zip inside holds local headers of its own). Another zip in
        front of this one is such a reader's (7-Zip's) first reading. Those in
        methods only 7zz reads are returned, for it; an encrypted one is
        noted; one in a method nobody reads is lost, when the header looks
        like a zip writer's (not a signature by chance in a stub)."""
        if not entries or not any(e.data is not None for e in entries):
            return []
        known = {e.header for e in entries}
        inside = _Spans((e.header, e.data + e.csize) for e in entries if e.data is not None)
        limit = ENTRIES_PER_PART * self.ctx.limits.max_parts
        by_tool = []
        for local in _scan_local_headers(self.buf, limit):
            if local.header in known or inside(local.header) or local.skip:
                continue
            if (local.encrypted or local.method not in DECOMPRESSORS) \
                    and not _plausible(self.buf, local):
                continue
            self.complete = False
            self.problems.append(f"member {clean_name(local.name)} has a local header only")
            self.ctx.budget.check_time()
            if local.encrypted:
                self.part.flags.add("encrypted")
                self.note(f"encrypted zip member {clean_name(local.name)} (local header only)",
                          "encrypted")
            elif local.method in DECOMPRESSORS:
                self.extract(local, hidden=True)
            elif local.method in TOOL_METHODS:
                by_tool.append(local)
            else:
                self.lose(local, f"unknown compression method {local.method} (local header only)")
        return by_tool


# -- decompressors ---------------------------------------------------------------------------


class _Deflate64:
    """inflate64.Inflater in the decompress(data, max_length) shape; it has no
    output bound of its own, so it is fed DEFLATE64_FEED bytes at a time."""

    def __init__(self) -> None:
        self._inflater = inflate64.Inflater()

    @property
    def eof(self) -> bool:
        return self._inflater.eof

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._inflater.inflate(data) if data and not self.eof else b""


class _ZipLzma:
    """LZMA as zip stores it (APPNOTE 5.8.8): version, properties size, the
    5-byte LZMA properties, then a raw LZMA1 stream."""

    def __init__(self) -> None:
        self._head = b""
        self._inner: lzma.LZMADecompressor | None = None

    @property
    def eof(self) -> bool:
        return self._inner is not None and self._inner.eof

    @property
    def needs_input(self) -> bool:
        return self._inner is None or self._inner.needs_input

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            self._head += data
            if len(self._head) < 9:
                return b""
            (props_size,) = struct.unpack_from("<H", self._head, 2)
            if props_size != 5:
                raise DecodeError(f"LZMA properties of {props_size} bytes")
            props, data, self._head = self._head[4:9], self._head[9:], b""
            lc_lp_pb, dict_size = props[0], int.from_bytes(props[1:5], "little")
            if lc_lp_pb >= 9 * 5 * 5:
                raise DecodeError("bad LZMA properties")
            if dict_size > LZMA_MEMLIMIT:  # liblzma would allocate it before a byte is read
                raise DecodeError(f"LZMA dictionary of {dict_size} bytes, over "
                                  f"{LZMA_MEMLIMIT}")
            lzma1 = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc_lp_pb % 9,
                     "lp": lc_lp_pb // 9 % 5, "pb": lc_lp_pb // 45}
            self._inner = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1])
        return self._inner.decompress(data, max_length)


# method -> (decompressor factory or None for stored, input bytes fed at a time)
DECOMPRESSORS: dict[int, tuple[Callable[[], object] | None, int]] = {
    zipfile.ZIP_STORED: (None, CHUNK),
    zipfile.ZIP_DEFLATED: (lambda: zlib.decompressobj(-15), CHUNK),
    9: (_Deflate64, DEFLATE64_FEED),
    zipfile.ZIP_BZIP2: (bz2.BZ2Decompressor, CHUNK),
    zipfile.ZIP_LZMA: (_ZipLzma, CHUNK),
    93: (zstd.ZstdDecompressor, CHUNK),
    95: (lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ), CHUNK),
}
# shrink, reduce, implode, WavPack, PPMd: 7zz reads them, nothing in-process does
TOOL_METHODS = frozenset({1, 2, 3, 4, 5, 6, 97, 98})
ENDS_ITSELF = frozenset({zipfile.ZIP_DEFLATED, 9, zipfile.ZIP_BZIP2, 93, 95})
APPNOTE_METHODS = frozenset({*range(0, 13), 14, 16, 18, 19, 20, *range(93, 100)})


def _local_readings(buf: bytes | mmap.mmap, entry: Entry) -> list[Entry]:
    """The member as its local header describes it, where that differs from
    the directory in what changes the bytes or what is written: the method,
    a stored size, the name (a directory "d/" by the central one can be a
    file "d.c" by the local one). A streaming reader trusts the local
    header. Empty when they agree."""
    if entry.data is None or entry.encrypted:
        return []
    flags, method, _, _, crc, csize, usize, name_size, extra_size = \
        struct.unpack_from("<HHHHIIIHH", buf, entry.header + 6)
    if flags & ENCRYPTED_BITS or (method not in DECOMPRESSORS and method not in TOOL_METHODS):
        return []
    name_at = entry.header + 30
    name = _unicode_path(bytes(buf[name_at + name_size:name_at + name_size + extra_size])) \
        or bytes(buf[name_at:name_at + name_size]).decode(
            "utf-8" if flags & UTF8_BIT else "cp437", "replace").split("\0", 1)[0]  # as zipfile
    sizes_known = not flags & DATA_DESCRIPTOR_BIT and 0xFFFFFFFF not in (csize, usize)
    if name == entry.name and method == entry.method and not (
            method == zipfile.ZIP_STORED and sizes_known and csize != entry.csize):
        return []
    if method in ENDS_ITSELF:  # to the end at most
        csize = len(buf) - entry.data
    elif not sizes_known:
        csize, usize = max(entry.csize, 0), entry.usize
    crc = None if flags & DATA_DESCRIPTOR_BIT else crc
    return [Entry(name, method, flags, csize, usize, crc, entry.header, data=entry.data,
                  folder=name.endswith("/"))]


def _unicode_path(extra: bytes) -> str | None:
    """The Info-ZIP Unicode Path extra field's name (0x7075, version 1), as
    libarchive takes it (its CRC of the plain name not checked)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 0x7075 and size > 5 and extra[pos + 4] == 1:
            return extra[pos + 9:pos + 4 + size].decode("utf-8", "replace").split("\0", 1)[0]
        pos += 4 + size
    return None


def _plausible(buf: bytes | mmap.mmap, entry: Entry) -> bool:
    """A local header as zip writers make them: a version it needs that
    APPNOTE knows, a method it defines, a printable name. What a reader only
    tries when the header is one (a signature by chance in a stub is not)."""
    version = buf[entry.header + 4]
    return version <= 63 and entry.method in APPNOTE_METHODS and 0 < len(entry.name) \
        and not any(ord(c) < 32 for c in entry.name)


class _Spans:
    """Whether an offset falls in a member's [local header, end of data): a
    binary search, for a zip of many members with many local headers inside."""

    def __init__(self, spans: Iterator[tuple[int, int]]):
        ordered = sorted(spans)
        self.starts = [start for start, _ in ordered]
        self.reach = list(itertools.accumulate((end for _, end in ordered), max))

    def __call__(self, offset: int) -> bool:
        index = bisect.bisect_right(self.starts, offset) - 1
        return index >= 0 and self.reach[index] > offset


def _bounded(decompressor, raw: Iterator[bytes]) -> Iterator[bytes]:
    """At most CHUNK bytes out per call, whichever way the decompressor keeps
    what it could not return yet (zlib: input in unconsumed_tail; bz2, lzma,
    zstd: output, signalled by needs_input)."""
    for data in raw:
        while True:
            out = decompressor.decompress(data, CHUNK)
            if out:
                yield out
            if decompressor.eof:
                return
            data = getattr(decompressor, "unconsumed_tail", b"")
            if not data and getattr(decompressor, "needs_input", True):
                break
    flush = getattr(decompressor, "flush", None)
    if flush is not None and (rest := flush(CHUNK)):
        yield rest


# -- structure -------------------------------------------------------------------------------


def _end_record(buf: bytes | mmap.mmap) -> tuple[int, int]:
    """(this disk's number, entries declared) from the end record; 0 where unknown."""
    pos = buf.rfind(END, max(0, len(buf) - 65557))
    if pos < 0 or pos + 22 > len(buf):
        return 0, 0
    disk, _, _, total = struct.unpack_from("<HHHH", buf, pos + 4)
    locator = pos - 20
    if (total == 0xFFFF or disk == 0xFFFF) and locator >= 0 and \
            buf[locator:locator + 4] == b"PK\x06\x07":
        (record,) = struct.unpack_from("<Q", buf, locator + 8)
        if buf[record:record + 4] == b"PK\x06\x06" and record + 40 <= len(buf):
            (disk,) = struct.unpack_from("<I", buf, record + 16)
            (total,) = struct.unpack_from("<Q", buf, record + 32)
    return (0 if disk == 0xFFFF else disk), (0 if total == 0xFFFF else total)


def _data_offset(buf: bytes | mmap.mmap, header: int) -> int | None:
    if header < 0 or buf[header:header + 4] != LOCAL or header + 30 > len(buf):
        return None
    name_size, extra_size = struct.unpack_from("<HH", buf, header + 26)
    return header + 30 + name_size + extra_size


def _overlapping(entries: list[Entry]) -> set[int]:
    """Indexes of entries whose local record (header and data) overlaps
    another's: no zip writer does that, a bomb does it to reuse one stream."""
    spans = sorted((e.header, e.data + e.csize, i) for i, e in enumerate(entries)
                   if e.data is not None)
    hit: set[int] = set()
    reach, reacher = -1, -1
    for start, end, index in spans:
        if start < reach:
            hit.update((index, reacher))
        if end > reach:
            reach, reacher = end, index
    return hit


def _scan_local_headers(buf: bytes | mmap.mmap, limit: int) -> list[Entry]:
    """Members found by their local headers, for a central directory that is
    missing, corrupt or elsewhere. Sizes a data descriptor hides, or that run
    past the end, are bounded by the next header (the decompressors find the
    real end), so no two scanned entries share data."""
    entries: list[Entry] = []
    pos = window.find(buf, LOCAL)
    while pos >= 0 and pos + 30 <= len(buf) and len(entries) < limit:
        (flags, method, _, _, crc, csize, usize, name_size, extra_size) = \
            struct.unpack_from("<HHHHIIIHH", buf, pos + 6)
        name = bytes(buf[pos + 30:pos + 30 + name_size])
        extra = bytes(buf[pos + 30 + name_size:pos + 30 + name_size + extra_size])
        if 0xFFFFFFFF in (csize, usize):
            usize, csize = _zip64_sizes(extra, usize, csize)
        if flags & DATA_DESCRIPTOR_BIT:
            crc = None  # the real one follows the data
        entry = Entry(name.decode("utf-8" if flags & UTF8_BIT else "cp437", "replace"),
                      method, flags, csize, usize, crc, pos, data=pos + 30 + name_size + extra_size,
                      folder=name.endswith((b"/", b"\\")))
        if entry.data > len(buf):
            break
        hidden = flags & DATA_DESCRIPTOR_BIT and not csize
        beyond = entry.data + csize > len(buf)
        following = window.find(buf, LOCAL, entry.data if hidden or beyond else entry.data + csize)
        if hidden or beyond:  # bounded by the next header: scanned entries never overlap
            bound = following if following >= 0 else len(buf)
            if hidden and method == zipfile.ZIP_STORED:
                descriptor = window.find(buf, DESCRIPTOR, entry.data, bound)
                bound = descriptor if descriptor >= 0 else bound
            entry.csize, entry.crc = bound - entry.data, None
        entry.skip = entry.folder and entry.csize <= 0  # a directory with data is read
        entries.append(entry)
        pos = following
    return entries


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = extra[pos + 4:pos + 4 + size]
            if usize == 0xFFFFFFFF and len(values) >= 8:
                (usize,), values = struct.unpack_from("<Q", values), values[8:]
            if csize == 0xFFFFFFFF and len(values) >= 8:
                (csize,) = struct.unpack_from("<Q", values)
            break
        pos += 4 + size
    return usize, csize


def _repack(buf: bytes | mmap.mmap, entries: list[Entry], path: str) -> dict[str, str]:
    """Write a zip holding the raw data of `entries` under names m00000, ...;
    returns those names mapped to the declared ones."""
    labels: dict[str, str] = {}
    central = bytearray()
    with create_private(path) as out:
        for index, entry in enumerate(entries):
            label = f"m{index:05d}"
            labels[label] = entry.name
            csize = max(0, min(entry.csize, len(buf) - entry.data))
            big = max(csize, entry.usize) >= 0xFFFFFFFF
            extra = struct.pack("<HHQQ", 1, 16, entry.usize, csize) if big else b""
            sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (csize, entry.usize)
            flags = entry.flags & ~(DATA_DESCRIPTOR_BIT | UTF8_BIT)
            fields = (63, flags, entry.method, 0, 0x21, entry.crc or 0, *sizes, len(label),
                      len(extra))
            offset = out.tell()
            out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields))
            out.write(label.encode() + extra)
            for pos in range(entry.data, entry.data + csize, CHUNK):
                out.write(window.copy(buf, pos, min(pos + CHUNK, entry.data + csize)))
            central += struct.pack("<IH", 0x02014B50, 63) + struct.pack("<HHHHHIIIHH", *fields)
            central += struct.pack("<HHHII", 0, 0, 0, 0, min(offset, 0xFFFFFFFF))
            central += label.encode() + extra
        start = out.tell()
        out.write(central)
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries),
                              len(central), start, 0))
    return labels
