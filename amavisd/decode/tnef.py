# SPDX-License-Identifier: MIT
"""Defensive TNEF (winmail.dat, application/ms-tnef) parser.

Outlook wraps attachments in TNEF, so a virus inside winmail.dat is invisible
to a scanner until the stream is taken apart. Input is hostile: every declared
length is checked against the bytes actually present and against the output
budget *before* anything is sliced, counts are capped, and every loop consumes
input, so any byte string either parses (possibly ``truncated``) or raises
`TnefError` quickly. Written from [MS-OXTNEF], [MS-OXCDATA] and [MS-OXRTFCP].
Stdlib only; embedded messages are returned as bytes, never parsed here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["TnefError", "TnefAttachment", "TnefContent", "parse_tnef", "decompress_rtf"]

SIGNATURE = 0x223E9F78
MAX_ATTRIBUTES = 10_000
MAX_PROPERTIES = 10_000  # per property list, and per multi-valued property

# Attribute tags (low 16 bits of the attribute id; the type bits are ignored
# so a mislabelled attribute is still seen).
_ATT_BODY = 0x800C
_ATT_ATTACH_DATA = 0x800F
_ATT_ATTACH_TITLE = 0x8010
_ATT_ATTACH_REND_DATA = 0x9002
_ATT_MSG_PROPS = 0x9003
_ATT_ATTACHMENT = 0x9005

# MAPI property types.
_PT_OBJECT = 0x000D
_PT_STRING8 = 0x001E
_PT_UNICODE = 0x001F
_PT_BINARY = 0x0102
_MV_FLAG = 0x1000
_FIXED_SIZE = {  # encoded size in TNEF: 16-bit values are padded to 4 bytes
    0x0002: 4, 0x0003: 4, 0x0004: 4, 0x0005: 8, 0x0006: 8, 0x0007: 8,
    0x000A: 4, 0x000B: 4, 0x0014: 8, 0x0040: 8, 0x0048: 16,
}
_VARIABLE = {_PT_OBJECT, _PT_STRING8, _PT_UNICODE, _PT_BINARY, 0x00FB}

# MAPI property ids we extract.
_PR_BODY = 0x1000
_PR_RTF_COMPRESSED = 0x1009
_PR_HTML = 0x1013  # PR_BODY_HTML (string) and PR_HTML (binary) share the id
_PR_DISPLAY_NAME = 0x3001
_PR_ATTACH_DATA = 0x3701  # PR_ATTACH_DATA_BIN (binary) / PR_ATTACH_DATA_OBJ (object)
_PR_ATTACH_FILENAME = 0x3704
_PR_ATTACH_METHOD = 0x3705
_PR_ATTACH_LONG_FILENAME = 0x3707
_PR_ATTACH_MIME_TAG = 0x370E
_MSG_WANTED = frozenset({_PR_BODY, _PR_RTF_COMPRESSED, _PR_HTML})
_ATT_WANTED = frozenset({_PR_DISPLAY_NAME, _PR_ATTACH_DATA, _PR_ATTACH_FILENAME,
                         _PR_ATTACH_METHOD, _PR_ATTACH_LONG_FILENAME, _PR_ATTACH_MIME_TAG})
_ATTACH_EMBEDDED_MSG = 5
_IID_IMESSAGE = b"\x07\x03\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46"

# [MS-OXRTFCP] 2.1.2.1: the dictionary's initial contents (207 bytes).
_RTF_PREBUF = (
    b"{\\rtf1\\ansi\\mac\\deff0\\deftab720{\\fonttbl;}{\\f0\\fnil \\froman "
    b"\\fswiss \\fmodern \\fscript \\fdecor MS Sans SerifSymbolArialTimes New "
    b"RomanCourier{\\colortbl\\red0\\green0\\blue0\r\n\\par \\pard\\plain\\f0"
    b"\\fs20\\b\\i\\u\\tab\\tx"
)
_RTF_LZFU = 0x75465A4C  # "LZFu"
_RTF_MELA = 0x414C454D  # "MELA": stored uncompressed
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)])


class TnefError(Exception):
    """Not TNEF, or over a resource limit: the caller must not treat the part as clean."""


@dataclass
class TnefAttachment:
    name: str = ""
    data: bytes = b""
    mime_type: str = ""
    embedded_message: bool = False  # data is an embedded message (TNEF) for the caller
    alt_names: tuple[str, ...] = ()  # its other names: Outlook shows PR_DISPLAY_NAME


@dataclass
class TnefContent:
    attachments: list[TnefAttachment] = field(default_factory=list)
    body_text: bytes = b""  # 8-bit as sent; a PT_UNICODE PR_BODY is re-encoded to UTF-8
    body_html: bytes = b""
    body_rtf: bytes = b""
    rtf_compressed: bool = False  # body_rtf could not be decompressed and is raw LZFu
    truncated: bool = False  # stream ended early or turned to garbage; rest is returned
    checksum_errors: int = 0


@dataclass
class _Pending:
    """One attachment while its attributes are collected (they come in any order)."""

    title: str = ""
    names: dict[int, str] = field(default_factory=dict)
    data: bytes | None = None  # attAttachData
    props_data: bytes | None = None  # PR_ATTACH_DATA_BIN / _OBJ
    object_iid: bytes = b""
    method: int = 0
    mime_type: str = ""

    def finish(self) -> list[TnefAttachment]:
        """The MAPI data wins (attAttachData is then often a placeholder text),
        but a differing attAttachData is kept as a second attachment: both
        could carry a payload."""
        name = (self.names.get(_PR_ATTACH_LONG_FILENAME) or self.title
                or self.names.get(_PR_ATTACH_FILENAME) or self.names.get(_PR_DISPLAY_NAME, ""))
        others = tuple(n for n in dict.fromkeys((self.title, *self.names.values()))
                       if n and n != name)
        if self.props_data is None:
            return [TnefAttachment(name, self.data or b"", self.mime_type, alt_names=others)]
        embedded = self.object_iid == _IID_IMESSAGE or (
            self.object_iid != b"" and self.method == _ATTACH_EMBEDDED_MSG)
        found = [TnefAttachment(name, self.props_data, self.mime_type, embedded, others)]
        if self.data is not None and self.data != self.props_data:
            found.append(TnefAttachment(name, self.data, self.mime_type, alt_names=others))
        return found


def _clean_name(raw: str) -> str:
    return raw.split("\0", 1)[0].translate(_CONTROL).strip()


def _text(prop_type: int, value: memoryview) -> str:
    if prop_type == _PT_UNICODE:
        return bytes(value).decode("utf-16-le", "replace")
    return bytes(value).decode("cp1252", "replace")


class _Truncated(Exception):
    """Internal: a declared length or count runs past its container."""


def _props(buf: memoryview, wanted: frozenset[int]) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (prop_id, prop_type, value) for single-valued wanted properties.

    Object values keep their 16-byte IID prefix. Raises _Truncated on a length,
    count or type that cannot be right, since guessing would misparse the rest.
    """
    end = len(buf)
    if end < 4:
        raise _Truncated
    (count,) = struct.unpack_from("<I", buf, 0)
    if count * 4 > end - 4:
        raise _Truncated
    if count > MAX_PROPERTIES:
        raise TnefError("too many MAPI properties")
    pos = 4
    for _ in range(count):
        if end - pos < 4:
            raise _Truncated
        prop_type, prop_id = struct.unpack_from("<HH", buf, pos)
        pos += 4
        if prop_id >= 0x8000:  # named: GUID, kind, then an id or a UTF-16 name
            if end - pos < 24:
                raise _Truncated
            (kind,) = struct.unpack_from("<I", buf, pos + 16)
            pos += 24
            if kind == 1:
                (name_len,) = struct.unpack_from("<I", buf, pos - 4)
                if name_len > end - pos:
                    raise _Truncated
                pos = min(end, pos + ((name_len + 3) & ~3))
            elif kind != 0:
                raise _Truncated
        base = prop_type & ~_MV_FLAG
        multi = prop_type & _MV_FLAG or base in _VARIABLE
        if multi:
            if end - pos < 4:
                raise _Truncated
            (nvalues,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            nvalues = 1
        if base in _FIXED_SIZE:
            size = _FIXED_SIZE[base] * nvalues
            if size > end - pos:
                raise _Truncated
            if prop_id in wanted and not prop_type & _MV_FLAG:
                yield prop_id, prop_type, buf[pos:pos + size]
            pos += size
        elif base in _VARIABLE:
            if nvalues * 4 > end - pos:
                raise _Truncated
            if nvalues > MAX_PROPERTIES:
                raise TnefError("too many MAPI values")
            for index in range(nvalues):
                if end - pos < 4:
                    raise _Truncated
                (length,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if length > end - pos or (base == _PT_OBJECT and length < 16):
                    raise _Truncated
                if index == 0 and prop_id in wanted and not prop_type & _MV_FLAG:
                    yield prop_id, prop_type, buf[pos:pos + length]
                pos = min(end, pos + ((length + 3) & ~3))
        else:
            raise _Truncated  # unknown type: its size is unknown


def decompress_rtf(blob: bytes | memoryview, limit: int) -> bytes:
    """Decompress PR_RTF_COMPRESSED ([MS-OXRTFCP]); ValueError if malformed.

    Output stops at the declared raw size; TnefError once it would pass `limit`
    (checked as it grows: a lying header allocates nothing up front).
    """
    if len(blob) < 16:
        raise ValueError("short RTF header")
    comp_size, raw_size, magic, crc = struct.unpack_from("<IIII", blob, 0)
    raw_size = min(raw_size, limit + 1)
    body = bytes(blob[16:comp_size + 4]) if comp_size >= 12 else b""
    if magic == _RTF_MELA:
        out = bytearray(body[:raw_size])
    elif magic != _RTF_LZFU:
        raise ValueError("unknown RTF compression")
    elif zlib.crc32(body, 0xFFFFFFFF) ^ 0xFFFFFFFF != crc:  # CRC-32 without pre/post xor
        raise ValueError("RTF CRC mismatch")
    else:
        out = _lzfu(body, raw_size)
    if len(out) > limit:
        raise TnefError("output limit")
    return bytes(out)


def _lzfu(body: bytes, raw_size: int) -> bytearray:
    """LZ77 over a 4 KiB ring preloaded with common RTF; 8 flags per control byte.

    The ring is kept as a linear history rotated so that its end is the write
    position: a reference is then one slice copy, not a byte loop.
    """
    start = len(_RTF_PREBUF)
    hist = bytearray(4096 - start) + _RTF_PREBUF
    stop = len(hist) + raw_size
    pos, end, control, bit = 0, len(body), 0, 8
    while pos < end and len(hist) < stop:
        if bit == 8:
            control, bit = body[pos], 0
            pos += 1
            continue
        flag = control >> bit & 1
        bit += 1
        if not flag:  # literal byte
            hist.append(body[pos])
            pos += 1
            continue
        if end - pos < 2:
            raise ValueError("RTF reference cut short")
        ref = body[pos] << 8 | body[pos + 1]
        pos += 2
        length, here = (ref & 0xF) + 2, len(hist)
        distance = (here + start - (ref >> 4)) & 0xFFF
        if distance == 0:  # reference to the write position: end marker
            break
        source = hist[here - distance:here - distance + length]
        if length > distance:  # overlapping copy repeats the last `distance` bytes
            source = (source * (length // distance + 1))[:length]
        hist += source
    return hist[4096:4096 + raw_size]


class _Parser:
    def __init__(self, data: bytes, max_output: int):
        self.view = memoryview(data)
        self.left = max(0, max_output)
        self.content = TnefContent()
        self.current: _Pending | None = None

    def take(self, value: memoryview | bytes) -> bytes:
        """Charge the budget, then copy: nothing is allocated past the limit."""
        if len(value) > self.left:
            raise TnefError("output limit")
        self.left -= len(value)
        return bytes(value)

    def attachment(self, *, new: bool = False) -> _Pending:
        if new or self.current is None:
            self.flush()
            self.current = _Pending()
        return self.current

    def flush(self) -> None:
        if self.current is not None:
            self.content.attachments.extend(self.current.finish())
            self.current = None

    def run(self) -> None:
        view, size, pos = self.view, len(self.view), 6
        for _ in range(MAX_ATTRIBUTES + 1):
            if pos >= size:
                break
            if size - pos < 11 or view[pos] not in (1, 2):
                # Cut inside a header, or garbage; a short tail of NULs or
                # line ends is common transport padding, not truncation.
                if size - pos >= 11 or bytes(view[pos:]).strip(b"\0\r\n\t "):
                    self.content.truncated = True
                break
            attr_id, length = struct.unpack_from("<II", view, pos + 1)
            start = pos + 9
            if length > size - start - 2:
                self.content.truncated = True
                break
            value = view[start:start + length]
            (checksum,) = struct.unpack_from("<H", view, start + length)
            if sum(value) & 0xFFFF != checksum:
                self.content.checksum_errors += 1
            try:
                self.attribute(attr_id & 0xFFFF, value)
            except _Truncated:
                self.content.truncated = True
                break
            pos = start + length + 2
        else:
            raise TnefError("too many attributes")
        self.flush()

    def attribute(self, tag: int, value: memoryview) -> None:
        if tag == _ATT_ATTACH_REND_DATA:
            self.attachment(new=True)
        elif tag == _ATT_ATTACH_DATA:
            att = self.attachment(new=self.current is not None and self.current.data is not None)
            att.data = self.take(value)
        elif tag == _ATT_ATTACH_TITLE:
            att = self.attachment()
            if not att.title:
                att.title = _clean_name(bytes(value).decode("cp1252", "replace"))
        elif tag == _ATT_ATTACHMENT:
            self.attachment_props(value)
        elif tag == _ATT_BODY:
            self.content.body_text += self.take(value)
        elif tag == _ATT_MSG_PROPS:
            self.message_props(value)

    def attachment_props(self, value: memoryview) -> None:
        att = self.attachment()
        for prop_id, prop_type, data in _props(value, _ATT_WANTED):
            base = prop_type & ~_MV_FLAG
            if prop_id == _PR_ATTACH_DATA and base in (_PT_BINARY, _PT_OBJECT):
                if att.props_data is not None:
                    att = self.attachment(new=True)  # never overwrite hidden content
                if base == _PT_OBJECT:
                    att.object_iid = bytes(data[:16])
                    data = data[16:]
                att.props_data = self.take(data)
            elif prop_id == _PR_ATTACH_METHOD and len(data) >= 4:
                (att.method,) = struct.unpack_from("<I", data, 0)
            elif base in (_PT_STRING8, _PT_UNICODE):
                if prop_id == _PR_ATTACH_MIME_TAG:
                    att.mime_type = _clean_name(_text(base, data))
                elif prop_id not in att.names:
                    att.names[prop_id] = _clean_name(_text(base, data))

    def message_props(self, value: memoryview) -> None:
        content = self.content
        for prop_id, prop_type, data in _props(value, _MSG_WANTED):
            if prop_type == _PT_UNICODE:
                data = _text(prop_type, data).rstrip("\0").encode("utf-8")
            elif prop_type == _PT_STRING8:
                data = bytes(data).rstrip(b"\0")
            elif prop_type != _PT_BINARY:
                continue
            if prop_id == _PR_BODY:
                content.body_text += self.take(data)
            elif prop_id == _PR_HTML:
                content.body_html += self.take(data)
            elif prop_id == _PR_RTF_COMPRESSED and prop_type == _PT_BINARY:
                try:
                    rtf = decompress_rtf(data, self.left)
                except ValueError:
                    content.body_rtf += self.take(data)
                    content.rtf_compressed = True
                else:
                    content.body_rtf += self.take(rtf)


def parse_tnef(data: bytes, max_output: int) -> TnefContent:
    """Parse a TNEF stream; raise TnefError if it is not one or exceeds `max_output`.

    `max_output` bounds the sum of all returned content: attachment data and
    bodies (decompressed RTF included); names are small and bounded by the input.
    """
    if len(data) < 6 or struct.unpack_from("<I", data, 0)[0] != SIGNATURE:
        raise TnefError("not TNEF (bad signature)")
    parser = _Parser(bytes(data), max_output)
    try:
        parser.run()
    except (struct.error, IndexError, ValueError, OverflowError) as err:  # last-resort net
        raise TnefError(f"malformed TNEF: {err}") from err
    return parser.content
