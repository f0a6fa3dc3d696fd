"""clamd over its socket protocol: INSTREAM of in-memory parts.

Parts are streamed (INSTREAM), so clamd needs no access to our files and may
be remote. All parts of one message share one connection (IDSESSION), one
request at a time, so a many-part message costs one connect (measured in
bench/scan_transport.py against CONTSCAN of a work dir and against pyclamd's
connection per part). Any reply other than `OK` or `... FOUND` is a
`ScannerError`, never a clean verdict. A part over clamd's StreamMaxLength
(`max_stream`, or clamd's own `INSTREAM size limit exceeded`) is reported as
missed, so a backup scanner gets it or the message is UNCHECKED.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

from amavisd.decode.parts import Part
from amavisd.scan.base import Health, ScannerError, ScanReport
from amavisd.verdict import Finding
from amavisd_client.wire.address import Address, parse

SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"


def address_of(text: str) -> Address:
    """clamd's address as the settings spell it: unix:/path or tcp:host:port."""
    return parse(text, accept=("unix", "tcp"))


class StreamRefused(Exception):
    """clamd closed the stream over its StreamMaxLength; the session is gone."""


class ClamdScanner:
    def __init__(self, address: str, timeout: float = 120.0, max_stream: int = 25 * 1024 * 1024,
                 name: str = "clamd"):
        self.name = name
        self.address = address
        where = address_of(address)
        self.kind, self.target = where.kind, where.target
        self.timeout = timeout
        self.max_stream = max_stream
        self.connections = 0  # connects made, for tests and the benchmark

    def _connect(self, timeout: float) -> socket.socket:
        self.connections += 1
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

    def health(self) -> Health:
        """`ClamAV 1.4.6/27830/Mon Nov 24 09:12:01 2026`: version, signature
        version and date, as clamd reports them."""
        try:
            return Health(self.name, True, self.command("VERSION"))
        except ScannerError as err:
            return Health(self.name, False, str(err))

    def scan(self, parts: Sequence[Part]) -> ScanReport:
        report = ScanReport(self.name)
        todo = []
        for part in parts:
            if part.size > self.max_stream:
                report.missed[part.path] = (f"{self.name}: {part.size} bytes, over "
                                            f"StreamMaxLength {self.max_stream}")
            elif part.size:
                todo.append(part)
        deadline = time.monotonic() + self.timeout
        while todo:  # one session, or a new one after clamd refused an oversized stream
            todo = self._session(todo, deadline, report)
        return report

    def _session(self, todo: list[Part], deadline: float, report: ScanReport) -> list[Part]:
        """Scan parts on one IDSESSION; return those left when clamd hung up."""
        sock = self._connect(max(0.1, deadline - time.monotonic()))
        try:
            sock.sendall(b"zIDSESSION\0")
            for number, part in enumerate(todo, 1):
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    reply = _stream_part(sock, part, self.address)
                except StreamRefused as refused:
                    report.missed[part.path] = f"{self.name}: {refused}"
                    return todo[number:]
                name = _parse_scan_reply(reply, number, part, self.address)
                if name:
                    report.findings.append(Finding(part=part.path, name=name,
                                                   scanner=self.name))
            sock.sendall(b"zEND\0")
        except TimeoutError:
            raise ScannerError(f"clamd at {self.address}: no answer within "
                               f"{self.timeout:g}s") from None
        except OSError as err:
            raise ScannerError(f"clamd at {self.address}: {err}") from None
        finally:
            sock.close()
        return []


def _stream_part(sock: socket.socket, part: Part, address: str) -> str:
    try:
        _send_stream(sock, part)
    except (BrokenPipeError, ConnectionResetError):
        # clamd stops reading and hangs up when a stream passes StreamMaxLength;
        # its reason is usually still waiting in our receive buffer.
        try:
            reply = _read_reply(sock, address).decode("utf-8", "replace")
        except (OSError, ScannerError):
            reply = ""
        if SIZE_LIMIT_REPLY in reply:
            raise StreamRefused(f"over clamd's StreamMaxLength ({reply})") from None
        raise ScannerError(f"clamd at {address} hung up while receiving part {part.path}"
                           + (f": {reply}" if reply else "")) from None
    reply = _read_reply(sock, address).decode("utf-8", "replace")
    if SIZE_LIMIT_REPLY in reply:
        raise StreamRefused(f"over clamd's StreamMaxLength ({reply})")
    return reply


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
