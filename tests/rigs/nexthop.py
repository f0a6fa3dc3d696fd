# SPDX-License-Identifier: MIT
"""A scriptable next hop for forwarding tests: SMTP or LMTP, TCP or Unix socket.

Where `smtpsink` is a plain mailbox, this one answers as told, to reach the
paths a real MTA takes only now and then: a recipient refused at RCPT (4xx or
5xx), a DATA answered 4xx/5xx, LMTP replies that differ per recipient, a
greeting of 421, a connection dropped after a given command, extensions
(DSN, XFORWARD, SMTPUTF8, 8BITMIME, SIZE) offered or not. It records what it
was sent, command lines included, so a test can check that parameters and
XFORWARD went through.

One named fake fault a real MTA shows only when buggy or hostile:
`stray_on_reuse=("RSET", "250 2.0.0 stray")` writes that line before its
reply to RSET on a session that already carried a message -- a line that
comes after the client's check for unread bytes, so every reply it reads
from then on answers the command before.

    hop = NextHop(lmtp=True, rcpt_replies={"b@x": "550 5.1.1 no such user"},
                  data_replies={"c@x": "452 4.2.2 mailbox full"})
    host, port = hop.start()        # or NextHop(unix="/tmp/x.sock").start()
    ...
    hop.messages[0].mail_line, .rcpt_lines, .xforward, .data
    hop.stop()

A test part (standard library only, a thread of the test process, its life
and mailbox `smtpsink.ServerRig`'s); never meant to face a network.
"""

from __future__ import annotations

import os
import socketserver
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.rigs.smtpsink import Keeping, ServerRig, TooBig, read_data

__all__ = ["NextHop", "HopMessage", "EXTENSIONS"]

MAX_LINE = 8192
EXTENSIONS = ("PIPELINING", "SIZE 104857600", "8BITMIME", "SMTPUTF8", "DSN",
              "ENHANCEDSTATUSCODES", "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")


@dataclass
class HopMessage:
    mail_line: str  # "MAIL FROM:<a@b> SIZE=12 BODY=8BITMIME"
    rcpt_lines: list[str]  # of the recipients accepted
    data: bytes  # dot-unstuffed, CRLF line ends, without the final "."
    helo: str = ""
    xforward: dict[str, str] = field(default_factory=dict)
    delivered_to: list[str] = field(default_factory=list)  # LMTP: those answered 250

    @property
    def mail_from(self) -> str:
        return self.mail_line.split("<", 1)[1].split(">", 1)[0]

    @property
    def rcpt_tos(self) -> list[str]:
        return [line.split("<", 1)[1].split(">", 1)[0] for line in self.rcpt_lines]


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = 30

    def reply(self, text: str) -> None:
        self.wfile.write(text.replace("\n", "\r\n").encode("utf-8") + b"\r\n")

    def handle(self) -> None:
        hop = self.server.hop
        self.server.connections += 1
        self.reply(hop.greeting)
        if not hop.greeting.startswith("220"):
            return
        state: dict = {"mail": None, "rcpts": [], "helo": "", "xforward": {}, "carried": 0}
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            self.server.commands.append(text)
            verb = text.split(" ", 1)[0].upper()
            if verb == hop.drop_after:
                return
            if state["carried"] and hop.stray_on_reuse and verb == hop.stray_on_reuse[0]:
                self.reply(hop.stray_on_reuse[1])  # the fake fault: a line out of step
                self.server.strays += 1
            if verb in hop.replies:
                self.reply(hop.replies[verb])
                continue
            handler = getattr(self, f"smtp_{verb}", None)
            if handler is None:
                self.reply("500 5.5.2 command not recognized")
                continue
            if handler(state, text[len(verb):].strip()) is False:
                return

    def _greet(self, state: dict, arg: str) -> None:
        state["helo"] = arg
        lines = ["hop.test", *self.server.hop.extensions]
        self.reply("\n".join(("250-" if i < len(lines) - 1 else "250 ") + x
                             for i, x in enumerate(lines)))

    def smtp_EHLO(self, state: dict, arg: str) -> None:
        if self.server.hop.lmtp:
            return self.reply("500 5.5.1 LMTP: use LHLO")
        self._greet(state, arg)

    def smtp_LHLO(self, state: dict, arg: str) -> None:
        if not self.server.hop.lmtp:
            return self.reply("500 5.5.1 command not recognized")
        self._greet(state, arg)

    def smtp_HELO(self, state: dict, arg: str) -> None:
        state["helo"] = arg
        self.reply("250 hop.test")

    def smtp_XFORWARD(self, state: dict, arg: str) -> None:
        for item in arg.split():
            name, _, value = item.partition("=")
            state["xforward"][name.upper()] = value
        self.reply("250 2.0.0 Ok")

    def smtp_MAIL(self, state: dict, arg: str) -> None:
        state["mail"] = f"MAIL {arg}"
        state["rcpts"] = []
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, state: dict, arg: str) -> None:
        address = arg.split("<", 1)[1].split(">", 1)[0] if "<" in arg else ""
        refusal = self.server.hop.rcpt_replies.get(address.lower())
        if refusal:
            return self.reply(refusal)
        state["rcpts"].append(f"RCPT {arg}")
        self.reply("250 2.1.5 Ok")

    def smtp_RSET(self, state: dict, arg: str) -> None:
        state["mail"], state["rcpts"] = None, []
        self.reply("250 2.0.0 Ok")

    def smtp_NOOP(self, state: dict, arg: str) -> None:
        self.reply("250 2.0.0 Ok")

    def smtp_QUIT(self, state: dict, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return False

    def smtp_DATA(self, state: dict, arg: str) -> bool | None:
        hop = self.server.hop
        if not state["rcpts"]:
            self.reply("503 5.5.1 need RCPT")
            return None
        self.reply("354 go ahead")
        state["carried"] += 1
        try:
            data = read_data(self.rfile)
        except TooBig:
            self.reply("552 5.3.4 message too big")
            return False
        if data is None:  # the client went away before the final dot: nothing kept
            hop.aborted_in_data += 1
            return False
        if hop.drop_after == "DOT":
            return False
        if hop.data_delay:
            time.sleep(hop.data_delay)
        rcpts = [r.split("<", 1)[1].split(">", 1)[0] for r in state["rcpts"]]
        message = HopMessage(state["mail"], list(state["rcpts"]), data,
                             state["helo"], dict(state["xforward"]))
        if hop.lmtp:
            replies = [hop.data_replies.get(r.lower(), "250 2.0.0 Ok: delivered")
                       for r in rcpts]
            message.delivered_to = [r for r, said in zip(rcpts, replies, strict=True)
                                    if said.startswith("2")]
            if message.delivered_to:
                self.server.keep(message)
            for said in replies:
                self.reply(said)
        else:
            if hop.data_reply.startswith("2"):
                message.delivered_to = rcpts
                self.server.keep(message)
            self.reply(hop.data_reply)
        state["mail"], state["rcpts"], state["xforward"] = None, [], {}
        return False if hop.hang_up_after_message else None


class _Server(Keeping, socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, hop: NextHop):
        super().__init__(address, _Handler)
        self.hop = hop
        self.commands: list[str] = []
        self.connections = 0
        self.strays = 0
        self.start_keeping()


class _UnixServer(Keeping, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, hop: NextHop):
        super().__init__(path, _Handler)
        self.hop = hop
        self.commands: list[str] = []
        self.connections = 0
        self.strays = 0
        self.start_keeping()


class NextHop(ServerRig):
    """Start it, hand mail to it, read `.messages` / `.commands`, stop it."""

    wait_timeout = 10.0
    thread_name = "next-hop"

    def __init__(self, *, lmtp: bool = False, unix: str = "",
                 extensions: Iterable[str] = EXTENSIONS,
                 rcpt_replies: dict[str, str] | None = None,
                 data_replies: dict[str, str] | None = None,
                 data_reply: str = "250 2.0.0 Ok: queued as HOP1",
                 greeting: str = "220 hop.test ESMTP next hop",
                 replies: dict[str, str] | None = None,
                 drop_after: str = "", data_delay: float = 0.0,
                 hang_up_after_message: bool = False,
                 stray_on_reuse: tuple[str, str] | None = None):
        super().__init__()
        self.lmtp = lmtp
        self.unix = unix
        self.extensions = tuple(extensions)
        self.rcpt_replies = {k.lower(): v for k, v in (rcpt_replies or {}).items()}
        self.data_replies = {k.lower(): v for k, v in (data_replies or {}).items()}
        self.data_reply = data_reply
        self.greeting = greeting
        self.replies = {k.upper(): v for k, v in (replies or {}).items()}  # verb -> reply
        self.drop_after = drop_after.upper()  # a verb, or "DOT": hang up instead of answering
        self.data_delay = data_delay
        self.hang_up_after_message = hang_up_after_message  # closes a session kept for reuse
        self.aborted_in_data = 0  # transactions the client left after 354, before the dot
        self.stray_on_reuse = (stray_on_reuse[0].upper(), stray_on_reuse[1]) \
            if stray_on_reuse else None  # (verb, line): see the module's docstring

    def make_server(self) -> _Server | _UnixServer:
        if not self.unix:
            return _Server(("127.0.0.1", 0), self)
        if os.path.exists(self.unix):
            os.unlink(self.unix)
        return _UnixServer(self.unix, self)

    @property
    def address(self) -> tuple[str, int]:
        return (self.unix, 0) if self.unix else super().address

    @property
    def spec(self) -> str:
        """The forward_method that reaches this hop."""
        proto = "lmtp" if self.lmtp else "smtp"
        if self.unix:
            return f"{proto}:unix:{self.unix}"
        host, port = self.address
        return f"{proto}:[{host}]:{port}"

    @property
    def commands(self) -> list[str]:
        return list(self._server.commands) if self._server else []

    @property
    def connections(self) -> int:
        return self._server.connections if self._server else 0

    @property
    def strays(self) -> int:
        """Stray lines written (`stray_on_reuse`)."""
        return self._server.strays if self._server else 0

    def stop(self) -> None:
        started = self._server is not None
        super().stop()
        if started and self.unix and os.path.exists(self.unix):
            os.unlink(self.unix)
