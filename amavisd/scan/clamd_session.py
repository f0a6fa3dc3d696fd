"""One clamd IDSESSION on the wire: numbered INSTREAM requests, NUL-ended replies.

What the session must never do is guess: clamd numbers the requests of a
session from 1 and puts the number in front of each reply, and this object
only hands replies back (`read_reply`, `drain`) for `ClamdScanner` to match
by that number. A connection clamd closed is a `Hangup` (its reason, e.g. a
refusal, may still be buffered: `drain` returns what came before the end).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Sequence

from amavisd.decode.parts import Part
from amavisd.scan.base import ScannerError

MAX_REPLY = 65536
COALESCE = 64 * 1024  # in-memory parts up to this size go out in one write per batch
DRAIN_FOR = 2.0  # seconds to collect what clamd said before it hung up
HANGUPS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class Hangup(Exception):
    """clamd closed the session (end of file, reset, broken pipe)."""

    answered = 0  # replies read on this session for the message in hand


def parse_reply(reply: str) -> tuple[int | None, str]:
    """'3: stream: OK' -> (3, 'OK'); '9: INSTREAM size limit exceeded. ERROR' ->
    (9, 'INSTREAM size limit exceeded. ERROR'); no number -> (None, reply)."""
    ident, sep, rest = reply.partition(": ")
    if not (sep and ident.isascii() and ident.isdigit()):
        return None, reply
    if rest.startswith("stream: "):
        rest = rest[len("stream: "):]
    return int(ident), rest


class ClamdSession:
    def __init__(self, sock: socket.socket, address: str,
                 stream: Callable[[socket.socket, Part], None]):
        self.sock = sock
        self.address = address
        self.stream = stream  # sends one INSTREAM request (clamd._send_stream)
        self.pid = os.getpid()  # a session inherited through fork() is not ours to use
        self.last = 0  # the number clamd gives the request we sent last
        self.buffer = bytearray()

    def open(self) -> None:
        self.sock.sendall(b"zIDSESSION\0")

    def next_number(self) -> int:
        self.last += 1
        return self.last

    def usable(self) -> bool:
        """Still open, nothing unread, without blocking: a session clamd timed
        out has said `COMMAND READ TIMED OUT` and closed; a restarted clamd
        left only an end of file."""
        if self.pid != os.getpid() or self.buffer:
            return False
        try:
            self.sock.setblocking(False)
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True  # nothing to read: alive
        except OSError:
            return False
        return False  # end of file, or something we did not ask for

    def send(self, parts: Sequence[Part], deadline: float) -> None:
        """INSTREAM requests for `parts`, numbered in this order; small
        in-memory ones together in one write."""
        small = bytearray()
        try:
            for part in parts:
                if part.spill_path is None and part.size <= COALESCE:
                    data = part.data
                    small += b"zINSTREAM\0" + struct.pack("!L", len(data))
                    small += data
                    small += b"\0\0\0\0"
                    continue
                self._write(small, deadline)
                small.clear()
                self.sock.settimeout(_left(deadline))
                self.stream(self.sock, part)
            self._write(small, deadline)
        except HANGUPS as err:
            raise Hangup(f"hung up while we sent: {err}") from None

    def _write(self, data: bytearray, deadline: float) -> None:
        if data:
            self.sock.settimeout(_left(deadline))
            self.sock.sendall(data)

    def buffered(self) -> str | None:
        """A whole reply already read, if there is one (no system call)."""
        end = self.buffer.find(b"\0")
        if end < 0:
            return None
        reply = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return reply.decode("utf-8", "replace")

    def read_reply(self, deadline: float) -> str:
        """The next reply, whatever its number."""
        while True:
            reply = self.buffered()
            if reply is not None:
                return reply
            if len(self.buffer) > MAX_REPLY:
                raise ScannerError(f"clamd at {self.address}: reply too long")
            self.sock.settimeout(_left(deadline))
            try:
                chunk = self.sock.recv(65536)
            except HANGUPS as err:
                raise Hangup(f"hung up: {err}") from None
            if not chunk:
                rest = bytes(self.buffer[:200])
                raise Hangup("closed the connection" + (f" after {rest!r}" if rest else ""))
            self.buffer += chunk

    def drain(self, deadline: float) -> list[str]:
        """After a hang-up: the whole replies that came before the end."""
        until = min(deadline, time.monotonic() + DRAIN_FOR)
        try:
            while len(self.buffer) <= MAX_REPLY:
                self.sock.settimeout(_left(until))
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.buffer += chunk
        except OSError:
            pass
        *whole, rest = bytes(self.buffer).split(b"\0")
        self.buffer = bytearray(rest)
        return [reply.decode("utf-8", "replace") for reply in whole]

    def end(self) -> None:
        """Say END (best effort, never blocking), then close."""
        if self.pid == os.getpid():
            try:
                self.sock.setblocking(False)
                self.sock.send(b"zEND\0")
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        self.sock.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
