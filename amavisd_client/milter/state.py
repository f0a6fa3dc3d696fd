"""One MTA connection as a state machine: commands in, replies and one question out.

No sockets and no files: `feed(bytes)` returns events for the driver
(server.py): `Send` bytes to the MTA, `Ask` the daemon about a spooled
message, `Close` the connection. While an `Ask` is open the machine takes
no further command (it keeps what arrives); the driver hands back the
daemon's reply with `answer(block)` or its own failure with `fail(reason)`
and gets the end-of-message packets. The message goes to a sink the driver
supplies (`open_sink`), header by header and chunk by chunk as it arrives:
the machine never holds a message in memory (the sink may hold its start:
spool.py).

Negotiation: version 6 when the MTA offers 6 or more, else version 2 (the
MTA then sends only version-2 events, and every event gets a reply). We ask
for the actions in `WANT_ACTIONS` and the protocol flags in `WANT_PROTOCOL`,
each masked by what the MTA offered; whatever we did not get, we live with.
We keep the HELO event (without reply where the MTA allows it): AM.PDP's
helo_name needs it, and neither Postfix nor Sendmail sends the HELO name as
a macro by default.

Tolerant of what an MTA leaves out (no CONNECT, HELO, MAIL, headers, EOH
...): a message starts at its first MAIL, header, body chunk or end of
message. ABORT forgets the message but keeps the connection's macros and
client; QUIT_NC forgets the connection too.

Fail closed: a sink that fails (disk full, temp base gone) marks the
message, and its end gets the on_error action, never an accept; so does
any reply from the daemon that cannot be carried out (verdicts.py).
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from amavisd_client.connection import angle
from amavisd_client.milter import codec
from amavisd_client.milter.verdicts import (
    BadVerdict,
    Negotiated,
    Policy,
    failure_packets,
    verdict_packets,
)
from amavisd_client.wire.ampdp import Block, encode_block

log = logging.getLogger("amavisd.milter")

WANT_ACTIONS = (codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS | codec.SMFIF_QUARANTINE
                | codec.SMFIF_ADDRCPT | codec.SMFIF_DELRCPT)
WANT_PROTOCOL = (codec.SMFIP_NOUNKNOWN | codec.SMFIP_NODATA | codec.SMFIP_NR_CONN
                 | codec.SMFIP_NR_HELO | codec.SMFIP_NR_MAIL | codec.SMFIP_NR_RCPT
                 | codec.SMFIP_NR_DATA | codec.SMFIP_NR_UNKN | codec.SMFIP_NR_HDR
                 | codec.SMFIP_NR_EOH | codec.SMFIP_NR_BODY | codec.SMFIP_HDR_LEADSPC)
MAX_RECIPIENTS = 100_000  # far above any MTA's recipient limit; bounds memory
CONNECTION_STAGES = frozenset(("C", "H"))  # macros that outlive a message
# Where a macro is looked for: the latest stage first.
STAGE_ORDER = ("E", "B", "N", "L", "T", "R", "M", "H", "C")

# The flag that spares us the reply to a command; commands without an entry
# never get one (macros, abort, quit) or are answered elsewhere (EOM).
NO_REPLY_FLAG: dict[type, int] = {
    codec.Connect: codec.SMFIP_NR_CONN,
    codec.Helo: codec.SMFIP_NR_HELO,
    codec.Mail: codec.SMFIP_NR_MAIL,
    codec.Rcpt: codec.SMFIP_NR_RCPT,
    codec.Data: codec.SMFIP_NR_DATA,
    codec.Header: codec.SMFIP_NR_HDR,
    codec.EndOfHeaders: codec.SMFIP_NR_EOH,
    codec.Body: codec.SMFIP_NR_BODY,
    codec.Unknown: codec.SMFIP_NR_UNKN,
}
CONTINUE = codec.encode(codec.Continue())
DEFAULT_POLICY = Policy()


class Sink(Protocol):
    """Where a message's bytes go: the spool file (spool.py), or memory in tests.
    `path` and `dir` may be known only once the driver has opened it (spool.py
    makes the file when the daemon is asked: daemon.py)."""

    path: str  # the mail file, for AM.PDP's mail_file
    dir: str  # its private dir, for AM.PDP's tempdir

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None: ...


@dataclass
class Send:
    data: bytes


@dataclass
class Ask:
    """Ask the daemon: `attrs` is the AM.PDP request; the driver owns `sink` now
    and removes it when the daemon is done with it. The request names the
    sink's path, so `attrs` is read once the driver has opened the sink."""

    envelope: list[tuple[str, str | list[str]]]  # request, sender, recipients
    details: list[tuple[str, str | list[str]]]  # queue id, client, policy banks ...
    sink: Sink
    summary: str  # for the log line: queue id, sender, recipients

    @property
    def attrs(self) -> list[tuple[str, str | list[str]]]:
        sink = self.sink
        return [*self.envelope, *_spool_attrs(sink.dir, sink.path), *self.details]

    def encoded(self) -> bytes:
        """`attrs` as AM.PDP bytes; the spool's lines are encoded once a spool
        (a pooled spool serves many messages under the same path)."""
        sink = self.sink
        return (encode_block(self.envelope)[:-2] + _spool_lines(sink.dir, sink.path)
                + encode_block(self.details))


def _spool_attrs(tempdir: str, mail_file: str) -> list[tuple[str, str | list[str]]]:
    return [("tempdir", tempdir), ("tempdir_removed_by", "client"),
            ("mail_file", mail_file), ("delivery_care_of", "client")]


@functools.lru_cache(maxsize=64)
def _spool_lines(tempdir: str, mail_file: str) -> bytes:
    return encode_block(_spool_attrs(tempdir, mail_file))[:-2]  # without the block's end


@dataclass
class Close:
    reason: str = ""  # empty: the MTA said QUIT


Event = Send | Ask | Close


@dataclass
class Client:
    hostname: str = ""
    family: str = "U"
    address: str = ""
    helo: str = ""


@dataclass
class Message:
    sender: str | None = None
    esmtp: tuple[str, ...] = ()
    recipients: list[str] = field(default_factory=list)
    sink: Sink | None = None
    spool_error: str = ""
    headers_ended: bool = False


def policy_banks(spec: str, macro: Callable[[str], str]) -> str:
    """`spec`'s comma-separated names, a `{macro}` entry replaced by that macro's
    value (as C amavisd-milter's -B does with {daemon_name}), plus SMTP_AUTH
    and SMTP_AUTH_<MECH> for an authenticated client, as C amavisd-milter sends."""
    banks = []
    for name in (n.strip() for n in spec.split(",")) if spec else ():  # none set: the usual
        if name.startswith("{") and name.endswith("}"):
            name = macro(name[1:-1])
        name = "".join(c for c in name if c.isalnum() or c in "_-.")
        if name:
            banks.append(name)
    if macro("auth_authen"):
        banks.append("SMTP_AUTH")
        mech = "".join(c for c in macro("auth_type").upper() if c.isalnum() or c in "_-")
        if mech:
            banks.append(f"SMTP_AUTH_{mech}")
    return ",".join(dict.fromkeys(banks))


class MilterSession:
    def __init__(self, open_sink: Callable[[], Sink], policy: Policy = DEFAULT_POLICY,
                 policy_bank: str = "", max_packet: int = codec.MAX_PACKET):
        self.open_sink = open_sink
        self.policy = policy
        self.policy_bank = policy_bank
        self.decoder = codec.Decoder(max_packet)
        self.negotiated = Negotiated()
        self.unanswered: frozenset[type] = frozenset()  # commands negotiated without a reply
        self.macros: dict[str, dict[str, str]] = {}
        self.client = Client()
        self.message = Message()
        self.queue: deque[codec.Command] = deque()
        self.waiting = False  # an Ask is open
        self.closed = False

    # -- driver side ------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> list[Event]:
        """Take bytes from the MTA (b"" to go on after an answer) and return
        what to do; stops at an Ask, keeping the rest for later."""
        if self.closed:
            return []
        try:
            commands = self.decoder.feed(data)
        except codec.ProtocolError as err:
            self.close()
            return [Close(f"protocol error: {err}")]
        queue = self.queue
        if queue:  # kept from before an Ask: those come first
            queue.extend(commands)
            commands = list(queue)
            queue.clear()
        events: list[Event] = []
        handlers = HANDLERS
        for n, command in enumerate(commands):  # the commands in hand, not a popleft each
            if self.waiting or self.closed:
                queue.extend(commands[n:])
                break
            replies = handlers[type(command)](self, command)
            if replies:
                events += replies
        return events

    def answer(self, reply: Block) -> bytes:
        """The end-of-message packets for the daemon's reply."""
        self._check_waiting()
        try:
            packets = verdict_packets(reply, self.negotiated, self.policy)
        except BadVerdict as err:
            log.warning("%s: %s: %s", self._summary(), err, self.policy.on_error)
            packets = failure_packets(self.policy)
        self._drop_message()
        return packets

    def fail(self, reason: str) -> bytes:
        """The end-of-message packets when the driver got no verdict."""
        self._check_waiting()
        log.warning("%s: %s: %s", self._summary(), reason, self.policy.on_error)
        self._drop_message()
        return failure_packets(self.policy)

    def close(self) -> None:
        """The connection is gone: drop whatever message is half spooled."""
        self.closed = True
        self._drop_message()

    def _check_waiting(self) -> None:
        if not self.waiting:
            raise RuntimeError("no question to the daemon is open")
        self.waiting = False

    # -- helpers ---------------------------------------------------------------------

    def macro(self, name: str) -> str:
        macros = self.macros
        for stage in STAGE_ORDER:  # most stages are absent: `in`, not a get each
            if stage in macros:
                value = macros[stage].get(name)
                if value:
                    return value
        return ""

    def _reply(self, command: codec.Command) -> list[Event]:
        if type(command) in self.unanswered:
            return []
        return [Send(CONTINUE)]

    def _drop_message(self) -> None:
        sink = self.message.sink
        self.message = Message()
        macros = self.macros
        if not macros.keys() <= CONNECTION_STAGES:
            for stage in list(macros):
                if stage not in CONNECTION_STAGES:
                    del macros[stage]
        if sink is not None:
            try:
                sink.discard()
            except Exception as err:  # noqa: BLE001 - a cleanup failure must not end the session
                log.warning("could not remove a spool: %s", err)

    def _write(self, data: bytes) -> None:
        """Into the message's sink, opened on first use; a failure marks the
        message (it will get the on_error action) and drops the sink."""
        message = self.message
        if message.spool_error:
            return
        try:
            if message.sink is None:
                message.sink = self.open_sink()
            if data:
                message.sink.write(data)
        except Exception as err:  # noqa: BLE001 - any sink failure fails the message closed
            message.spool_error = f"spool failed: {err}"
            sink, message.sink = message.sink, None
            if sink is not None:
                try:
                    sink.discard()
                except Exception:  # noqa: BLE001
                    pass

    def _end_headers(self) -> None:
        if not self.message.headers_ended:
            self.message.headers_ended = True
            self._write(b"\r\n")

    def _summary(self) -> str:
        m = self.message
        queue_id = self.macro("i") or "NOQUEUE"
        return (f"{queue_id}: {angle(m.sender or '<>')} -> "
                f"{','.join(angle(r) for r in m.recipients[:5])}"
                + (f" (+{len(m.recipients) - 5})" if len(m.recipients) > 5 else ""))

    # -- commands, dispatched by name -------------------------------------------------------

    def on_OptNeg(self, command: codec.OptNeg) -> list[Event]:
        if command.version < 2:
            self.close()
            return [Close(f"the MTA offers milter protocol version {command.version}; "
                          "2 or later is needed")]
        if command.version >= 6:
            version, actions, protocol = 6, WANT_ACTIONS, WANT_PROTOCOL
        else:
            version, actions, protocol = 2, WANT_ACTIONS & codec.V2_ACTIONS, 0
        self.negotiated = n = Negotiated(version, actions & command.actions,
                                         protocol & command.protocol)
        self.unanswered = frozenset(kind for kind, flag in NO_REPLY_FLAG.items()
                                    if n.protocol & flag)
        return [Send(codec.encode(codec.OptNegReply(n.version, n.actions, n.protocol)))]

    def on_Macro(self, command: codec.Macro) -> list[Event]:
        self.macros[command.stage] = command.macros  # never changed: the decoder may reuse it
        return []

    def on_Connect(self, command: codec.Connect) -> list[Event]:
        self.client = Client(command.hostname, command.family, command.address)
        return self._reply(command)

    def on_Helo(self, command: codec.Helo) -> list[Event]:
        self.client.helo = command.name
        return self._reply(command)

    def on_Mail(self, command: codec.Mail) -> list[Event]:
        if self.message != Message():  # a message the MTA never ended: start afresh
            mail_macros = self.macros.get("M")  # sent just before this command: keep
            self._drop_message()
            if mail_macros is not None:
                self.macros["M"] = mail_macros
        self.message.sender = command.args[0] if command.args else "<>"
        self.message.esmtp = command.args[1:]
        return self._reply(command)

    def on_Rcpt(self, command: codec.Rcpt) -> list[Event]:
        if command.args and len(self.message.recipients) < MAX_RECIPIENTS:
            self.message.recipients.append(command.args[0])
        return self._reply(command)

    def on_Data(self, command: codec.Data) -> list[Event]:
        return self._reply(command)

    def on_Header(self, command: codec.Header) -> list[Event]:
        value = command.value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if not self.negotiated.protocol & codec.SMFIP_HDR_LEADSPC:
            value = b" " + value  # the MTA took the space after the colon off
        self._write(command.name + b":" + value + b"\r\n")
        return self._reply(command)

    def on_EndOfHeaders(self, command: codec.EndOfHeaders) -> list[Event]:
        self._end_headers()
        return self._reply(command)

    def on_Body(self, command: codec.Body) -> list[Event]:
        self._end_headers()
        self._write(command.data)
        return self._reply(command)

    def on_EndOfMessage(self, command: codec.EndOfMessage) -> list[Event]:
        self._end_headers()
        self._write(command.data)
        message = self.message
        if message.spool_error or message.sink is None:
            log.warning("%s: %s: %s", self._summary(), message.spool_error or "no spool",
                        self.policy.on_error)
            self._drop_message()
            return [Send(failure_packets(self.policy))]
        self.waiting = True
        sink, message.sink = message.sink, None  # the driver's now: it alone removes it
        return [Ask(*self._request(), sink, self._summary())]

    def on_Unknown(self, command: codec.Unknown) -> list[Event]:
        return self._reply(command)

    def on_Abort(self, command: codec.Abort) -> list[Event]:
        self._drop_message()
        return []

    def on_Quit(self, command: codec.Quit) -> list[Event]:
        self.close()
        return [Close()]

    def on_QuitNewConnection(self, command: codec.QuitNewConnection) -> list[Event]:
        self._drop_message()
        self.macros.clear()
        self.client = Client()
        return []

    # -- the question -------------------------------------------------------------------------

    def _request(self) -> tuple[list[tuple[str, str | list[str]]],
                                list[tuple[str, str | list[str]]]]:
        """The AM.PDP request around the spool's attributes: (envelope, details)."""
        m, client = self.message, self.client
        attrs: list[tuple[str, str | list[str]]] = [
            ("request", "AM.PDP"),
            ("sender", angle(m.sender or self.macro("mail_addr") or "<>")),
        ]
        recipients = m.recipients or ([self.macro("rcpt_addr")] if self.macro("rcpt_addr")
                                      else [])
        attrs.extend(("recipient", angle(r)) for r in recipients)
        address = client.address if client.family in ("4", "6") else ""
        optional = {
            "queue_id": self.macro("i"),
            "client_address": address or self.macro("client_addr"),
            "client_name": client.hostname or self.macro("client_name"),
            "helo_name": client.helo or self.macro("s"),
            # Sendmail's {r} when sent; else ESMTP arguments to MAIL mean ESMTP.
            "protocol_name": self.macro("r") or ("ESMTP" if m.esmtp else "SMTP"),
            "policy_bank": policy_banks(self.policy_bank, self.macro),
        }
        return attrs, [(name, value) for name, value in optional.items() if value]


# Commands dispatched by name: each command type's `on_<Type>` method, looked up once.
HANDLERS: dict[type, Callable[[MilterSession, codec.Command], list[Event]]] = {
    command: getattr(MilterSession, "on_" + command.__name__)
    for command in codec.Command.__args__  # type: ignore[attr-defined]
}
