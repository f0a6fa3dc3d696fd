"""A message as SMTP's DATA wants it, block by block: CRLF lines, dot-stuffed.

Sans-IO and streaming, so a 50 MB message goes out in blocks of 256 KiB and
is never whole in memory. Why here and not smtplib's `data()`: that one
takes the whole message as one string and converts it at once.

What it does to the bytes, and nothing else (RFC 5321 4.5.2, 2.3.8):
- a bare LF becomes CRLF (a message spooled by a Unix tool has LF lines;
  sent as is, the final "." would not be at the start of a line); a bare
  CR is left alone, as Postfix leaves it;
- a line that starts with "." gets another in front, so no line of the
  message can end the DATA early (smuggling a second message);
- the message ends with CRLF, then ".\\r\\n".
The normalising runs before the stuffing, so "\\n.\\r\\n" inside a message
becomes "\\r\\n..\\r\\n", never an end of data.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 256 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DataEncoder:
    """Feed raw message blocks, get wire blocks; `end()` closes the DATA."""

    def __init__(self) -> None:
        self.last_cr = False  # the last byte fed was CR (a CRLF may be split)
        self.at_line_start = True  # the next byte starts a line

    def feed(self, block: bytes) -> bytes:
        if not block:
            return b""
        head = b""
        if self.last_cr and block[:1] == b"\n":
            head, block = b"\n", block[1:]  # the LF of a CRLF split across blocks
            self.at_line_start = True
        # as many CRLF as LF: no bare LF (the usual case, and a spool that came
        # by SMTP): two C scans instead of the regex engine's lookbehind a line
        out = block if block.count(b"\n") == block.count(b"\r\n") else \
            _BARE_LF.sub(b"\r\n", block)
        out = out.replace(b"\n.", b"\n..")
        if self.at_line_start and out[:1] == b".":
            out = b"." + out
        out = head + out
        self.last_cr = out[-1:] == b"\r"
        self.at_line_start = out[-1:] == b"\n"
        return out

    def end(self) -> bytes:
        if self.last_cr:  # a lone CR at the very end: complete its line
            return b"\n.\r\n"
        return b".\r\n" if self.at_line_start else b"\r\n.\r\n"


def raw_blocks(data: bytes | BinaryIO, size: int = BLOCK) -> Iterator[bytes]:
    """The message in blocks, as it is: bytes sliced, a file read from where it stands."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(0, len(view), size):
            yield bytes(view[start:start + size])
        return
    hint = getattr(data, "size", None)  # a small message: no 256 KiB buffer made for it
    first = min(size, hint + 1) if isinstance(hint, int) and hint >= 0 else size
    while block := data.read(first):
        yield block
        if len(block) >= first:  # no hint, or a short one: full blocks from here
            first = size


def message_chunks(data: bytes | BinaryIO) -> Iterator[bytes]:
    """The whole DATA payload on the wire, the final ".\\r\\n" included.
    The end goes out with the last block, not alone: a small write behind
    an unacknowledged one waits for the peer's delayed ACK (Nagle), 40 ms
    a message on Linux loopback."""
    encoder = DataEncoder()
    pending = b""
    for block in raw_blocks(data):
        out = encoder.feed(block)
        if out:
            if pending:
                yield pending
            pending = out
    yield pending + encoder.end()


def message_size(data: bytes | BinaryIO) -> int | None:
    """Bytes left to send (SIZE= is an estimate by definition), None if unknown."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return len(data)
    size = getattr(data, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(data.fileno()).st_size - data.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None


class Prefixed(io.RawIOBase):
    """`prefix` then the rest of `body` from where it stands: our header
    lines in front of a spooled message, without copying the message."""

    def __init__(self, prefix: bytes, body: BinaryIO, body_size: int | None = None):
        super().__init__()
        self._prefix = memoryview(prefix)
        self._body = body
        self.size = None if body_size is None else len(prefix) + body_size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        # the prefix and the body's start in one read: a small message then
        # goes out in one write, not our header lines alone and then the rest
        view = memoryview(buffer).cast("B")
        n = 0
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            if n == len(view):
                return n
        chunk = self._body.read(len(view) - n)
        view[n:n + len(chunk)] = chunk
        return n + len(chunk)
