"""Decompressors for the single-stream formats read here member by member.

Each is one member (or frame) in the shape of the standard library's
decompressors, so compressed.stream() drives them like bz2's and lzma's:
`decompress(data, max_length)`, `eof`, `needs_input`, `unused_data`, and
`end_of_input()` for formats with no end marker. `Buffered` holds input until
it can be used and output until it is asked for, and when the input turns
out corrupt it first hands out the output that came before the fault.

- GzipMember: gzip's header, raw deflate, then the trailer, checked after
  the data is out: zlib's gzip mode checks the trailer in the call that
  returns the last output and, when the check fails, raises and loses it.
- LzipMember: lzip's header, raw LZMA1, the trailer checked likewise.
- Lz4Frame: a standard, skippable or legacy lz4 frame.
- LzwDecompressor: compress(1) .Z, our own LZW.
A check that fails over data already out is reported in `check_failed`, not
raised: the data stays, the caller flags it. Never an OSError of ours in here:
nothing reads or writes a file.
"""

from __future__ import annotations

import lzma
import zlib

import lz4.block
import lz4.frame

try:  # Python >= 3.14
    from compression.zstd import ZstdError
except ImportError:  # pragma: no cover - depends on the Python version
    from backports.zstd import ZstdError

CHUNK = 1024 * 1024
LZMA_MEMLIMIT = 512 * 1024 * 1024  # an LZMA header may ask for any dictionary size
# What a decompressor's own call raises on bad input (bz2 says OSError). Caught
# around that call only, never around our reads and writes.
CORRUPT = (OSError, EOFError, ValueError, RuntimeError, zlib.error, lzma.LZMAError, ZstdError,
           lz4.block.LZ4BlockError)
GZIP_MAX_HEADER = 64 * 1024  # FEXTRA, FNAME and FCOMMENT together (gzip(1) takes more)


class CutShort(ValueError):
    """The input ended inside a member of a format with no end marker."""


class Buffered:
    """Shared plumbing for the adapters below: input kept until it can be
    used, output kept until asked for (at most `max_length` at a time)."""

    def __init__(self) -> None:
        self.input = bytearray()
        self.output = bytearray()
        self.eof = False
        self.unused_data = b""
        self.input_ended = False
        self.error: Exception | None = None  # raised once the output before it is out
        self.check_failed = ""  # the data decoded, its check value did not match

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
        except CORRUPT as err:  # corrupt input: first hand out what came before it
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


class GzipMember(Buffered):
    """One gzip member (RFC 1952): a header, raw deflate, then CRC-32 and the
    size mod 2^32. Read here rather than by zlib's gzip mode, which checks the
    trailer in the same call that returns the last output and, when the check
    fails, raises and loses that output (a small file: all of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inflater = None
        self.crc = 0
        self.size = 0
        self.pending = False  # the last call filled its output: the inflater may have more

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        """While inflating with nothing held back, straight through zlib: the
        buffering costs a third of the time on big members. The header, the
        trailer and output held after an error go the buffered way."""
        if self.inflater is None or self.inflater.eof or self.output or self.error is not None:
            return super().decompress(data, max_length)
        out = self._inflate(data, max_length)  # nothing held: an error loses nothing
        if self.inflater.eof and (max_length < 0 or len(out) < max_length):
            out += super().decompress(b"", max_length - len(out) if max_length >= 0 else -1)
        return out

    def _inflate(self, data: bytes, max_length: int) -> bytes:
        """Inflate what is held plus `data`, at most `max_length` bytes out."""
        if self.input:
            self.input += data
            data = self.input
        out = self.inflater.decompress(data, max(max_length, 0))  # zlib: 0 is no bound
        self.pending = 0 < max_length == len(out)
        # at the end zlib may leave the rest in both (CPython keeps a stale tail)
        self.input = bytearray(self.inflater.unused_data if self.inflater.eof
                               else self.inflater.unconsumed_tail)
        self.crc = zlib.crc32(out, self.crc)
        self.size += len(out)
        return out

    def _can_step(self) -> bool:
        if self.inflater is None:
            try:
                return _gzip_header_size(self.input) is not None
            except ValueError:
                return True  # _step raises it, inside the decompress call
        if not self.inflater.eof:
            return bool(self.input) or self.pending
        return len(self.input) >= 8

    def _step(self) -> bool:
        if not self._can_step():
            return False
        if self.inflater is None:
            size = _gzip_header_size(self.input)
            self.check_failed = _gzip_header_check(bytes(self.input[:size]))
            del self.input[:size]
            self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        elif not self.inflater.eof:
            self.output += self._inflate(b"", CHUNK)
        else:
            crc, size = int.from_bytes(self.input[:4], "little"), \
                int.from_bytes(self.input[4:8], "little")
            if crc != self.crc:
                self.check_failed = self.check_failed or "gzip member CRC-32 mismatch"
            elif size != self.size & 0xFFFFFFFF:
                self.check_failed = self.check_failed or "gzip member size mismatch"
            self._finish(self.input[8:])
        return True


def _gzip_header_size(buf: bytearray) -> int | None:
    """The length of the gzip header at the start of `buf`; None while more
    bytes are needed; ValueError when it is no gzip header."""
    if buf[:3] != b"\x1f\x8b\x08"[:len(buf)]:
        raise ValueError("not a gzip member (magic or method)")
    if len(buf) < 10:
        return None
    flags = buf[3]
    if flags & 0xE0:
        raise ValueError(f"gzip member with reserved flags {flags:#x}")
    pos = 10
    if flags & 0x04:  # FEXTRA
        if len(buf) < 12:
            return None
        pos += 2 + int.from_bytes(buf[10:12], "little")
    for flag in (0x08, 0x10):  # FNAME, FCOMMENT: NUL-terminated
        if flags & flag:
            end = buf.find(b"\0", pos, GZIP_MAX_HEADER)
            if end < 0:
                if len(buf) >= GZIP_MAX_HEADER:
                    raise ValueError(f"gzip header longer than {GZIP_MAX_HEADER} bytes")
                return None
            pos = end + 1
    if flags & 0x02:  # FHCRC
        pos += 2
    if pos > GZIP_MAX_HEADER:
        raise ValueError(f"gzip header longer than {GZIP_MAX_HEADER} bytes")
    return pos if len(buf) >= pos else None


def _gzip_header_check(header: bytes) -> str:
    """The FHCRC check, where there is one ("" when it holds or is absent)."""
    if not header[3] & 0x02:
        return ""
    if zlib.crc32(header[:-2]) & 0xFFFF != int.from_bytes(header[-2:], "little"):
        return "gzip header CRC-16 mismatch"
    return ""


class LzipMember(Buffered):
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
            self.check_failed = self._check_trailer(bytes(self.input[:self.trailer]))
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

    def _check_trailer(self, trailer: bytes) -> str:
        """What failed of the trailer's checks ("" when none did): the data is
        out by then, and stays out."""
        if int.from_bytes(trailer[0:4], "little") != self.crc:
            return "lzip member CRC mismatch"
        if int.from_bytes(trailer[4:12], "little") != self.size:
            return "lzip member data size mismatch"
        return ""


LZ4_FRAME = b"\x04\x22\x4d\x18"
LZ4_LEGACY = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 * 1024 * 1024
LZ4_LEGACY_BOUND = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound


def is_skippable(magic: bytes) -> bool:
    """zstd and lz4 share skippable frames: magic 0x184D2A50..0x184D2A5F."""
    return len(magic) == 4 and magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50


class Lz4Frame(Buffered):
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
        return self.input[:4] in (LZ4_FRAME, LZ4_LEGACY) or is_skippable(self.input[:4]) \
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
            elif is_skippable(magic):
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
        if len(self.input) < 4 or magic in (LZ4_FRAME, LZ4_LEGACY) or is_skippable(magic):
            if self.input.strip(b"\0") and len(self.input) < 4:
                raise CutShort("lz4 legacy frame cut short")
            self._finish(self.input)
            return
        size = int.from_bytes(magic, "little")
        if size > LZ4_LEGACY_BOUND:
            raise ValueError(f"lz4 legacy block of {size} bytes")
        if len(self.input) < 4 + size:
            raise CutShort("lz4 legacy block cut short")
        block = bytes(self.input[4:4 + size])
        del self.input[:4 + size]
        self.output += lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)


class LzwDecompressor(Buffered):
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
                raise CutShort("compress(1) header cut short")
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
