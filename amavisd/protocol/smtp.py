"""SMTP and LMTP in the workers: the after-queue content filter (Postfix on 10024).

Registered as "smtp" and "lmtp" in `protocol.registry`, driven by the one
blocking loop (`protocol.loop`) like AM.PDP: a worker serves one session at
a time, and the loop's limits hold with SMTP's own timeouts
(`connection_limits`): `smtp_idle_timeout` before a command and for its
line, `smtp_data_timeout` for the whole DATA, then the daemon's
`max_connection_requests` answers and `max_connection_time`. AM.PDP's
seconds (a helper on the same host) would cut an MTA that pauses between
messages, or a large DATA over a slow link.

Why our own sans-IO code and not aiosmtpd (the issue asked to measure):
aiosmtpd 1.4.6 keeps the whole DATA in memory; one 50 MiB message raised a
server's peak RSS from 24 to 224 MiB (+199 MiB, four times the message:
the lines in a list, joined, then kept twice as `content` and
`original_content`), measured here with smtplib sending to its Controller.
It also needs an asyncio loop and a thread per worker, and has its own
timeouts and limits beside protocol.loop's. Here the message is written to
an anonymous file in the worker's 0700 work base as it arrives (O_TMPFILE:
nothing is left behind when the client drops or the worker dies), and the
codec (`smtpcodec`) is fuzzed directly. Measured: 50 MiB in through the
DATA reader and out through the forwarder peak at under 2 MiB traced; the
pipeline maps the spool and reads it a window at a time (decode.window), so
the worker's peak RSS grows by about 5 MiB for such a message
(tests/integration/test_smtp_filter.py).

A session: EHLO/HELO (LHLO for LMTP) offering PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, ENHANCEDSTATUSCODES, DSN, CHUNKING and XFORWARD; MAIL, RCPT, DATA,
BDAT, RSET, NOOP, QUIT, HELP; VRFY refused. Pipelined commands are answered
together (one "request" of the loop), up to the DATA that needs its 354. XFORWARD
from Postfix names the original client (address, name, helo) and the queue
id (IDENT) for our log line and notices, and is passed on to the next hop.
After the final ".", `smtpfilter.Filter` runs the pipeline and forwards.
Clients outside `smtp_allow` are greeted with 554 and hung up on.

BDAT (RFC 3030, CHUNKING) has its own module, `smtpbdat`, a mixin of the session.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import BinaryIO, ClassVar

from amavisd.protocol import session
from amavisd.protocol.loop import ConnectionLimits
from amavisd.protocol.session import Handler
from amavisd.protocol.smtpbdat import Chunked, Chunking
from amavisd.protocol.smtpcodec import (
    MAX_LINE,
    ChunkReader,
    DataReader,
    Path,
    SyntaxProblem,
    parse_path,
    parse_xforward,
    reply,
)
from amavisd.protocol.smtpfilter import Filter, Transaction

log = logging.getLogger("amavisd.smtp")

MAX_ERRORS = 20  # bad commands on one connection before we hang up (Postfix: 20)
RESERVE = 8  # answers kept for the last transaction before max_connection_requests
GIVE_WAY_AFTER = 1.0  # seconds silent before a command while others wait: 421, closed


class SMTPSession(Chunking, session.Session):
    label = "SMTP"
    log = log
    lmtp: ClassVar[bool] = False
    verbs: ClassVar[dict[str, Callable[..., bytes]]]  # "MAIL" -> smtp_MAIL, made once a class

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.verbs = _verbs(cls)

    def __init__(self, conn: socket.socket, handler: Handler) -> None:
        super().__init__(conn, handler)
        config = handler.config
        self.config = config
        self.hostname = config.hostname
        # read once a connection: each read of a setting is a Python call (Config.__getattr__)
        self.max_message_size = config.max_message_size
        self.work_base = config.work_base_path
        self.max_recipients = config.smtp_max_recipients
        self.max_connection_requests = config.max_connection_requests
        self.peer = peer_address(conn)
        self.allowed = allowed(self.peer, config.smtp_allow)
        self.inbox = bytearray()  # command bytes not yet answered
        self.helo: str | None = None
        self.xforward: dict[str, str] = {}
        self.transaction: Transaction | None = None
        self.reader: DataReader | None = None
        self.data_done = False
        self.chunked: Chunked | None = None  # the transaction came by BDAT so far
        self.chunk: ChunkReader | None = None  # a BDAT chunk whose octets are being read
        self.chunk_last = False
        self.chunk_refusal: bytes | None = None  # decided at its BDAT line, said after its octets
        self.chunk_since = 0.0
        self.errors = 0
        self.answers = 0
        self.free_answers = 0  # answers to chunks mid-message: not requests of their own
        self.in_flight = 0  # replies owed for a message being checked (last words)
        self.filter = Filter(handler, self.lmtp)
        self.spare: BinaryIO | None = None  # the last message's spool, emptied for the next
        self._limits: dict[tuple[bool, int], ConnectionLimits] = {}  # a command's, a DATA's
        self._limits_of: ConnectionLimits | None = None

    # -- what the loop asks ----------------------------------------------------------

    @property
    def gives_way(self) -> float:
        """Seconds silent before a command, then the worker is given up if
        others wait for one (protocol.loop; a silent client of the port held
        it for smtp_idle_timeout): never inside a message's DATA or BDAT.
        Postfix proves a cached session with RSET and replaces a closed one."""
        if self.reader is not None or self.chunk is not None or self.chunked is not None:
            return 0.0
        return GIVE_WAY_AFTER

    @property
    def give_way_reply(self) -> bytes:
        return reply(421, "4.3.2", f"{self.hostname} busy: closing, try again")

    @property
    def max_request_bytes(self) -> int:  # type: ignore[override]
        # During DATA the message streams to the spool, not into memory; the
        # session answers 552 past max_message_size, the loop hangs up past this.
        if self.reader is not None or self.chunk is not None:
            return self.max_message_size + 1024 * 1024
        return MAX_LINE * 64

    def connection_limits(self, limits: ConnectionLimits) -> ConnectionLimits:
        # asked twice a loop turn: a command's and a DATA's limits are kept
        # (dataclasses.replace costs microseconds); BDAT's run down with the clock
        steady = self.chunked is None and self.chunk is None
        if limits is not self._limits_of:  # the daemon's limits (one object a connection)
            self._limits_of = limits
            self._limits.clear()
        key = (self.reader is not None, self.free_answers)
        cached = self._limits.get(key) if steady else None
        if cached is not None:
            return cached
        request, setting = self.config.smtp_idle_timeout, "smtp_idle_timeout"
        if self.reader is not None:  # after the 354: the whole message
            request, setting = self.config.smtp_data_timeout, "smtp_data_timeout"
        elif self.chunked is not None or self.chunk is not None:  # what is left of it
            since = self.chunked.since if self.chunked is not None else self.chunk_since
            request = max(0.0, since + self.config.smtp_data_timeout - time.monotonic())
            setting = "smtp_data_timeout"
        mine = dataclasses.replace(limits, idle_timeout=self.config.smtp_idle_timeout,
                                   idle_setting="smtp_idle_timeout",
                                   request_timeout=request, request_setting=setting,
                                   max_requests=limits.max_requests + self.free_answers)
        if steady:
            if len(self._limits) > 4:  # free_answers moved on (BDAT): the old ones are done
                self._limits.clear()
            self._limits[key] = mine
        return mine

    def greeting(self) -> bytes:
        if not self.allowed:
            self.closing = True
            log.warning("%s client %s not in smtp_allow: refused", self.label,
                        self.peer or "?")
            return reply(554, "5.7.1", f"{self.hostname} Access denied")
        kind = "LMTP" if self.lmtp else "ESMTP"
        return reply(220, "", f"{self.hostname} {kind} amavisd service ready")

    def receive(self, data: bytes) -> None:
        if self.reader is not None:
            rest = self.reader.feed(data)
            if rest is not None:
                self.data_done = True
                self.inbox += rest
        elif self.chunk is not None and not self.chunk.done:
            rest = self.chunk.feed(data)
            if rest:
                self.inbox += rest
        else:
            self.inbox += data

    def request_ready(self) -> bool:
        if self.reader is not None:
            return self.data_done
        if self.chunk is not None:
            return self.chunk.done
        if self.inbox.find(b"\r\n", 0, MAX_LINE + 2) >= 0:
            return True
        return len(self.inbox) > MAX_LINE  # a line too long: answered, not waited for

    def mid_request(self) -> bool:
        # between two chunks the message is still arriving: its clock runs on
        return (self.reader is not None or self.chunk is not None or self.chunked is not None
                or bool(self.inbox))

    def answer(self) -> bytes:
        self.answers += 1
        try:
            if self.reader is not None:
                return self.end_of_data()
            return self.answer_commands()
        except Exception:
            log.exception("%s internal error", self.label)
            self.closing = True
            return reply(421, "4.3.0", f"{self.hostname} Error: internal error, closing")
        finally:
            if self.chunk is not None or self.chunked is not None:
                self.free_answers += 1

    def oversize(self) -> bytes:
        if self.reader is not None or self.chunk is not None:
            self.abort_data()
            return reply(552, "5.3.4", "Error: message file too big")
        return reply(500, "5.5.2", "Error: line too long")

    def last_words(self, reason: str) -> bytes:
        """A worker killed while a message is checked or forwarded: 451 for
        it (for each recipient, with LMTP), so the MTA keeps it."""
        return reply(451, "4.5.0", "Error in processing, try again later") * self.in_flight

    def finish(self) -> None:
        self.abort_data()
        self.release_spare()

    def release_spare(self) -> None:
        """The kept spool closes with the session (at QUIT: before its 221)."""
        if self.spare is not None:
            self.spare.close()
            self.spare = None

    # -- commands ----------------------------------------------------------------------

    def answer_commands(self) -> bytes:
        """Every complete command buffered (a pipelined group), up to DATA or QUIT:
        the lines taken off in one pass, the buffer cut once."""
        out = []
        inbox = self.inbox
        start = 0
        try:
            while not self.closing and self.reader is None:
                if self.chunk is not None:
                    del inbox[:start]
                    start = 0
                    if not self.read_chunk(out):
                        break  # its octets still coming, or the message answered
                    inbox = self.inbox
                    continue
                end = inbox.find(b"\r\n", start, start + MAX_LINE + 2)
                if end < 0:
                    if len(inbox) - start > MAX_LINE:
                        inbox.clear()
                        start = 0
                        self.closing = True
                        out.append(reply(500, "5.5.2", "Error: line too long"))
                    break
                line = inbox[start:end]
                start = end + 2
                out.append(self.dispatch(line))
        finally:
            del inbox[:start]
        if self.reader is not None and self.inbox:
            # bytes sent after DATA without waiting for the 354 are the message,
            # as they would be read off the socket: never commands for later
            early, self.inbox = bytes(self.inbox), bytearray()
            self.receive(early)
        return b"".join(out)

    def dispatch(self, line: bytes | bytearray) -> bytes:
        # parse_command's work, inline: a command line is the hot path of a session
        # (strip and upper only when there is something to strip or lower-case)
        text = line.decode("utf-8", "replace")
        if text[:1] == " " or text[-1:] == " ":
            text = text.strip(" ")
        verb, _, argument = text.partition(" ")
        if argument[:1] == " " or argument[-1:] == " ":
            argument = argument.strip(" ")
        verbs = self.verbs
        handler = verbs.get(verb) or verbs.get(verb.upper())
        try:
            if handler is None:
                return self.error(500, "5.5.2", "Error: command not recognized")
            return handler(self, argument)
        except SyntaxProblem as problem:
            code, _, text = problem.reply.partition(" ")
            enhanced, _, text = text.partition(" ")
            return self.error(int(code), enhanced, text)

    def error(self, code: int, enhanced: str, text: str) -> bytes:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self.closing = True
            return reply(421, "4.7.0", f"{self.hostname} Error: too many errors")
        return reply(code, enhanced, text)

    def smtp_EHLO(self, argument: str) -> bytes:
        if self.lmtp:
            return self.error(500, "5.5.1", "Error: LMTP speaks LHLO, not EHLO")
        return self.hello(argument, extended=True)

    def smtp_HELO(self, argument: str) -> bytes:
        if self.lmtp:
            return self.error(500, "5.5.1", "Error: LMTP speaks LHLO, not HELO")
        return self.hello(argument, extended=False)

    def smtp_LHLO(self, argument: str) -> bytes:
        if not self.lmtp:
            return self.error(500, "5.5.2", "Error: command not recognized")
        return self.hello(argument, extended=True)

    def hello(self, argument: str, extended: bool) -> bytes:
        if not argument:
            return self.error(501, "5.5.4", "Syntax: EHLO hostname")
        self.helo = argument[:255]
        self.drop_transaction()
        self.xforward = {}
        if not extended:
            return reply(250, "", self.hostname)
        return reply(250, "", self.hostname, "PIPELINING",
                     f"SIZE {self.max_message_size}", "ENHANCEDSTATUSCODES",
                     "8BITMIME", "SMTPUTF8", "DSN", "CHUNKING",
                     "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")

    def smtp_XFORWARD(self, argument: str) -> bytes:
        if self.transaction is not None:
            return self.error(503, "5.5.1", "Error: XFORWARD not allowed within transaction")
        self.xforward.update(parse_xforward(argument))
        return reply(250, "2.0.0", "Ok")

    def smtp_MAIL(self, argument: str) -> bytes:
        if self.helo is None:
            return self.error(503, "5.5.1", f"Error: send {'LHLO' if self.lmtp else 'HELO/EHLO'}"
                              " first")
        if self.transaction is not None:
            return self.error(503, "5.5.1", "Error: nested MAIL command")
        path = parse_path(argument, "FROM")
        problem = self.check_mail_params(path)
        if problem:
            return self.error(*problem)
        self.transaction = Transaction(path.address, path.params, dict(self.xforward))
        return reply(250, "2.1.0", "Ok")

    def check_mail_params(self, path: Path) -> tuple[int, str, str] | None:
        params = path.params
        for keyword in params:
            if keyword not in ("SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"):
                return 555, "5.5.4", f"Unsupported option: {keyword}"
        if "SIZE" in params:
            size = params["SIZE"] or ""
            if not (size.isascii() and size.isdigit()):  # not "²": int() refuses it
                return 501, "5.5.4", "Bad message size syntax"
            if len(size) > 20 or int(size) > self.max_message_size:
                return 552, "5.3.4", "Message size exceeds fixed limit"
        if "BODY" in params:
            body = params["BODY"]
            if body not in ("7BIT", "8BITMIME") and (body or "").upper() not in ("7BIT", "8BITMIME"):
                return 501, "5.5.4", "Unsupported BODY type"
        if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
            return 501, "5.5.4", "SMTPUTF8 takes no value"
        if "RET" in params and (params["RET"] or "").upper() not in ("FULL", "HDRS"):
            return 501, "5.5.4", "Bad RET parameter"
        if not path.address.isascii() and "SMTPUTF8" not in params:
            return 553, "5.6.7", "Must declare SMTPUTF8 to send unicode address"
        return None

    def smtp_RCPT(self, argument: str) -> bytes:
        if self.transaction is None:
            return self.error(503, "5.5.1", "Error: need MAIL command")
        if self.chunked is not None:
            return self.error(503, "5.5.1", "Error: RCPT after BDAT")
        path = parse_path(argument, "TO")
        if not path.address:
            return self.error(501, "5.1.3", "Bad recipient address syntax")
        for keyword in path.params:
            if keyword not in ("NOTIFY", "ORCPT"):
                return self.error(555, "5.5.4", f"Unsupported option: {keyword}")
        if not path.address.isascii() and "SMTPUTF8" not in self.transaction.params:
            return self.error(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
        if len(self.transaction.recipients) >= self.max_recipients:
            return reply(452, "4.5.3", "Error: too many recipients")
        self.transaction.add_recipient(path.address, path.params)
        return reply(250, "2.1.5", "Ok")

    def smtp_DATA(self, argument: str) -> bytes:
        if argument:
            return self.error(501, "5.5.4", "Syntax: DATA")
        if self.transaction is None:
            return self.error(503, "5.5.1", "Error: need MAIL command")
        if self.chunked is not None:  # RFC 3030: never both in one transaction
            self.drop_transaction()
            return self.error(503, "5.5.1", "Error: DATA after BDAT")
        if not self.transaction.recipients:
            return self.error(503 if self.lmtp else 554, "5.5.1", "Error: no valid recipients")
        sink = self.open_spool()
        if sink is None:
            return reply(451, "4.3.0", "Error: temporary local problem, try again later")
        self.reader = DataReader(sink, self.max_message_size)
        self.data_done = False
        return reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def open_spool(self) -> Callable[[bytes], object] | None:
        """The transaction's spool, for DATA or the first BDAT; None (and no
        transaction) when the work dir will not take it."""
        assert self.transaction is not None
        spare, self.spare = self.spare, None
        try:
            try:
                return self.transaction.open_spool(self.work_base, spare)
            except FileNotFoundError:
                # removed since the worker last looked (before it waited for this
                # connection): made again, then tried once more
                self.handler.ensure_dirs()
                return self.transaction.open_spool(self.work_base)
        except OSError as err:
            log.error("%s cannot spool a message in %s: %s", self.label,
                      self.work_base, err.strerror or err)
            self.drop_transaction()
            return None

    def smtp_RSET(self, argument: str) -> bytes:
        self.drop_transaction()
        return reply(250, "2.0.0", "Ok")

    def smtp_NOOP(self, argument: str) -> bytes:
        return reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, argument: str) -> bytes:
        self.closing = True
        self.release_spare()
        return reply(221, "2.0.0", "Bye")

    def smtp_VRFY(self, argument: str) -> bytes:
        return self.error(502, "5.5.1", "VRFY command is disabled")

    def smtp_HELP(self, argument: str) -> bytes:
        return reply(214, "2.0.0", "Commands: " + ("LHLO" if self.lmtp else "EHLO HELO")
                     + " XFORWARD MAIL RCPT DATA BDAT RSET NOOP QUIT HELP")

    def not_implemented(self, argument: str) -> bytes:
        return self.error(502, "5.5.1", "Error: command not implemented")

    smtp_EXPN = smtp_ETRN = smtp_TURN = smtp_STARTTLS = smtp_AUTH = not_implemented

    # -- the end of the message ------------------------------------------------------------

    def end_of_data(self) -> bytes:
        """The final "." arrived."""
        reader = self.reader
        assert reader is not None
        self.reader, self.data_done = None, False
        return self.end_of_message(reader.size, reader.oversized)

    def end_of_message(self, size: int, oversized: bool) -> bytes:
        """The whole message is in (DATA or BDAT): check, forward, answer (one
        line, or one per recipient for LMTP). The transaction ends here,
        whatever happened."""
        transaction = self.transaction
        assert transaction is not None
        self.transaction, self.chunked = None, None
        self.xforward = {}  # Postfix sends it again for the next message
        try:
            if oversized:
                log.info("%s message over max_message_size (%d bytes): refused", self.label,
                         size)
                replies = [reply(552, "5.3.4", "Error: message file too big")]
                return b"".join(replies * (len(transaction.recipients) if self.lmtp else 1))
            envelope_client = {"peer": self.peer, "helo": self.helo or "",
                               "protocol": "LMTP" if self.lmtp else "ESMTP"}
            self.in_flight = len(transaction.recipients) if self.lmtp else 1
            out = self.filter.run(transaction, size, envelope_client)
        finally:
            self.in_flight = 0
            self.spare = transaction.close_spool(keep=True)
        if self.answers - self.free_answers + RESERVE >= self.max_connection_requests:
            self.closing = True  # at a transaction's end, before the loop's hard limit
        return out

    def abort_data(self) -> None:
        """The client went away or sent too much mid-message: the spool goes,
        nothing forwarded."""
        self.drop_transaction()
        self.reader, self.chunk, self.chunk_refusal = None, None, None

    def drop_transaction(self) -> None:
        """The transaction ends unsent (RSET, a new EHLO, a refusal): its spool goes."""
        if self.transaction is not None:
            self.transaction.close_spool()
        self.transaction, self.chunked = None, None


def _verbs(cls: type) -> dict[str, Callable[..., bytes]]:
    """The commands a session class answers, by verb: its `smtp_<VERB>` methods
    whose VERB is letters only (a verb of other characters is not recognized)."""
    return {name[5:]: getattr(cls, name) for name in dir(cls)
            if name.startswith("smtp_") and name[5:].isalpha()}


SMTPSession.verbs = _verbs(SMTPSession)


class LMTPSession(SMTPSession):
    label = "LMTP"
    lmtp = True


def peer_address(conn: socket.socket) -> str:
    """The client's IP address; "" over a Unix socket."""
    if conn.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    try:
        return conn.getpeername()[0]
    except OSError:
        return ""


def allowed(peer: str, networks: list[str]) -> bool:
    """A Unix socket's client is whoever may open it (its mode); a TCP one
    must be in `smtp_allow`."""
    if not peer:
        return True
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    for entry in networks:
        network = ipaddress.ip_network(entry, strict=False)
        if address.version == network.version and address in network:
            return True
    return False


__all__ = ["LMTPSession", "SMTPSession", "allowed"]
