# SPDX-License-Identifier: MIT
"""A raw SMTP/LMTP client for protocol tests: bytes out, replies back.

smtplib cannot do what these tests need: pipeline a group of commands in
one write, read one reply per recipient after an LMTP DATA, or hang up in
the middle of a message. This one sends exactly the bytes it is given.

    with Talk("127.0.0.1", port) as talk:
        talk.greeting                      # (220, "host ESMTP ...")
        talk.send(b"EHLO x\\r\\n")
        code, text = talk.reply()          # multi-line text joined with "\\n"
        talk.command("MAIL FROM:<a@b>")    # send a line and read its reply

Also the test messages with CRLF lines, as an MTA hands them over.
"""

from __future__ import annotations

import base64
import io
import socket
import zipfile

from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message

__all__ = ["Talk", "crlf", "clean", "eicar", "eicar_zipped", "banned"]


class Talk:
    def __init__(self, host: str, port: int = 0, timeout: float = 60.0):
        if port:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:  # a Unix socket path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(host)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One reply; (0, "") when the server hung up."""
        lines = []
        while True:
            try:
                line = self.file.readline(65536)
            except ConnectionResetError:
                line = b""
            if not line:
                return 0, "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]) if text[:3].isdigit() else -1, "\n".join(lines)

    def replies(self, count: int) -> list[tuple[int, str]]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str) -> tuple[int, str]:
        """Send one line, read its reply; (0, "") once the server hung up."""
        try:
            self.send(line.encode("utf-8") + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return 0, ""
        return self.reply()

    def message(self, data: bytes) -> None:
        """The DATA payload: dot-stuffed, ended by CRLF "." CRLF."""
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.send(stuffed + b".\r\n")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Talk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def clean(subject: str = "hello") -> bytes:
    return crlf(clean_message(subject))


def eicar(subject: str = "virus") -> bytes:
    return crlf(eicar_message(subject=subject))


def eicar_zipped(subject: str = "zipped virus") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", EICAR)
    attachment = base64.encodebytes(buffer.getvalue()).decode()
    return crlf((
        "From: mallory@example.test\nTo: bob@example.test\n"
        f"Subject: {subject}\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="zz"\n\n'
        "--zz\nContent-Type: text/plain\n\nSee the archive.\n"
        '--zz\nContent-Type: application/zip; name="docs.zip"\n'
        "Content-Transfer-Encoding: base64\n\n" + attachment + "--zz--\n").encode())


def banned(subject: str = "banned") -> bytes:
    attachment = base64.encodebytes(b"just text, but the name runs").decode()
    return crlf((
        "From: mallory@example.test\nTo: bob@example.test\n"
        f"Subject: {subject}\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="bb"\n\n'
        "--bb\nContent-Type: text/plain\n\nOpen me.\n"
        '--bb\nContent-Type: application/octet-stream; name="invoice.pdf.exe"\n'
        'Content-Disposition: attachment; filename="invoice.pdf.exe"\n'
        "Content-Transfer-Encoding: base64\n\n" + attachment + "--bb--\n").encode())
