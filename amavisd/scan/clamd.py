"""clamd over its socket protocol: INSTREAM of in-memory parts.

Parts are streamed (INSTREAM), so clamd needs no access to our files and may
be remote. All parts of one message share one connection (IDSESSION), one
request at a time, so a many-part message costs one connect. Any reply other
than `OK` or `... FOUND` (e.g. `INSTREAM size limit exceeded. ERROR`) is a
`ScannerError`, never a clean verdict.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

from amavisd.config import parse_address
from amavisd.decode.parts import Part
from amavisd.scan.base import ScannerError
from amavisd.verdict import Finding


class ClamdScanner:
    name = "clamd"

    def __init__(self, address: str, timeout: float = 120.0):
        self.address = address
        self.kind, self.target = parse_address(address)
        self.timeout = timeout

    def _connect(self, timeout: float) -> socket.socket:
        try:
            if self.kind == "tcp":
                return socket.create_connection(self.target, timeout=timeout)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.target)
            except OSError:
                sock.close()
                raise
            return sock
        except OSError as err:
            raise ScannerError(f"clamd at {self.address}: cannot connect: {err}") from None

    def command(self, command: str, timeout: float = 10.0) -> str:
        """A one-shot command such as PING or VERSION."""
        sock = self._connect(timeout)
        try:
            sock.sendall(b"z" + command.encode() + b"\0")
            return _read_reply(sock, self.address).decode("utf-8", "replace")
        except (OSError, ScannerError) as err:
            raise ScannerError(f"clamd at {self.address}: {command}: {err}") from None
        finally:
            sock.close()

    def ping(self) -> bool:
        try:
            return self.command("PING") == "PONG"
        except ScannerError:
            return False

    def scan(self, parts: Sequence[Part]) -> list[Finding]:
        todo = [p for p in parts if p.size]
        if not todo:
            return []
        deadline = time.monotonic() + self.timeout
        sock = self._connect(self.timeout)
        findings: list[Finding] = []
        try:
            sock.sendall(b"zIDSESSION\0")
            for number, part in enumerate(todo, 1):
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                _send_stream(sock, part)
                reply = _read_reply(sock, self.address).decode("utf-8", "replace")
                name = _parse_scan_reply(reply, number, part, self.address)
                if name:
                    findings.append(Finding(part=part.path, name=name, scanner=self.name))
            sock.sendall(b"zEND\0")
        except TimeoutError:
            raise ScannerError(f"clamd at {self.address}: no answer within "
                               f"{self.timeout:g}s") from None
        except OSError as err:
            raise ScannerError(f"clamd at {self.address}: {err}") from None
        finally:
            sock.close()
        return findings


def _send_stream(sock: socket.socket, part: Part) -> None:
    sock.sendall(b"zINSTREAM\0")
    for chunk in part.chunks():  # from memory, or from the spill file
        sock.sendall(struct.pack("!L", len(chunk)) + chunk)
    sock.sendall(b"\0\0\0\0")


def _read_reply(sock: socket.socket, address: str) -> bytes:
    buf = bytearray()
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ScannerError(f"clamd at {address} closed the connection"
                               + (f" after {bytes(buf)!r}" if buf else ""))
        buf += chunk
        end = buf.find(b"\0")
        if end >= 0:
            # One request at a time: nothing may follow the terminator.
            return bytes(buf[:end])
        if len(buf) > 65536:
            raise ScannerError(f"clamd at {address}: reply too long")


def _parse_scan_reply(reply: str, number: int, part: Part, address: str) -> str | None:
    """'3: stream: OK' -> None; '3: stream: Eicar FOUND' -> 'Eicar'; else ScannerError."""
    ident, sep, rest = reply.partition(": ")
    if sep and ident.isdigit():
        if int(ident) != number:
            raise ScannerError(f"clamd at {address}: reply for request {ident}, "
                               f"expected {number}")
        reply = rest
    if reply.startswith("stream: "):
        reply = reply[len("stream: "):]
    if reply == "OK":
        return None
    if reply.endswith(" FOUND"):
        return reply[: -len(" FOUND")]
    raise ScannerError(f"clamd at {address} on part {part.path}: {reply}")
