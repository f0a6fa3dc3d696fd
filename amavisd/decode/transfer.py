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

A body too big to hold (`stream_body`) is decoded a line-aligned window at
a time into its part's spill file, with the same output: base64 carries
the digits of an unfinished quantum to the next window, quoted-printable
and uuencode are decoded line by line anyway. Broken base64 is not
streamed: the stdlib's lenient rules need the whole body (such a body costs
what it always did, under twice its size).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator

from amavisd.decode import window

UUENCODE = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})
# Nothing but base64 and line ends, with at most two "=" at the very end.
_CLEAN_BASE64 = re.compile(rb"[A-Za-z0-9+/\r\n]*+(?:=[\r\n]*+){0,2}+")
_BASE64_LINES = re.compile(rb"[A-Za-z0-9+/\r\n]*+")


def decode_body(data: window.Buffer, start: int, end: int, encoding: str,
                max_output: int) -> tuple[bytes, bool]:
    """data[start:end] decoded per `encoding` (the header's value as the
    stdlib reads it: lower-cased, not stripped): (bytes, clean)."""
    if window.mapped(data):
        return _decode_mapped(data, start, end, encoding, max_output)
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
    if window.mapped(data):  # a mapping has no count(): the span is read (it may be held)
        data, start, end = window.copy(data, start, end), 0, end - start
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

    blocks = find_uuencoded(body, max_output)  # LimitExceeded past it: UNCHECKED
    if blocks:
        return b"".join(payload for _, payload, _ in blocks), True
    return uudecode_lines(body, max_output)[0], True


def _decode_mapped(data: window.Buffer, start: int, end: int, encoding: str,
                   max_output: int) -> tuple[bytes, bool]:
    """decode_body of a span of a mapping, to be held: decoded a window at a
    time into one bytes object (the output is all it costs), or where only
    the whole body will do (broken base64, uuencode past the budget) read
    from the file, as decode_body reads bytes."""
    if encoding not in ("base64", "quoted-printable") and encoding.strip() not in UUENCODE:
        return window.copy(data, start, end), True
    stream = stream_body(data, start, end, encoding, max_output)
    if stream is not None:
        try:
            return window.gather(stream), stream.clean
        except NotStreamable:
            pass
    return decode_body(window.copy(data, start, end), 0, end - start, encoding, max_output)


class Streamed:
    """A big body's decoded bytes as chunks; `clean` is known once they are all out."""

    def __init__(self, chunks: Iterator[bytes] | None = None) -> None:
        self._chunks: Iterator[bytes] = iter(()) if chunks is None else chunks
        self.clean = True

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


def stream_body(data: window.Buffer, start: int, end: int, encoding: str,
                max_output: int) -> Streamed | None:
    """data[start:end] decoded a window at a time (as `decode_body` would
    decode it whole), or None where only the whole-body path can (broken base64).
    For uuencode past `max_output`, LimitExceeded comes out of the iteration
    (a file we did not see: UNCHECKED); NotStreamable: decode it whole."""
    if encoding == "base64":
        if not _clean_base64(data, start, end):
            return None
        streamed = Streamed()
        streamed._chunks = _base64_windows(data, start, end, streamed)  # it sets `clean`
        return streamed
    if encoding == "quoted-printable":
        return Streamed(binascii.a2b_qp(memoryview(data)[a:b])
                        for a, b in window.spans(data, start, end))
    if encoding.strip() in UUENCODE:
        from amavisd.decode.textual import uudecode_body

        return Streamed(uudecode_body(data, start, end, max_output))
    return Streamed(window.chunks(data, start, end))


def _clean_base64(data: window.Buffer, start: int, end: int) -> bool:
    """Nothing but base64 and line ends, "=" only at the end: a window at a time."""
    for a, b in window.spans(data, start, end, window.WINDOW, whole_lines=False):
        pattern = _CLEAN_BASE64 if b == end else _BASE64_LINES
        if not pattern.fullmatch(data, a, b):
            return False
    return True


class NotStreamable(Exception):
    """The body turned out to need the whole-body path (its last quantum)."""


def _base64_windows(data: window.Buffer, start: int, end: int,
                    streamed: Streamed) -> Iterator[bytes]:
    """Clean base64 a window at a time. A window of whole quanta (the usual
    case: 76-digit lines) is decoded from a view, line ends and all, as
    decode_base64 does; otherwise, and always where "=" is (without it a
    non-strict decode of digits not in whole quanta fails, with it it may
    not, and whether the digits come in quanta decides `clean`), its digits
    are copied and the unfinished quantum carried on. A last quantum left
    unfinished is padded, as the stdlib's lenient path does (and the part
    flagged), unless even that fails."""
    view = memoryview(data)
    carry = b""
    try:
        for a, b in window.spans(data, start, end, whole_lines=False):  # one long line too
            if not carry and data.find(b"=", a, b) < 0:  # a window with "=" is counted
                try:
                    yield binascii.a2b_base64(view[a:b])
                    continue
                except binascii.Error:  # not whole quanta
                    pass
            digits = carry + data[a:b].translate(None, b"\r\n")
            whole = len(digits) - len(digits) % 4
            carry = digits[whole:]
            yield binascii.a2b_base64(digits[:whole])
    finally:
        view.release()
    if carry:
        streamed.clean = False
        try:
            yield binascii.a2b_base64(carry + b"=" * (-len(carry) % 4), strict_mode=True)
        except binascii.Error:
            raise NotStreamable from None
