# SPDX-License-Identifier: MIT
"""BinHex 4.0 (.hqx) decoder for hostile mail; Python 3.11 dropped ``binhex``.

Written from RFC 1741 (appendix) and Peter N. Lewis' "BinHex 4.0 Definition"
(1991). The stream is three layers: 6-bit characters from a 64-char alphabet
between two ``:``; run-length coding (0x90 marker) over the whole byte stream;
and the file itself: header, data fork, resource fork, each followed by a
CRC-16 (poly 0x1021, init 0, "augmented" by two zero bytes, which makes it
exactly CRC-16/XMODEM of the section, i.e. ``binascii.crc_hqx(section, 0)``).

Defences: the run-length layer is expanded lazily and only as far as the
declared forks reach, with a hard cap of ``max_output`` bytes for the whole
decoded stream, so a 0x90 0xFF chain never allocates more than that; declared
lengths beyond the cap are refused before anything is expanded; every loop is
linear in the input; every failure is a :class:`BinHexError`.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["BinHexError", "BinHexFile", "find_binhex", "decode_binhex"]

ALPHABET = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# Map each BinHex character onto the base64 character of the same 6-bit
# value: both pack bits MSB first, so binascii's C decoder does the rest.
_TO_B64 = bytes.maketrans(ALPHABET, _B64)
_MARKER = b"(this file must be converted"  # BinHex 4.0 and macutils' variant
_MARKER_RE = re.compile(rb"\(This file must be converted[^)\r\n]*\)?", re.IGNORECASE)
_QUOTE = b" \t>"  # leading indentation / mail quoting stripped from each line
_SPACE = b" \t\r\n"
_GAP_RE = re.compile(rb"[\s>]*")
_LINE_RE = re.compile(rb"([^\r\n]*)(?:\r\n|\r|\n)?")
_RLE = 0x90
_FIXED_HEADER = 1 + 1 + 4 + 4 + 2 + 4 + 4  # name length, version, type, creator, flags, lengths


class BinHexError(Exception):
    """Malformed BinHex data; the message says what and where."""


@dataclass
class BinHexFile:
    """One decoded file; partial results are flagged, not thrown away, so they can still be scanned."""

    name: str
    file_type: bytes
    creator: bytes
    flags: int
    data: bytes
    resource: bytes
    crc_ok: bool  # all three CRCs present and matching
    truncated: bool  # declared fork bytes (or their CRCs) missing


def _lines(text: bytes, start: int) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, line without EOL) from ``start``; CR, LF and CRLF all end a line.

    A regex walk, not ``text[start:].splitlines()``: no copy of the rest of
    the text per block, which would be quadratic on many small blocks.
    """
    for match in _LINE_RE.finditer(text, start):
        if match.end() == match.start():
            return
        yield match.start(), match.group(1)


def _scan(text: bytes, colon: int, strict: bool) -> tuple[int, list[bytes], bool]:
    """Collect the encoded characters after the opening ``:`` at ``colon``.

    Returns (end offset, chunks, closed). Non-strict (finding) stops before
    the first line that is not BinHex; strict (decoding) raises on it instead.
    """
    close = text.find(b":", colon + 1)
    if close >= 0:  # fast path: a clean block is all alphabet and whitespace up to ':'
        flat = text[colon + 1 : close].translate(None, _SPACE)
        if not flat.translate(None, ALPHABET):
            return close + 1, [flat], True
    chunks: list[bytes] = []
    end = colon + 1
    first = True
    for offset, line in _lines(text, colon + 1):
        lead = 0 if first else len(line) - len(line.lstrip(_QUOTE))
        first = False
        close = line.find(b":", lead)
        body = line[lead:close] if close >= 0 else line[lead:]
        body = body.translate(None, _SPACE)  # whitespace inside lines is tolerated
        bad = body.translate(None, ALPHABET)
        if bad:
            if strict:
                where = offset + line.index(bad[:1], lead)
                raise BinHexError(f"invalid character {bad[:1]!r} at offset {where}")
            break
        chunks.append(body)
        if close >= 0:
            return offset + close + 1, chunks, True
        if body:
            end = offset + len(line)
    return end, chunks, False


def _six_to_eight(encoded: bytes) -> bytes:
    """Undo the 6-bit layer; a lone trailing character holds no whole byte and is dropped."""
    usable = len(encoded) - (len(encoded) % 4 == 1)
    b64 = encoded[:usable].translate(_TO_B64)
    b64 += b"=" * (-len(b64) % 4)
    try:
        return binascii.a2b_base64(b64)
    except binascii.Error as err:  # cannot happen after validation; keep the contract anyway
        raise BinHexError(f"6-bit decoding failed: {err}") from None


class _Expander:
    """Lazy run-length decoder: expands only as far as asked, never past ``limit``."""

    def __init__(self, src: bytes, limit: int) -> None:
        self.src = src
        self.pos = 0
        self.out = bytearray()
        self.limit = limit

    def fill(self, want: int) -> bool:
        """Expand until ``want`` bytes are available; False if the input runs out first."""
        if want > self.limit:
            raise BinHexError(f"output limit: {want} bytes needed, limit {self.limit}")
        src, out, end, pos = self.src, self.out, len(self.src), self.pos
        while len(out) < want and pos < end:  # one token per turn: a plain stretch or a marker
            if src[pos] != _RLE:
                need = want - len(out)
                mark = src.find(_RLE, pos, pos + need)
                stop = mark if mark >= 0 else min(end, pos + need)
                out += src[pos:stop]
                pos = stop
                continue
            if pos + 1 >= end:  # marker without its count: the stream was cut
                pos = end
                break
            count = src[pos + 1]
            pos += 2
            if count == 0:
                out.append(_RLE)
            elif not out:
                raise BinHexError(f"run-length repeat with no previous byte at offset {pos - 2}")
            elif count > 1:
                if len(out) + count - 1 > self.limit:
                    raise BinHexError(
                        f"output limit: run at offset {pos - 2} exceeds {self.limit} bytes"
                    )
                out += out[-1:] * (count - 1)
        self.pos = pos
        return len(out) >= want


def _crc(section: bytes | bytearray | memoryview) -> int:
    """BinHex CRC: bit-serial CCITT over the section plus two zero bytes == CRC-16/XMODEM."""
    return binascii.crc_hqx(section, 0)


def _opening_colon(text: bytes, marker_end: int) -> int:
    """Offset of the ':' that opens the encoded block, or -1."""
    gap = _GAP_RE.match(text, marker_end).end()
    if marker_end and gap < len(text) and text[gap] == 0x3A:
        return gap  # directly after the "(This file ...)" line, as the spec has it
    for offset, line in _lines(text, marker_end):
        content = line.lstrip(_QUOTE)
        if content.startswith(b":"):
            return offset + len(line) - len(content)
    return -1


def _plausible_start(content: bytes) -> bool:
    """A marker-less ':' line counts only if it looks like a BinHex header start."""
    body = content[1:].split(b":", 1)[0].rstrip(_SPACE)
    if len(body) < 20 or body.translate(None, ALPHABET):
        return False
    return 1 <= _six_to_eight(body[:4])[0] <= 63  # file name length per the spec


def find_binhex(text: bytes) -> list[tuple[int, int]]:
    """Spans (start, end) of BinHex blocks pasted in a text body, ready for :func:`decode_binhex`.

    A block starts at a "(This file must be converted ...)" line followed by
    ':' (after blank or quoted lines), or, without that line, at a line that
    starts with ':' and plausibly begins a BinHex header. It ends after the
    closing ':' or, if cut, after its last encoded line.
    """
    spans: list[tuple[int, int]] = []
    if b":" not in text:
        return spans
    pos = 0
    while pos < len(text):
        line_match = _LINE_RE.match(text, pos)
        offset, line, pos = pos, line_match.group(1), line_match.end()
        content = line.lstrip(_QUOTE)
        if content[: len(_MARKER)].lower() == _MARKER:
            close = content.find(b")")
            if close < 0:
                continue
            gap = _GAP_RE.match(text, offset + len(line) - len(content) + close + 1).end()
            if gap >= len(text) or text[gap] != 0x3A:
                continue
            colon = gap
        elif content.startswith(b":") and _plausible_start(content):
            colon = offset + len(line) - len(content)
        else:
            continue
        end, chunks, closed = _scan(text, colon, strict=False)
        if closed or any(chunks):
            spans.append((offset, end))
            pos = max(pos, end)
    return spans


def decode_binhex(block: bytes, max_output: int) -> BinHexFile:
    """Decode one BinHex 4.0 block (with or without its "(This file ...)" line).

    ``max_output`` caps the whole decoded stream (header + forks + CRCs).
    Raises :class:`BinHexError` for anything malformed or over the cap.
    """
    if max_output < 0:
        raise ValueError("max_output must be >= 0")
    marker = _MARKER_RE.search(block)
    colon = _opening_colon(block, marker.end() if marker else 0)
    if colon < 0:
        raise BinHexError("no BinHex data: opening ':' not found")
    _end, chunks, _closed = _scan(block, colon, strict=True)
    rle = _Expander(_six_to_eight(b"".join(chunks)), max_output)
    if not rle.fill(1):
        raise BinHexError("no BinHex data: empty stream")
    header_len = rle.out[0] + _FIXED_HEADER
    if not rle.fill(header_len + 2):
        raise BinHexError(f"stream ends inside the {header_len}-byte header")
    out = rle.out
    head = bytes(out[:header_len])
    pos = 1 + head[0] + 1  # skip name length, name, version
    file_type, creator = head[pos : pos + 4], head[pos + 4 : pos + 8]
    flags = int.from_bytes(head[pos + 8 : pos + 10], "big")
    data_len = int.from_bytes(head[pos + 10 : pos + 14], "big")
    rsrc_len = int.from_bytes(head[pos + 14 : pos + 18], "big")
    total = header_len + 2 + data_len + 2 + rsrc_len + 2
    if total > max_output:
        raise BinHexError(
            f"output limit: header declares data {data_len} + resource {rsrc_len} bytes,"
            f" limit {max_output}"
        )
    complete = rle.fill(total)
    data_at = header_len + 2
    rsrc_at = data_at + data_len + 2
    sections = ((0, header_len), (data_at, data_len), (rsrc_at, rsrc_len))
    with memoryview(out) as view:  # one copy per fork, not two
        crc_ok = complete and all(
            _crc(view[at : at + size]) == int.from_bytes(view[at + size : at + size + 2], "big")
            for at, size in sections
        )
        data = bytes(view[data_at : data_at + data_len])
        resource = bytes(view[rsrc_at : rsrc_at + rsrc_len])
    raw_name = head[1 : 1 + head[0]].decode("mac_roman", errors="replace")
    return BinHexFile(
        name="".join(ch for ch in raw_name if ch >= " " and ch != "\x7f"),
        file_type=file_type,
        creator=creator,
        flags=flags,
        data=data,
        resource=resource,
        crc_ok=crc_ok,
        truncated=not complete,
    )
