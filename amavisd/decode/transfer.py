"""Content-Transfer-Encoding: one MIME body, decoded from a span of the message.

Why not `Message.get_payload(decode=True)`: it needs the body as a str of
the whole entity and, for base64, a copy of it split into lines and joined
again (a list of a million line objects for a 64 MB attachment). Here a
clean base64 body is decoded straight from a view of the message's bytes;
only a broken one is copied to be decoded leniently, with the stdlib's
rules (the same bytes, and the same bodies counted as broken), so the tree
does not change with the parser.

Sans-IO: bytes in, bytes out; a body that cannot be decoded comes back as
it is, with `clean` False (the part is then flagged decode-error).
"""

from __future__ import annotations

import binascii
import re

from amavisd.decode.registry import DecodeError

UUENCODE = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})
# Nothing but base64 and line ends, with at most two "=" at the very end.
_CLEAN_BASE64 = re.compile(rb"[A-Za-z0-9+/\r\n]*+(?:=[\r\n]*+){0,2}+")


def decode_body(data: bytes, start: int, end: int, encoding: str,
                max_output: int) -> tuple[bytes, bool]:
    """data[start:end] decoded per `encoding` (the header's value as the
    stdlib reads it: lower-cased, not stripped): (bytes, clean)."""
    if encoding == "base64":
        return decode_base64(data, start, end)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(memoryview(data)[start:end]), True
    if encoding.strip() in UUENCODE:
        return decode_uuencode(data[start:end], max_output)
    return data[start:end], True


def decode_base64(data: bytes, start: int, end: int) -> tuple[bytes, bool]:
    """Decode without copying the body when it is clean base64; else as the
    stdlib does: the body without its line ends, padded where it lacks
    padding, non-alphabet bytes skipped, and left as it is when even that fails."""
    if _CLEAN_BASE64.fullmatch(data, start, end):
        digits = end - start - data.count(b"\n", start, end) - data.count(b"\r", start, end)
        if digits % 4 == 0:
            return binascii.a2b_base64(memoryview(data)[start:end]), True
    encoded = data[start:end].translate(None, b"\r\n")
    missing = -len(encoded) % 4
    try:
        return binascii.a2b_base64(encoded + b"=" * missing, strict_mode=True), missing == 0
    except binascii.Error:
        pass
    for padding in (b"", b"=="):
        try:
            return binascii.a2b_base64(encoded + padding), False
        except binascii.Error:
            pass
    return encoded, False


def decode_uuencode(body: bytes, max_output: int) -> tuple[bytes, bool]:
    """Our own uudecoder (the stdlib pads cut-off lines with zeros): the
    `begin` ... `end` blocks, or, without any, the lines as they are."""
    from amavisd.decode.textual import find_uuencoded, uudecode_lines

    try:
        blocks = find_uuencoded(body, max_output)
        if blocks:
            return b"".join(payload for _, payload, _ in blocks), True
        return uudecode_lines(body, max_output)[0], True
    except DecodeError:
        return body, False
