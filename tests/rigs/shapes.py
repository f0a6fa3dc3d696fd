"""Messages of any size in each shape a decoder walks differently, for the
memory ladder (`bench/memory.py`) and the big-message tests.

Issue 16's target is that a message costs a worker at most twice its size
in RSS whatever its shape, so each shape here exercises one path of the
streaming code: a base64 body (decoded a window at a time), short and long
text lines (the splitter's boundary search), quoted-printable and uuencode
(decoded line by line), archives inside an attachment (a reader over a
spilled part), a forwarded message (decomposed one layer down), and many
small parts (the part tree itself). The payloads are seeded random bytes,
so the same size gives the same message from run to run; `tail` (EICAR, say)
goes at the very end of what the shape decodes to.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
import tarfile
import zipfile
from collections.abc import Callable

SEED = 16
HEAD = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: big\r\n"
        b"Message-ID: <big@example.test>\r\nMIME-Version: 1.0\r\n")


def noise(size: int, seed: int = SEED) -> bytes:
    return random.Random(seed).randbytes(max(0, size))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def attached(body: bytes, encoding: str, name: str = "big.bin",
             mime: str = "application/octet-stream") -> bytes:
    """A multipart/mixed message: a line of text, then `body` as an attachment."""
    return (HEAD + b'Content-Type: multipart/mixed; boundary="b0und"\r\n\r\n'
            b"--b0und\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--b0und\r\nContent-Type: " + mime.encode() + b"\r\n"
            b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
            b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n"
            + body + b"\r\n--b0und--\r\n")


def base64_attachment(size: int, tail: bytes = b"") -> bytes:
    """Random bytes base64-encoded in 76-column CRLF lines: `size` bytes of mail."""
    return base64_of(noise(size * 3 // 4 - 1024) + tail)


def base64_of(payload: bytes, name: str = "big.bin",
              mime: str = "application/octet-stream") -> bytes:
    return attached(crlf(base64.encodebytes(payload)), "base64", name, mime)


def text_lines(size: int, tail: bytes = b"", line: bytes = b"short line of text\r\n") -> bytes:
    """A text/plain body of `line` over and over; by default 20-column prose,
    the most line objects a size can have (the case that once cost 1 GB for 64 MB)."""
    return HEAD + b"Content-Type: text/plain\r\n\r\n" + line * (size // len(line)) + tail


def bare_base64(size: int, tail: bytes = b"") -> bytes:
    """A text body of 76 digits a line: nothing but base64 digits, so it is
    also decoded as base64 without headers (textual.decode_bare_base64)."""
    return text_lines(size, tail, b"0123456789" * 7 + b"abcdef\r\n")


def long_line(size: int, tail: bytes = b"") -> bytes:
    """One line as long as the message: no line end to cut a window at."""
    return (HEAD + b"Content-Type: text/plain\r\n\r\n"
            + (b"abcdefghij" * (size // 10 + 1))[:size] + tail + b"\r\n")


def quoted_printable(size: int, tail: bytes = b"") -> bytes:
    """Random bytes quoted-printable (about 2.3 times their size)."""
    body = crlf(binascii.b2a_qp(noise(size * 10 // 23), istext=False))
    return attached(body + crlf(binascii.b2a_qp(tail)), "quoted-printable")


def uuencoded(size: int, tail: bytes = b"") -> bytes:
    """A text body with a classic `begin` ... `end` block in it."""
    payload = noise(size * 3 // 4 - 4096) + tail
    lines = b"".join(binascii.b2a_uu(payload[i:i + 45]) for i in range(0, len(payload), 45))
    return (HEAD + b"Content-Type: text/plain\r\n\r\nhere it is\r\n\r\nbegin 644 big.bin\r\n"
            + crlf(lines) + b"`\r\nend\r\n")


def zip_in_attachment(size: int, tail: bytes = b"") -> bytes:
    """A zip of one big stored member (and `tail` as a second) in base64."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("data.bin", noise(size * 3 // 4 - 64 * 1024))
        if tail:
            zf.writestr("tail.com", tail)
    return base64_of(buf.getvalue(), "big.zip", "application/zip")


def targz_in_attachment(size: int, tail: bytes = b"") -> bytes:
    """A tar.gz of one big member (random: gzip cannot shrink it) in base64."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for name, data in (("data.bin", noise(size * 3 // 4 - 64 * 1024)), ("tail.com", tail)):
            if data:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return base64_of(buf.getvalue(), "big.tar.gz", "application/gzip")


def forwarded(size: int, tail: bytes = b"") -> bytes:
    """A message/rfc822 attachment holding a base64 attachment."""
    inner = base64_attachment(size - 512, tail)
    return (HEAD + b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
            b"--outer\r\nContent-Type: text/plain\r\n\r\nforwarded\r\n"
            b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner
            + b"\r\n--outer--\r\n")


def many_parts(size: int, tail: bytes = b"", part: int = 4096) -> bytes:
    """multipart/mixed of base64 parts of `part` bytes of mail each."""
    raw = noise(part * 3 // 4 - 64)
    one = (b"--b0und\r\nContent-Type: application/octet-stream\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + crlf(base64.encodebytes(raw)))
    last = (b"--b0und\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + crlf(base64.encodebytes(tail))
            ) if tail else b""
    return (HEAD + b'Content-Type: multipart/mixed; boundary="b0und"\r\n\r\n'
            + one * max(1, size // len(one)) + last + b"--b0und--\r\n")


SHAPES: dict[str, Callable[..., bytes]] = {
    "attachment": base64_attachment,
    "short lines": text_lines,
    "bare base64": bare_base64,
    "long line": long_line,
    "quoted-printable": quoted_printable,
    "uuencode": uuencoded,
    "zip in attachment": zip_in_attachment,
    "tar.gz in attachment": targz_in_attachment,
    "message/rfc822": forwarded,
    "many parts": many_parts,
}
