"""clamd over its socket protocol: INSTREAM of in-memory parts, pipelined.

Parts are streamed (INSTREAM), so clamd needs no access to our files and may
be remote. A worker keeps one IDSESSION open across messages (`ClamdSession`)
and sends up to `window` parts (and about `window_bytes`) before it reads
replies, so clamd scans one part while the next arrives, on several threads.
clamd answers in the order its threads finish: a reply is matched to its part
by the request number clamd puts in front of it, never by position. A reply
missing, duplicated, unparsable or for a number not in flight is a
`ScannerError`: the message is not scanned (tempfail), never clean.

A kept session that clamd closed meanwhile (its ReadTimeout, a restart) is
noticed before reuse; if it dies before the first reply of a message anyway,
that message is sent once more on a new connection. A part over clamd's
StreamMaxLength (`max_stream`, or clamd's own `INSTREAM size limit exceeded`)
is reported as missed, so a backup scanner gets it or the message is UNCHECKED.

So is a part clamd gave up on: past one of its own limits (MaxFileSize,
MaxScanSize, MaxScanTime, MaxRecursion, ...) clamd stops scanning and, with
`AlertExceedsMax yes`, says `Heuristics.Limits.Exceeded.<limit> FOUND`: not
a virus, a part nobody looked at to its end (UNCHECKED, like clamscan's
`unchecked_names`). Without that setting clamd answers a plain `OK` for it,
which no client can tell from clean: the README says to set it.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence

from amavisd.decode.parts import Part
from amavisd.scan.base import Health, ScannerError, ScanReport
from amavisd.scan.clamd_session import ClamdSession, Hangup, parse_reply
from amavisd.scan.definitions import CLAMAV_GAVE_UP
from amavisd.verdict import Finding
from amavisd_client.wire.address import Address, parse

log = logging.getLogger("amavisd.scan")

SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded"
GAVE_UP = re.compile(CLAMAV_GAVE_UP)  # clamd stopped at a limit: a miss, not a virus
WINDOW = 8  # requests in flight on one session
WINDOW_BYTES = 1024 * 1024  # bytes in flight; a bigger part goes alone


def address_of(text: str) -> Address:
    """clamd's address as the settings spell it: unix:/path or tcp:host:port."""
    return parse(text, accept=("unix", "tcp"))


class ClamdScanner:
    def __init__(self, address: str, timeout: float = 100.0, max_stream: int = 25 * 1024 * 1024,
                 name: str = "clamd", window: int = WINDOW, window_bytes: int = WINDOW_BYTES,
                 keep_session: bool = True):
        self.name = name
        self.address = address
        where = address_of(address)
        self.kind, self.target = where.kind, where.target
        self.timeout = timeout
        self.max_stream = max_stream
        self.window = max(1, window)
        self.window_bytes = window_bytes
        self.keep_session = keep_session
        self.connections = 0  # connects made, for tests and the benchmark
        self.retries = 0  # messages sent again after a kept session died under them
        self._kept: ClamdSession | None = None
        self._lock = threading.Lock()  # the kept session serves one scan at a time

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
        """A one-shot command such as PING or VERSION, on its own connection."""
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

    def close(self) -> None:
        """END the kept session (worker recycling or leaving)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.end()

    # -- scanning ----------------------------------------------------------

    def scan(self, parts: Sequence[Part]) -> ScanReport:
        report = ScanReport(self.name)
        todo: list[tuple[int, Part]] = []
        for index, part in enumerate(parts):
            if part.size > self.max_stream:
                report.missed[part.path] = (f"{self.name}: {part.size} bytes, over "
                                            f"StreamMaxLength {self.max_stream}")
            elif part.size:
                todo.append((index, part))
        if not todo:
            return report
        deadline = time.monotonic() + self.timeout
        found: dict[int, str] = {}  # index of the part -> what clamd found in it
        owner = self._lock.acquire(blocking=False)  # else another thread has the session
        try:
            self._scan(todo, deadline, report, found, keep=owner and self.keep_session)
        finally:
            if owner:
                self._lock.release()
        report.findings = [Finding(part=parts[i].path, name=found[i], scanner=self.name)
                           for i in sorted(found)]
        return report

    def _scan(self, todo: list[tuple[int, Part]], deadline: float, report: ScanReport,
              found: dict[int, str], keep: bool) -> None:
        retried = False
        while todo:  # a new session after clamd refused an oversized stream
            session, reused = self._session(deadline, keep)
            try:
                todo = self._exchange(session, todo, deadline, report, found)
            except Hangup as hung:
                session.close()
                if reused and not hung.answered and not retried:
                    # clamd closed the kept session as we reused it: nothing of
                    # this message was answered, so all of it goes again, once.
                    retried = True
                    self.retries += 1
                    log.info("clamd at %s closed the kept session (%s); sending again "
                             "on a new one", self.address, hung)
                    continue
                raise ScannerError(f"clamd at {self.address}: {hung}") from None
            except TimeoutError:
                session.close()
                raise ScannerError(f"clamd at {self.address}: no answer within "
                                   f"{self.timeout:g}s") from None
            except OSError as err:
                session.close()
                raise ScannerError(f"clamd at {self.address}: {err}") from None
            except BaseException:
                session.close()
                raise
            if todo:
                session.close()  # clamd refused a stream and hung up
            elif keep:
                self._kept = session
            else:
                session.end()

    def _session(self, deadline: float, keep: bool) -> tuple[ClamdSession, bool]:
        """The kept session if clamd still holds it open, else a new one."""
        if keep and self._kept is not None:
            kept, self._kept = self._kept, None
            if kept.usable():
                return kept, True
            kept.close()
        sock = self._connect(max(0.1, deadline - time.monotonic()))
        session = ClamdSession(sock, self.address, _send_stream)
        try:
            session.open()
        except OSError as err:
            session.close()
            raise ScannerError(f"clamd at {self.address}: {err}") from None
        return session, False

    def _exchange(self, session: ClamdSession, todo: list[tuple[int, Part]], deadline: float,
                  report: ScanReport, found: dict[int, str]) -> list[tuple[int, Part]]:
        """Scan `todo` on `session`, a window at a time; return the parts left
        unanswered when clamd refused a stream (and hung up)."""
        queue = deque(todo)
        pending: dict[int, tuple[int, Part]] = {}  # request number -> (index, part)
        window = _Window(self.window, self.window_bytes)
        try:
            while queue or pending:
                batch = []
                while queue and window.room(queue[0][1].size):
                    item = queue.popleft()
                    pending[session.next_number()] = item
                    window.add(item[1].size)
                    batch.append(item[1])
                session.send(batch, deadline)
                reply: str | None = session.read_reply(deadline)
                while reply is not None:  # and any others already read
                    if self._settle(reply, session, pending, window, report, found):
                        return sorted([*pending.values(), *queue], key=_first)
                    reply = session.buffered()
        except Hangup as hung:
            # Why clamd hung up is often still in our buffer (a refusal).
            for reply in session.drain(deadline):
                if self._settle(reply, session, pending, window, report, found):
                    return sorted([*pending.values(), *queue], key=_first)
            hung.answered = window.answered
            raise
        return []

    def _settle(self, reply: str, session: ClamdSession, pending: dict[int, tuple[int, Part]],
                window: _Window, report: ScanReport, found: dict[int, str]) -> bool:
        """Book one reply against its part; True if clamd refused that stream."""
        number, text = parse_reply(reply)
        if number is None:
            raise ScannerError(f"clamd at {self.address}: unexpected reply {reply[:200]!r}")
        if number not in pending:
            what = "answered already" if number <= session.last else "never sent"
            raise ScannerError(f"clamd at {self.address}: reply for request {number}, "
                               f"{what}: {reply[:200]!r}")
        index, part = pending.pop(number)
        window.done(part.size)
        if text == "OK":
            return False
        if text.endswith(" FOUND"):
            name = text[: -len(" FOUND")]
            if GAVE_UP.fullmatch(name):
                report.missed[part.path] = f"{self.name}: gave up at its limit ({name})"
            else:
                found[index] = name
            return False
        if SIZE_LIMIT_REPLY in text:
            report.missed[part.path] = f"{self.name}: over clamd's StreamMaxLength ({text})"
            return True
        raise ScannerError(f"clamd at {self.address} on part {part.path}: {text}")


class _Window:
    """What is in flight on a session: requests and bytes, each bounded."""

    def __init__(self, requests: int, size: int) -> None:
        self.max_requests, self.max_bytes = requests, size
        self.requests = self.bytes = self.answered = 0

    def room(self, size: int) -> bool:
        if not self.requests:
            return True  # one part always goes, however big
        return self.requests < self.max_requests and self.bytes + size <= self.max_bytes

    def add(self, size: int) -> None:
        self.requests += 1
        self.bytes += size

    def done(self, size: int) -> None:
        self.requests -= 1
        self.bytes -= size
        self.answered += 1


def _first(item: tuple[int, Part]) -> int:
    return item[0]


def _read_reply(sock: socket.socket, address: str) -> bytes:
    """One NUL-terminated reply to a one-shot command."""
    buf = bytearray()
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ScannerError(f"clamd at {address} closed the connection"
                               + (f" after {bytes(buf)!r}" if buf else ""))
        buf += chunk
        end = buf.find(b"\0")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > 65536:
            raise ScannerError(f"clamd at {address}: reply too long")


def _send_stream(sock: socket.socket, part: Part) -> None:
    sock.sendall(b"zINSTREAM\0")
    for chunk in part.chunks():  # from memory, or from the spill file
        sock.sendall(struct.pack("!L", len(chunk)) + chunk)
    sock.sendall(b"\0\0\0\0")
