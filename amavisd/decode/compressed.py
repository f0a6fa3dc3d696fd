"""Single-stream compressors: gzip, bzip2, xz, lzma (alone), lzip, zstd, lz4, compress (.Z).

In-process (all but big .Z files), each behind one small decompressor protocol
(`decompress(data, max_length)`, `eof`, `needs_input`, `unused_data`, and
optionally `end_of_input()` for formats with no end marker), driven by one
loop, `stream()`. Output comes in bounded chunks charged to the budget as it
comes, so a 4 GiB stream of zeros stops at the quota, in constant memory.

Why in-process, with the figures (2-core machine, per file, best of 5):
- gzip/bzip2/xz/lzma/lzip: zlib, bz2 and lzma are in the standard library; a
  fork of gzip(1) alone costs more than decoding a typical attachment.
  lzip is lzma's raw LZMA1 decoder (it accepts lzip's end marker) fed from
  the lzip header, checked against the member trailer's CRC32 and size.
- zstd: backports.zstd (compression.zstd on Python >= 3.14), which also skips
  skippable frames; window limited by the library default (128 MiB).
- lz4: the lz4 package's frame decoder; the legacy format and skippable frames
  are read here, the legacy blocks with lz4.block.
- compress: our own LZW (`LzwDecompressor`) against gzip(1) -d run boxed
  through external.run_tool (copy in, run, read back); same output on all:
      file (compressed -> out)              in-process   gzip(1)
      t.txt.Z (6 B -> 2 B)                     0.2 ms     5-26 ms
      t.tar.Z (284 B -> 10 KiB)                0.4 ms     5-20 ms
      iso_multi_extent.iso.Z (2.7 -> 620 KiB)  2.6 ms    12 ms
      text (57 KiB -> 138 KiB)                  17 ms      9 ms
      test_C1.Z (107 KiB -> 149 KiB)            41 ms     27 ms
      code (171 KiB -> 432 KiB)                 77 ms     27 ms
      binary (1.5 MiB -> 2.5 MiB)              401 ms     33 ms
      zeros (15 KiB -> 48 MiB, bomb-like)       63 ms    147 ms
  So both: in-process below LZW_TOOL_FROM (64 KiB) compressed, where the
  tool's fork and run_tool's 20 ms poll dominate (highly repetitive data,
  bombs included, is small when compressed); gzip above, where Python's
  per-code loop (~0.25 s per MiB compressed) loses. When
  gzip finds the stream corrupt it deletes its output, so we decode again
  in-process to keep what precedes the damage. Without gzip, in-process.
"""

from __future__ import annotations

import bz2
import lzma
import os
import zlib
from collections.abc import Callable

from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

try:  # Python >= 3.14
    from compression.zstd import ZstdDecompressor, ZstdError
except ImportError:  # pragma: no cover - depends on the Python version
    from backports.zstd import ZstdDecompressor, ZstdError

import lz4.block
import lz4.frame

CHUNK = 1024 * 1024
LZMA_MEMLIMIT = 512 * 1024 * 1024  # .lzma headers may ask for any dictionary size
LZW_TOOL_FROM = 64 * 1024  # compressed size from which gzip(1) beats our LZW (figures above)
CORRUPT = (OSError, EOFError, ValueError, RuntimeError, zlib.error, lzma.LZMAError, ZstdError,
           lz4.block.LZ4BlockError)


def stream(part: Part, ctx: Context, new_decompressor: Callable[[], object], name: str,
           multi_member: bool = True) -> None:
    """Decompress `part` into one child named `name`; with `multi_member`,
    concatenated members (gzip, lzip, zstd and lz4 frames) continue it.
    Zero padding after the end is ignored; other bytes there are reported
    (the part is flagged), as is a member cut short or corrupt."""
    sink = ctx.sink(part, name=name)
    run = _Run(new_decompressor, multi_member, sink.write)
    part.flags.add("expanded")
    try:
        for chunk in part.chunks():
            run.feed(chunk)
            ctx.budget.check_time()
        run.end_of_input()
    except LimitExceeded:
        sink.finish(truncated=True)
        raise
    except CORRUPT as err:
        sink.finish(truncated=run.member_output > 0 or not run.members)
        raise DecodeError(f"{part.detected} stream corrupt: {err}") from None
    child = sink.finish(truncated=not run.complete)
    if "truncated" in child.flags:
        part.flags.add("truncated")
    if run.trailing:
        raise DecodeError(f"{part.detected}: data after the end of the stream")


class _Run:
    """One pass over a stream of members, fed chunk by chunk."""

    def __init__(self, new_decompressor: Callable[[], object], multi_member: bool,
                 write: Callable[[bytes], None]):
        self.new_decompressor = new_decompressor
        self.multi_member = multi_member
        self.write = write
        self.decompressor = new_decompressor()
        self.members = 0  # members complete
        self.member_output = 0  # bytes from the member under way
        self.member_fed = False  # the member under way has had input
        self.over = False  # the last member ended; the rest is padding or trailing data
        self.trailing = False

    @property
    def complete(self) -> bool:
        return self.over or (self.members > 0 and not self.member_fed)

    def feed(self, data: bytes) -> None:
        if self.over:
            self.trailing = self.trailing or bool(data.strip(b"\0"))
            return
        decompressor = self.decompressor
        while True:
            self.member_fed = self.member_fed or bool(data)
            out = decompressor.decompress(data, CHUNK)
            self.member_output += len(out)
            self.write(out)
            # zlib keeps input it had no room for; the others keep output instead.
            data = getattr(decompressor, "unconsumed_tail", b"")
            if decompressor.eof:
                self.members += 1
                rest = decompressor.unused_data + data
                if not self.multi_member or (rest and not rest.strip(b"\0")):
                    self.over = True
                    self.trailing = bool(rest.strip(b"\0"))
                    return
                decompressor = self.decompressor = self.new_decompressor()  # the next member
                self.member_output, self.member_fed = 0, False
                if not rest:
                    return
                data = rest
                continue
            if data or not getattr(decompressor, "needs_input", True):  # zlib has none
                continue
            return

    def end_of_input(self) -> None:
        """Formats with no end marker (compress, lz4 legacy) end here."""
        if not self.over and self.member_fed and hasattr(self.decompressor, "end_of_input"):
            self.decompressor.end_of_input()
            self.feed(b"")


def inner_name(part: Part, suffixes: tuple[str, ...]) -> str:
    """The name a compressed part's content had: `part.name` less its suffix
    (a name that is only the suffix is kept, not emptied)."""
    name = part.name
    for suffix in suffixes:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@register("gzip")
def decode_gzip(part: Part, ctx: Context) -> None:
    name = _gzip_name(part.head(1024)) or inner_name(part, (".gz", ".tgz", ".z"))
    stream(part, ctx, lambda: zlib.decompressobj(wbits=31), name)


@register("bzip2")
def decode_bzip2(part: Part, ctx: Context) -> None:
    stream(part, ctx, bz2.BZ2Decompressor, inner_name(part, (".bz2", ".tbz")))


@register("xz")
def decode_xz(part: Part, ctx: Context) -> None:
    stream(part, ctx, lzma.LZMADecompressor, inner_name(part, (".xz", ".txz")))


@register("lzma")
def decode_lzma_alone(part: Part, ctx: Context) -> None:
    stream(part, ctx, lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT),
           inner_name(part, (".lzma", ".tlz")), multi_member=False)


@register("lzip")
def decode_lzip(part: Part, ctx: Context) -> None:
    stream(part, ctx, LzipMember, inner_name(part, (".lz", ".tlz")))


@register("zstd")
def decode_zstd(part: Part, ctx: Context) -> None:
    stream(part, ctx, ZstdDecompressor, inner_name(part, (".zst", ".zstd", ".tzst")))


@register("lz4")
def decode_lz4(part: Part, ctx: Context) -> None:
    stream(part, ctx, Lz4Frame, inner_name(part, (".lz4",)))


@register("compress")
def decode_compress(part: Part, ctx: Context) -> None:
    from amavisd.decode.archives import external  # here: archives' modules may import us

    name = inner_name(part, (".z",))
    if part.size >= LZW_TOOL_FROM and external.available("gzip") and \
            _uncompress_with_gzip(part, ctx, name):
        return
    stream(part, ctx, LzwDecompressor, name, multi_member=False)


def _uncompress_with_gzip(part: Part, ctx: Context, name: str) -> bool:
    """A big .Z through gzip(1), boxed: copied into a scratch dir, decoded in
    place there (its output watched against the allowance), then read back.
    False when gzip finds the stream corrupt: it then deletes its output, so
    the caller decodes in-process, which keeps what precedes the damage."""
    from amavisd.decode.archives import external

    work = ctx.scratch_dir(part)
    packed, unpacked = os.path.join(work, "x.Z"), os.path.join(work, "x")
    part.write_to(packed)
    try:
        result = external.run_tool(ctx, ["gzip", "-d", "-f", "-q", packed], cwd=work,
                                   watch=work)
    except LimitExceeded:
        _keep_output(part, ctx, unpacked, name, truncated=True)
        raise
    if result.returncode == 1:  # corrupt (2 is a warning: trailing garbage ignored)
        return False
    _keep_output(part, ctx, unpacked, name, truncated=False)
    return True


def _keep_output(part: Part, ctx: Context, path: str, name: str, truncated: bool) -> None:
    """What a tool wrote at `path` becomes the part's one child, charged."""
    sink = ctx.sink(part, name=name)
    part.flags.add("expanded")
    try:
        if os.path.lexists(path):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    sink.write(chunk)
            os.unlink(path)
    except LimitExceeded:
        sink.finish(truncated=True)
        raise
    sink.finish(truncated=truncated)
    if truncated:
        part.flags.add("truncated")


def _gzip_name(head: bytes) -> str:
    """The FNAME field of a gzip header, if any (RFC 1952)."""
    if len(head) < 10 or not head[3] & 0x08:
        return ""
    pos = 10
    if head[3] & 0x04:  # FEXTRA
        if len(head) < 12:
            return ""
        pos += 2 + int.from_bytes(head[10:12], "little")
    end = head.find(b"\0", pos)
    if end < 0:
        return ""
    return head[pos:end].decode("latin-1").translate({c: None for c in range(32)})[:255]


class _Buffered:
    """Shared plumbing for the adapters below: input kept until it can be
    used, output kept until asked for (at most `max_length` at a time)."""

    def __init__(self) -> None:
        self.input = bytearray()
        self.output = bytearray()
        self.eof = False
        self.unused_data = b""
        self.input_ended = False
        self.error: Exception | None = None  # raised once the output before it is out

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        if self.eof:
            self.unused_data += data
            return b""
        if self.error is not None and not self.output:
            raise self.error
        self.input += data
        limit = max_length if max_length >= 0 else 1 << 62
        try:
            while len(self.output) < limit and not self.eof and self._step():
                pass
        except Exception as err:  # corrupt input: first hand out what came before it
            if not self.output:
                raise
            self.error = err
        out = bytes(self.output[:limit])
        del self.output[:limit]
        return out

    @property
    def needs_input(self) -> bool:
        if self.output or self.error is not None:
            return False
        return self.eof or not self._can_step()

    def end_of_input(self) -> None:
        self.input_ended = True

    def _step(self) -> bool:  # decode a little; False when it needs more input
        raise NotImplementedError

    def _can_step(self) -> bool:
        raise NotImplementedError

    def _finish(self, rest: bytes) -> None:
        self.eof = True
        self.unused_data = bytes(rest)
        self.input = bytearray()


class LzipMember(_Buffered):
    """One lzip member: "LZIP", version, coded dictionary size, a raw LZMA1
    stream (lc=3 lp=0 pb=2, with an end marker), then CRC32, data size and
    (version 1) member size, all little-endian."""

    def __init__(self) -> None:
        super().__init__()
        self.lzma: lzma.LZMADecompressor | None = None
        self.crc = 0
        self.size = 0
        self.trailer = 20

    def _can_step(self) -> bool:
        if self.lzma is None:
            return len(self.input) >= 6
        if self.lzma.eof:
            return len(self.input) >= self.trailer
        return bool(self.input) or not self.lzma.needs_input

    def _step(self) -> bool:
        if not self._can_step():
            return False
        if self.lzma is None:
            self._start(bytes(self.input[:6]))
            del self.input[:6]
        elif not self.lzma.eof:
            data = bytes(self.input)
            self.input = bytearray()
            out = self.lzma.decompress(data, CHUNK)
            self.crc = zlib.crc32(out, self.crc)
            self.size += len(out)
            self.output += out
            if self.lzma.eof:
                self.input = bytearray(self.lzma.unused_data)
        else:
            self._check_trailer(bytes(self.input[:self.trailer]))
            self._finish(self.input[self.trailer:])
        return True

    def _start(self, header: bytes) -> None:
        if header[:4] != b"LZIP" or header[4] > 1:
            raise ValueError("not an lzip member")
        exponent, fraction = header[5] & 0x1F, header[5] >> 5
        if not 12 <= exponent <= 29:
            raise ValueError(f"lzip dictionary size 2^{exponent} invalid")
        dictionary = (1 << exponent) - fraction * (1 << exponent) // 16
        self.trailer = 20 if header[4] == 1 else 12
        self.lzma = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{
            "id": lzma.FILTER_LZMA1, "dict_size": dictionary, "lc": 3, "lp": 0, "pb": 2}])

    def _check_trailer(self, trailer: bytes) -> None:
        if int.from_bytes(trailer[0:4], "little") != self.crc:
            raise ValueError("lzip member CRC mismatch")
        if int.from_bytes(trailer[4:12], "little") != self.size:
            raise ValueError("lzip member data size mismatch")


LZ4_FRAME = b"\x04\x22\x4d\x18"
LZ4_LEGACY = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 * 1024 * 1024
LZ4_LEGACY_BOUND = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound


def _is_skippable(magic: bytes) -> bool:
    """zstd and lz4 share skippable frames: magic 0x184D2A50..0x184D2A5F."""
    return len(magic) == 4 and magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50


class Lz4Frame(_Buffered):
    """One lz4 frame of any kind: a standard frame (the lz4 package), a
    skippable frame (skipped), or a legacy frame (8 MiB blocks, no end
    marker: it ends with the input or where another frame's magic starts)."""

    def __init__(self) -> None:
        super().__init__()
        self.kind = ""
        self.frame: lz4.frame.LZ4FrameDecompressor | None = None

    def _can_step(self) -> bool:
        if not self.kind:
            return len(self.input) >= 4
        if self.kind == "frame":
            return bool(self.input) or not self.frame.needs_input
        if self.kind == "skippable":
            return len(self.input) >= 4 + int.from_bytes(self.input[:4], "little")
        if len(self.input) < 4:  # legacy
            return self.input_ended
        size = int.from_bytes(self.input[:4], "little")
        return self.input[:4] in (LZ4_FRAME, LZ4_LEGACY) or _is_skippable(self.input[:4]) \
            or len(self.input) >= 4 + size or self.input_ended

    def _step(self) -> bool:
        if not self._can_step():
            return False
        if not self.kind:
            magic = bytes(self.input[:4])
            if magic == LZ4_FRAME:
                self.kind, self.frame = "frame", lz4.frame.LZ4FrameDecompressor()
            elif magic == LZ4_LEGACY:
                self.kind = "legacy"
                del self.input[:4]
            elif _is_skippable(magic):
                self.kind = "skippable"
                del self.input[:4]
            else:
                raise ValueError("not an lz4 frame")
        elif self.kind == "frame":
            data = bytes(self.input)
            self.input = bytearray()
            self.output += self.frame.decompress(data, CHUNK)
            if self.frame.eof:
                self._finish(self.frame.unused_data or b"")
        elif self.kind == "skippable":
            self._finish(self.input[4 + int.from_bytes(self.input[:4], "little"):])
        else:
            self._legacy_block()
        return True

    def _legacy_block(self) -> None:
        magic = bytes(self.input[:4])
        if len(self.input) < 4 or magic in (LZ4_FRAME, LZ4_LEGACY) or _is_skippable(magic):
            if self.input.strip(b"\0") and len(self.input) < 4:
                raise ValueError("lz4 legacy frame cut short")
            self._finish(self.input)
            return
        size = int.from_bytes(magic, "little")
        if size > LZ4_LEGACY_BOUND:
            raise ValueError(f"lz4 legacy block of {size} bytes")
        if len(self.input) < 4 + size:
            raise ValueError("lz4 legacy block cut short")
        block = bytes(self.input[4:4 + size])
        del self.input[:4 + size]
        self.output += lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)


class LzwDecompressor(_Buffered):
    """compress(1) .Z: "\\x1f\\x9d", a flags byte (max code width, block mode),
    then LZW codes of 9..16 bits, least significant bit first.

    compress writes codes in groups of eight, one group filling exactly
    `width` bytes; when the width grows or the table is cleared (code 256 in
    block mode) the rest of the current group is padding. Decoding a group at
    a time keeps that rule and turns the bit unpacking into one int a group.

    The table is a rope: a string of at most ROPE bytes, optionally after an
    earlier entry, so its memory is bounded (65536 entries x ROPE bytes)
    however repetitive the data, where plain byte strings could reach 2 GiB.
    """

    ROPE = 256

    def __init__(self) -> None:
        super().__init__()
        self.started = False
        self.width = 9

    def _start(self, header: bytes) -> None:
        if header[:2] != b"\x1f\x9d":
            raise ValueError("not a compress(1) stream")
        self.max_width = header[2] & 0x1F
        self.block_mode = bool(header[2] & 0x80)
        if not 9 <= self.max_width <= 16:
            raise ValueError(f"compress code width {self.max_width} unsupported")
        self.max_code = 1 << self.max_width
        self._reset()
        self.started = True

    def _reset(self) -> None:
        self.tails = [bytes((c,)) for c in range(256)]
        self.bases = [-1] * 256
        if self.block_mode:  # 256 is CLEAR: a placeholder keeps codes and indices equal
            self.tails.append(b"")
            self.bases.append(-1)
        self.width = 9
        self.width_limit = (1 << 9) - 1
        self.previous = b""  # the last code's string, for the entry the next code defines
        self.previous_code = -1  # none: the next code is a literal and defines nothing

    def _can_step(self) -> bool:
        if not self.started:
            return len(self.input) >= 3 or self.input_ended
        return len(self.input) >= self.width or self.input_ended

    def _step(self) -> bool:
        if not self._can_step():
            return False
        if not self.started:
            if len(self.input) < 3:
                raise ValueError("compress(1) header cut short")
            self._start(bytes(self.input[:3]))
            del self.input[:3]
        elif not self.input:  # no end marker: the stream ends with its input
            self._finish(b"")
        else:
            self._decode_groups()
        return True

    def _decode_groups(self) -> None:
        """Groups while there is input for a whole one (or the last one), up to a chunk."""
        data, pos, output = self.input, 0, self.output
        while len(output) < CHUNK:
            width = self.width
            group = data[pos:pos + width]
            if len(group) < width and not (self.input_ended and group):
                break
            pos += width
            self._decode_group(int.from_bytes(group, "little"), len(group) * 8 // width)
        del data[:pos]

    def _decode_group(self, bits: int, count: int) -> None:
        width, mask = self.width, (1 << self.width) - 1
        tails, bases, output = self.tails, self.bases, self.output
        for _ in range(count):
            code = bits & mask
            bits >>= width
            if code == 256 and self.block_mode:
                self._reset()
                return  # the rest of the group is padding
            previous_code = self.previous_code
            if code < len(tails):
                text = tails[code] if bases[code] < 0 else self._string(code)
            elif code == len(tails) and previous_code >= 0:  # the entry being defined
                text = self.previous + self.previous[:1]
            else:
                raise ValueError(f"compress(1) code {code} not yet defined")
            output += text
            if previous_code >= 0 and len(tails) < self.max_code:
                tail = tails[previous_code]  # new entry: previous string + first byte
                if len(tail) < self.ROPE:
                    tails.append(tail + text[:1])
                    bases.append(bases[previous_code])
                else:
                    tails.append(text[:1])
                    bases.append(previous_code)
            self.previous, self.previous_code = text, code
            if len(tails) > self.width_limit:  # wider codes from the next group on
                self.width += 1
                self.width_limit = self.max_code if self.width == self.max_width \
                    else (1 << self.width) - 1
                return

    def _string(self, code: int) -> bytes:
        pieces = []
        while code >= 0:
            pieces.append(self.tails[code])
            code = self.bases[code]
        return b"".join(reversed(pieces))
