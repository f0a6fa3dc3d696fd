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


def has_embedded(part: Part) -> bool:
    if part.size > MAX_TEXT_SCAN:
        return False
    data = part.read()
    return _UU_BEGIN.search(data) is not None or b"(This file must be converted" in data


@register("text", probe=has_embedded)
def decode_text(part: Part, ctx: Context) -> None:
    data = part.read()
    for name, payload, ok in find_uuencoded(data, ctx.budget.allowance()):
        child = ctx.add(part, payload, name=name, mime_type="application/octet-stream")
        if not ok:
            child.flags.add("decode-error")
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
        out = bytearray()
        ok = end is not None
        for line in data[match.end():stop].splitlines():
            if not line.strip():
                continue
            try:
                out += binascii.a2b_uu(line)
            except binascii.Error:
                try:  # some encoders drop trailing padding: trust the length byte
                    length = (line[0] - 32) & 63
                    out += binascii.a2b_uu(line[: 1 + (length * 4 + 2) // 3])
                except (binascii.Error, IndexError):
                    ok = False
            if len(out) > max_output:
                raise DecodeError(f"uuencoded block {name!r} beyond the size budget")
        found.append((name, bytes(out), ok))
        pos = end.end() if end else len(data)
    return found


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
