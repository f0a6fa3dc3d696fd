# SPDX-License-Identifier: MIT
"""A real, tiny SMTP server for tests: it keeps every message it accepts.

Releases and notifications are tested against this sink rather than a mock:
they go through smtplib and a socket, and the test reads back what arrived
(envelope sender, recipients, the DATA bytes after dot-unstuffing). Postfix's
smtp-sink would do the talking but keeps nothing.

    sink = SMTPSink()
    host, port = sink.start()
    ...
    sink.messages[0].mail_from, .rcpt_tos, .data
    sink.stop()

It speaks just enough SMTP (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT)
for a client library; it is a test part and never meant to face a network.
Standard library only; the server runs in a thread of the test process.
What any such test server needs (a thread, start and stop, the messages
kept and a wait for them, the DATA reader) is here once, as `ServerRig`,
`Keeping` and `read_data`: `nexthop.NextHop` is the scriptable one.
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Keeping", "SMTPSink", "ServerRig", "SinkMessage", "TooBig", "read_data"]

MAX_LINE = 4096  # a command line; DATA lines may be longer (up to MAX_DATA)
MAX_DATA = 64 * 1024 * 1024


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # as received, CRLF line ends, dot-unstuffed, without the final "."
    helo: str = ""


class TooBig(Exception):
    """The DATA went past the size the rig keeps."""


def read_data(rfile, limit: int = MAX_DATA) -> bytes | None:
    """The DATA after the 354: dot-unstuffed (RFC 5321 4.5.2), CRLF as sent,
    without the final "."; None when the client went away mid-message."""
    lines, size = [], 0
    while True:
        line = rfile.readline(limit + 1)
        if not line:
            return None
        if line in (b".\r\n", b".\n"):
            return b"".join(lines)
        if line.startswith(b"."):
            line = line[1:]
        size += len(line)
        if size > limit:
            raise TooBig(f"over {limit} bytes")
        lines.append(line)


def _address(argument: str, keyword: str) -> str | None:
    """'FROM:<a@b> SIZE=10' -> 'a@b'; None when the syntax is wrong."""
    head, _, rest = argument.partition(":")
    if head.strip().upper() != keyword:
        return None
    rest = rest.strip()
    if not rest.startswith("<"):
        return rest.split(" ", 1)[0] if rest else None
    end = rest.find(">")
    return rest[1:end] if end > 0 else None


@dataclass
class _Session:
    helo: str = ""
    mail_from: str | None = None
    rcpt_tos: list[str] = field(default_factory=list)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 30

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        session = _Session()
        self.reply(f"220 {self.server.hostname} ESMTP amavisd test sink")
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                self.reply("500 5.5.2 line too long")
                return
            verb, _, argument = line.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
            command = getattr(self, f"smtp_{verb.upper()}", None)
            if command is None:
                self.reply("500 5.5.2 command not recognized")
                continue
            if command(session, argument) is False:
                return

    # -- verbs, dispatched by name -------------------------------------------

    def smtp_EHLO(self, session: _Session, argument: str) -> None:
        session.helo = argument.strip()
        session.mail_from, session.rcpt_tos = None, []
        self.reply(f"250-{self.server.hostname}")
        self.reply("250-8BITMIME")
        self.reply("250-SMTPUTF8")
        self.reply(f"250 SIZE {MAX_DATA}")

    def smtp_HELO(self, session: _Session, argument: str) -> None:
        session.helo = argument.strip()
        session.mail_from, session.rcpt_tos = None, []
        self.reply(f"250 {self.server.hostname}")

    def smtp_MAIL(self, session: _Session, argument: str) -> None:
        if session.mail_from is not None:
            return self.reply("503 5.5.1 nested MAIL command")
        address = _address(argument, "FROM")
        if address is None:
            return self.reply("501 5.5.4 syntax: MAIL FROM:<address>")
        session.mail_from = address
        self.reply("250 2.1.0 ok")

    def smtp_RCPT(self, session: _Session, argument: str) -> None:
        if session.mail_from is None:
            return self.reply("503 5.5.1 need MAIL first")
        address = _address(argument, "TO")
        if not address:
            return self.reply("501 5.5.4 syntax: RCPT TO:<address>")
        if address.lower() in self.server.refuse:
            return self.reply("550 5.1.1 recipient refused by the test sink")
        session.rcpt_tos.append(address)
        self.reply("250 2.1.5 ok")

    def smtp_DATA(self, session: _Session, argument: str) -> bool | None:
        if not session.rcpt_tos:
            return self.reply("503 5.5.1 need RCPT first")
        self.reply("354 end data with <CR><LF>.<CR><LF>")
        try:
            data = read_data(self.rfile)
        except TooBig:
            self.reply("552 5.3.4 message too big")
            return False
        if data is None:
            return False  # the client went away mid-message: nothing kept
        self.server.keep(SinkMessage(session.mail_from or "", list(session.rcpt_tos),
                                     data, session.helo))
        session.mail_from, session.rcpt_tos = None, []
        self.reply("250 2.0.0 ok: kept")
        return None

    def smtp_RSET(self, session: _Session, argument: str) -> None:
        session.mail_from, session.rcpt_tos = None, []
        self.reply("250 2.0.0 ok")

    def smtp_NOOP(self, session: _Session, argument: str) -> None:
        self.reply("250 2.0.0 ok")

    def smtp_QUIT(self, session: _Session, argument: str) -> bool:
        self.reply("221 2.0.0 bye")
        return False


class Keeping:
    """A rig server's mailbox: what it accepted, and a condition to wait on."""

    messages: list
    arrived: threading.Condition

    def start_keeping(self) -> None:
        self.messages = []
        self.arrived = threading.Condition()

    def keep(self, message: object) -> None:
        with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()


class _Server(Keeping, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], refuse: Iterable[str]):
        super().__init__(address, _Handler)
        self.hostname = "sink.test"
        self.refuse = {r.lower() for r in refuse}
        self.start_keeping()


class ServerRig:
    """A test server in a thread of the test process: `start()` it, talk to
    `address`, read `.messages` (or `wait()` for them), `stop()` it.
    Subclasses say which server (`make_server`)."""

    wait_timeout = 5.0
    thread_name = "test-server"

    def __init__(self) -> None:
        self._server: Keeping | None = None
        self._thread: threading.Thread | None = None

    def make_server(self):
        raise NotImplementedError

    def start(self) -> tuple[str, int]:
        self._server = self.make_server()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def messages(self) -> list:
        if self._server is None:
            return []
        with self._server.arrived:
            return list(self._server.messages)

    def wait(self, count: int = 1, timeout: float | None = None) -> list:
        """The messages once at least `count` have arrived (or at the timeout)."""
        assert self._server is not None, "start() the server first"
        deadline = time.monotonic() + (self.wait_timeout if timeout is None else timeout)
        with self._server.arrived:
            while len(self._server.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._server.arrived.wait(left)
            return list(self._server.messages)

    def stop(self) -> None:
        """Stop serving; `.messages` stays readable."""
        if self._thread is None or self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._thread = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SMTPSink(ServerRig):
    """Start it, send to (host, port), read `.messages`, stop it.

    `refuse`: recipient addresses answered with 550, to test partial failures.
    """

    thread_name = "smtp-sink"

    def __init__(self, host: str = "127.0.0.1", refuse: Iterable[str] = ()):
        super().__init__()
        self._host = host
        self._refuse = tuple(refuse)

    def make_server(self) -> _Server:
        return _Server((self._host, 0), self._refuse)
