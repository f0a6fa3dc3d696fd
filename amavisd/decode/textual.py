"""Encodings that live inside text, and mail-borne formats without MIME.

- uuencode: `begin 644 name` ... `end` blocks anywhere in a text body,
  several per body (the text itself is still scanned).
- BinHex 4.0: as an attachment, or pasted into a text body.
- base64 with no headers at all (a body that is nothing but base64 lines).
- TNEF (winmail.dat): attached files, bodies and embedded messages.
"""

from __future__ import annotations

import binascii
import re

from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

_UU_BEGIN = re.compile(rb"^begin(?:-base64)? +([0-7]{3,4}) +([^\r\n]*)\r?$", re.M)
_UU_END = re.compile(rb"^end\r?$", re.M)
MAX_TEXT_SCAN = 64 * 1024 * 1024  # text bodies larger than this are not searched for blocks


_MIME_BOUNDARY = re.compile(
    rb"^--([ -~]{1,70}?)[ \t]*\r?\n(?:[!-9;-~]+:[^\n]*\r?\n(?:[ \t][^\n]*\r?\n)*)*?"
    rb"content-(?:type|transfer-encoding|disposition)[ \t]*:", re.I | re.M)
MAX_BOUNDARIES = 4


def has_embedded(part: Part) -> bool:
    if part.size > MAX_TEXT_SCAN:
        return False
    data = part.read()
    return (_UU_BEGIN.search(data) is not None or b"(This file must be converted" in data
            or (b"\n--" in data and _MIME_BOUNDARY.search(data) is not None))


def _inside_reading(part: Part) -> bool:
    node: Part | None = part
    while node is not None:
        if "mime-reading" in node.flags:
            return True
        node = node.parent
    return False


def mime_readings(data: bytes) -> list[bytes]:
    """Boundary-delimited MIME parts inside a text body: the structure a mail
    client may see where our parser saw none (e.g. `Content-Type(x):` header
    tricks). Each boundary found gives one multipart reading to decode."""
    boundaries = list(dict.fromkeys(m.group(1).rstrip(b"-").strip() or m.group(1)
                                    for m in _MIME_BOUNDARY.finditer(data)))
    return [b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="' + b.replace(
        b'"', b"") + b'"\n\n' + data for b in boundaries[:MAX_BOUNDARIES]]


@register("text", probe=has_embedded)
def decode_text(part: Part, ctx: Context) -> None:
    data = part.read()
    for name, payload, ok in find_uuencoded(data, ctx.budget.allowance()):
        child = ctx.add(part, payload, name=name, mime_type="application/octet-stream")
        if not ok:
            child.flags.add("decode-error")
    if not _inside_reading(part):  # a reading's own text gets no further readings
        for reading in mime_readings(data):
            part.flags.add("ambiguous")
            child = ctx.add(part, reading, name="(MIME structure found in text)",
                            mime_type="message/rfc822", detected="mail")
            child.flags.add("mime-reading")
    if b"BinHex" in data or b"(This file must be converted" in data:
        from amavisd.decode import binhex

        for start, end in binhex.find_binhex(data):
            add_binhex(part, data[start:end], ctx)


def find_uuencoded(data: bytes, max_output: int) -> list[tuple[str, bytes, bool]]:
    """Every uuencoded block: (name, decoded bytes, all lines decoded cleanly)."""
    found = []
    pos = 0
    while match := _UU_BEGIN.search(data, pos):
        end = _UU_END.search(data, match.end())
        stop = end.start() if end else len(data)
        name = match.group(2).decode("latin-1").strip().translate(
            {c: "?" for c in range(32)})[:255]
        payload, ok = uudecode_lines(data[match.end():stop], max_output, name)
        found.append((name, payload, ok and end is not None))
        pos = end.end() if end else len(data)
    return found


def uudecode_lines(body: bytes, max_output: int, name: str = "") -> tuple[bytes, bool]:
    """Decode uuencoded lines, skipping any line too short for the length it
    declares (a cut-off `end`, a signature): binascii would pad it with zeros."""
    out = bytearray()
    ok = True
    for line in body.splitlines():
        line = line.rstrip(b"\r")
        if not line.strip() or line in (b"end", b"`"):
            continue
        count = (line[0] - 32) & 63
        if len(line) - 1 < (count * 4 + 2) // 3:
            ok = False
            continue
        try:
            out += binascii.a2b_uu(line[: 1 + (count * 4 + 2) // 3 + 3])
        except binascii.Error:
            try:  # some encoders drop trailing padding: trust the length byte
                out += binascii.a2b_uu(line[: 1 + (count * 4 + 2) // 3])
            except binascii.Error:
                ok = False
        if len(out) > max_output:
            raise DecodeError(f"uuencoded block {name!r} beyond the size budget")
    return bytes(out), ok


@register("binhex")
def decode_binhex_part(part: Part, ctx: Context) -> None:
    from amavisd.decode import binhex

    data = part.read()
    spans = binhex.find_binhex(data) or [(0, len(data))]
    for start, end in spans:
        add_binhex(part, data[start:end], ctx)
    part.flags.add("expanded")


def add_binhex(parent: Part, block: bytes, ctx: Context) -> None:
    from amavisd.decode import binhex

    try:
        decoded = binhex.decode_binhex(block, ctx.budget.allowance())
    except binhex.BinHexError as err:
        raise DecodeError(f"BinHex: {err}") from None
    for fork, suffix in ((decoded.data, ""), (decoded.resource, " (resource fork)")):
        if fork or not suffix:
            child = ctx.add(parent, fork, name=decoded.name + suffix,
                            mime_type="application/octet-stream")
            if not decoded.crc_ok:
                child.flags.add("decode-error")
            if decoded.truncated:
                child.flags.add("truncated")


@register("base64")
def decode_bare_base64(part: Part, ctx: Context) -> None:
    data = part.read()
    try:
        decoded = binascii.a2b_base64(re.sub(rb"[^A-Za-z0-9+/=]", b"", data))
    except binascii.Error as err:
        raise DecodeError(f"base64: {err}") from None
    if decoded:
        ctx.add(part, decoded, name=part.name)
        part.flags.add("expanded")


@register("tnef")
def decode_tnef(part: Part, ctx: Context) -> None:
    from amavisd.decode import tnef

    try:
        content = tnef.parse_tnef(part.read(), ctx.budget.allowance())
    except tnef.TnefError as err:
        raise DecodeError(f"TNEF: {err}") from None
    part.flags.add("expanded")
    for attachment in content.attachments:
        child = ctx.add(part, attachment.data, name=attachment.name,
                        mime_type=attachment.mime_type or "application/octet-stream")
        if attachment.embedded_message:
            child.flags.add("embedded-message")
    for body, mime_type in ((content.body_text, "text/plain"), (content.body_html, "text/html"),
                            (content.body_rtf, "text/rtf")):
        if body:
            ctx.add(part, body, name="(tnef body)", mime_type=mime_type)
    if content.truncated:
        part.flags.add("truncated")
