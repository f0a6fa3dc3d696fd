"""One SMTP or LMTP transaction with the next hop, and what it said.

`SMTPForwarder.hand_over` runs a `Transaction`: connect (TCP or a Unix
socket), EHLO/LHLO (HELO for an SMTP server that knows no EHLO), XFORWARD
when offered, MAIL with the parameters the next hop understands, RCPT each
recipient, DATA streamed (`smtpdata`), then one reply (SMTP) or one per
accepted recipient (LMTP, RFC 2033), QUIT -- or, with `keep_idle`, no QUIT: the
session waits in `IDLE` for the worker's next message to the same hop
(RSET proves it alive first; a dead one is replaced before anything is sent,
so reuse can never deliver twice), saving the connect, greeting and EHLO.
A kept session's replies are trusted only in the plain shape (`in_step`): a
stray line from the hop shifts every reply by one, and a refusal read one
place off would bounce good mail, so then the message goes again, whole,
on a fresh session, whose replies are final.
A hop that offers PIPELINING (RFC 2920; Postfix does) gets [RSET,] XFORWARD,
MAIL, every RCPT and DATA in one write and answers them in one read: two
round trips a message instead of five or more. The content follows only
when every reply is in and says go; otherwise the connection is dropped in
DATA (no final dot: the hop discards the transaction).

smtplib does the talking (connect, replies, EHLO parsing); the commands are
spelled here, since smtplib's `mail()`/`rcpt()` rewrite addresses and its
`data()` wants the whole message in memory.

Classification, fail closed: a 5xx of the next hop is permanent; a 4xx,
a dropped connection, a timeout, an unreadable reply are temporary, so our
client keeps the mail. Extensions the envelope needs but the next hop lacks
follow amavisd-new: BODY=8BITMIME without 8BITMIME and non-ASCII addresses
without SMTPUTF8 are refused (550 5.6.3 / 550 5.6.7); SMTPUTF8 with only
ASCII addresses, and DSN parameters without DSN, are dropped.
"""

from __future__ import annotations

import functools
import logging
import re
import smtplib

from amavisd.actions.outcome import ForwardError, Handed, Message, Params
from amavisd.actions.smtpdata import message_chunks, message_size
from amavisd.actions.smtpsession import IDLE, HopClient, close, unread
from amavisd.envelope import bare_address

log = logging.getLogger("amavisd.forward")

MAIL_KEYWORDS = ("SIZE", "BODY", "SMTPUTF8", "RET", "ENVID")
DSN_MAIL = ("RET", "ENVID")
RCPT_KEYWORDS = ("NOTIFY", "ORCPT")
XFORWARD_ORDER = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]*\Z")  # esmtp-value, UTF-8 allowed
_NEUTER = re.compile(r"[^\x21-\x7e]|[<>()\\\";@]")  # as amavisd-new and Postfix neuter
_UNQUOTED_BAD = re.compile(r"[\x00-\x1f\x7f<> ]")
XFORWARD_LINE = 480  # bytes of attributes in one XFORWARD command


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and anything outside 33..126 as +XX."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in value)


def _clip(value: str, most: int) -> str:
    """`value` cut to `most` characters, never inside an xtext escape: a
    next hop refuses an attribute that ends in "+3". (Every "+" left after
    neutering starts an escape.)"""
    if len(value) <= most:
        return value
    cut = value[:most]
    partial = cut.rfind("+", most - 2)
    return cut[:partial] if partial != -1 else cut


@functools.lru_cache(maxsize=8)  # the few next hops' EHLO lines
def _offered(features: str) -> frozenset[str]:
    """The XFORWARD attributes a next hop's EHLO names."""
    return frozenset(features.upper().split())


def _reply(code: int, text: bytes) -> str:
    return f"{code} " + " ".join(text.decode("utf-8", "replace").split())


class Transaction:
    """One message to one next hop (see `actions.forward.SMTPForwarder`)."""

    def __init__(self, where: str, host: str, port: int, path: str, lmtp: bool,
                 helo: str | None, timeout: float, per_recipient: bool,
                 keep_idle: float = 0.0):
        self.where = where
        self.host, self.port, self.path = host, port, path
        self.lmtp, self.helo, self.timeout = lmtp, helo, timeout
        self.per_recipient = per_recipient
        self.keep_idle = keep_idle  # seconds a session may wait for the next message
        self.key = (where, helo, timeout)

    def fail(self, why: str, code: int = 451, enhanced: str = "4.4.2", *,
             reply: str = "", refused: dict[str, str] | None = None) -> ForwardError:
        """ForwardError; `reply` is the next hop's own line when it gave one."""
        temporary = not (500 <= code <= 599)
        line = f"{code} {enhanced} {self.where}: {why}"
        return ForwardError(f"{self.where}: {why}", temporary=temporary,
                            reply=reply or line, refused=refused)

    def run(self, sender: str, recipients: list[str], data: Message, params: Params) -> Handed:
        client = IDLE.take(self.key) if self.keep_idle > 0 else None
        handed = None
        try:
            if client is not None:
                try:
                    handed = self.converse(client, sender, recipients, data, params, True)
                    return handed
                except _Stale:
                    # Only the kept session's RSET failed: nothing of this
                    # message was taken (no content sent); a new session.
                    close(client, quit=False)
                except _OutOfStep as odd:
                    # No content went, so the hop keeps nothing; no QUIT: the
                    # hop may be in DATA, and its replies answer nothing.
                    log.warning("%s: a kept session's replies are out of step (%s): "
                                "sent again on a new session", self.where, odd)
                    close(client, quit=False)
            client = HopClient(self.path, self.lmtp, self.helo, self.timeout)
            try:
                # a path: any port, so smtplib does not look for one in the "host"
                code, text = client.connect(self.path or self.host, self.port or 1)
            except OSError as err:
                raise self.fail(f"cannot connect: {err.strerror or err}", 451, "4.4.1") \
                    from None
            if code != 220:
                raise self.hop_said("greeting", code, text)
            handed = self.converse(client, sender, recipients, data, params)
            return handed
        except smtplib.SMTPServerDisconnected as err:
            raise self.fail(f"connection lost: {err}") from None
        except smtplib.SMTPResponseException as err:  # a reply line past smtplib's limit
            raise self.fail(f"unreadable reply: {err.smtp_error!r}") from None
        except (OSError, ValueError, UnicodeError) as err:  # timeouts are OSErrors
            raise self.fail(f"{type(err).__name__}: {err}") from None
        finally:
            if client is not None:
                if handed is not None and self.keep_idle > 0:
                    IDLE.keep(self.key, client, self.keep_idle)  # whole: every reply read
                else:
                    close(client, quit=not client.in_data)

    def greet(self, client: HopClient) -> None:
        code, text = client.ehlo()
        if code != 250:
            if self.lmtp:
                raise self.hop_said("LHLO", code, text)
            code, text = client.helo()
            if code != 250:
                raise self.hop_said("HELO", code, text)

    def hop_said(self, step: str, code: int, text: bytes,
                 refused: dict[str, str] | None = None) -> ForwardError:
        said = _reply(code, text)
        if not (400 <= code <= 599):  # a 2xx/3xx where it makes no sense, or garbage
            return self.fail(f"unexpected reply to {step}: {said}", refused=refused)
        return ForwardError(f"{self.where}: {step}: {said}", temporary=code < 500,
                            reply=said, refused=refused, from_hop=True)

    def converse(self, client: HopClient, sender: str, recipients: list[str], data: Message,
                 params: Params, reused: bool = False) -> Handed:
        """The transaction on a greeted session; `reused`: a kept one, whose
        replies out of the plain shape raise `_OutOfStep` (see `in_step`)."""
        if not reused:
            self.greet(client)
        client.command_encoding = "ascii"
        sender = bare_address(sender)
        rcpts = [bare_address(r) for r in recipients]
        for address in (sender, *rcpts):
            if not plain_path(address):  # e.g. "b@x> NOTIFY=NEVER": parameters smuggled in
                raise self.fail(f"bad address syntax: {address[:100]!r}", 553, "5.1.3")
        mail_args = self.mail_arguments(client, sender, rcpts, params, data)
        if not (sender.isascii() and "".join(rcpts).isascii()):
            client.command_encoding = "utf-8"
        commands = [*self.xforward_lines(client, params.xforward),
                    f"MAIL FROM:<{sender}>{mail_args}",
                    *(f"RCPT TO:<{rcpt}>{self.rcpt_arguments(client, given, params)}"
                      for given, rcpt in zip(recipients, rcpts, strict=True)),
                    "DATA"]
        xforwards = len(commands) - 2 - len(rcpts)
        if "pipelining" in client.esmtp_features:  # smtplib's has_extn(), without its call
            replies = self.pipelined(client, commands)
        else:  # DATA only once the recipients' replies say it is wanted
            replies = [*self.one_by_one(client, commands[:-1]), (0, b"")]
        for code, text in replies[:xforwards]:
            if code != 250:
                log.warning("%s: XFORWARD refused: %s", self.where, _reply(code, text))
        mail, *said, go = replies[xforwards:]
        if reused:
            in_step(mail, said, go)
        if go[0] == 354:
            client.in_data = True  # from here only the content, or a dropped connection
        if mail[0] != 250:
            raise self.hop_said("MAIL FROM", *mail)
        accepted: list[str] = []
        refused: dict[str, str] = {}
        tempfailed = False
        for given, (code, text) in zip(recipients, said, strict=True):
            if code in (250, 251):
                accepted.append(given)
            else:
                refused[given] = _reply(code, text)
                tempfailed = tempfailed or not (500 <= code <= 599)
        if not accepted:
            raise self.none_taken("all recipients refused", refused)
        if tempfailed and not self.per_recipient:
            # One reply for all: go on and the tempfailed would be retried with
            # the others, who would get the mail twice. amavisd-new does the same.
            said_all = "; ".join(f"{r}: {why}" for r, why in refused.items())
            raise self.fail(f"recipient tempfailed, DATA not sent: {said_all}", 451, "4.5.3",
                            refused=refused)
        if not go[0]:
            go = client.docmd("DATA")
            if reused:
                in_step(mail, said, go)
        if go[0] != 354:
            raise self.hop_said("DATA", *go, refused)
        client.in_data = True  # also when DATA went alone (no PIPELINING)
        self.send_content(client, data)
        client.in_data = False
        return self.data_replies(client, accepted, refused)

    def send_content(self, client: HopClient, data: Message) -> None:
        """The content, its final dot last, sent only while the hop has said
        nothing since its 354: a byte from it before the dot is a reply out of
        step (a stray or early line) that would be taken for the reply to the
        end of DATA, "delivered" for a message the hop never ended. Then no
        dot goes: the connection is dropped in DATA and the hop keeps nothing."""
        last = None
        for chunk in message_chunks(data):
            if last is not None:
                client.send(last)
            last = chunk
        if unread(client):
            raise self.fail("the next hop spoke before the end of DATA (out of step): "
                            "not ended, dropped")
        client.send(last)

    def pipelined(self, client: HopClient, commands: list[str]) -> list[tuple[int, bytes]]:
        """Send the group in one write, read its replies in order. A kept
        session's group starts with RSET: if that is not answered 250, the
        session is stale (`_Stale`) and nothing of the message was taken."""
        if any("\r" in c or "\n" in c for c in commands):
            raise ValueError("a command holds a line break")
        proving = client.unproven
        group = ["RSET", *commands] if proving else commands
        try:
            client.send("".join(f"{c}\r\n" for c in group))
            client.ack_at_once()
            if proving:
                if client.getreply()[0] != 250:
                    raise _Stale
                client.unproven = False
        except (smtplib.SMTPServerDisconnected, OSError):
            if proving:
                raise _Stale from None
            raise
        return [client.getreply() for _ in commands]

    def one_by_one(self, client: HopClient, commands: list[str]) -> list[tuple[int, bytes]]:
        """Without PIPELINING: a command, its reply; after a refused MAIL the
        rest is not sent (0: no reply)."""
        replies = []
        for command in commands:
            verb, _, rest = command.partition(" ")
            replies.append(client.docmd(verb, rest))
            if verb == "MAIL" and replies[-1][0] != 250:
                break
        return replies + [(0, b"not sent")] * (len(commands) - len(replies))

    def data_replies(self, client: HopClient, accepted: list[str],
                     refused: dict[str, str]) -> Handed:
        """SMTP: one reply for all. LMTP: one per accepted recipient, in order.
        A refusal with more bytes behind the replies may be a stray line
        read in place of the hop's answer: a tempfail, never a bounce of mail
        the hop may have taken. (A 250 with more behind is believed, as a hop
        that said it twice; the session is then not reused.)"""
        if not self.lmtp:
            code, text = client.getreply()
            if code != 250 and unread(client):
                raise self.out_of_step(_reply(code, text), refused)
            if code != 250:
                raise self.hop_said("end of DATA", code, text, refused)
            said = _reply(code, text)
            return Handed(self.where, said, refused, dict.fromkeys(accepted, said))
        taken: dict[str, str] = {}
        said = ""
        at_rcpt = dict(refused)  # read before the content: believed
        for rcpt in accepted:
            code, text = client.getreply()
            if code == 250:
                taken[rcpt] = said = _reply(code, text)
            else:
                refused[rcpt] = _reply(code, text)
        if len(taken) < len(accepted) and unread(client):
            raise self.out_of_step("; ".join(why for r, why in refused.items()
                                             if r not in at_rcpt), at_rcpt)
        if not taken:
            raise self.none_taken("every recipient refused at DATA", refused)
        late = {r: why for r, why in refused.items() if not why.startswith("5")}
        if late and not self.per_recipient:
            # Too late to hold the others back: a retry delivers to them again.
            # A duplicate, never a loss, when there is one reply for all.
            log.warning("%s tempfailed %s after DATA while others took the message; "
                        "asking for a retry of all", self.where, ", ".join(late))
            raise self.fail("recipient tempfailed at DATA: "
                            + "; ".join(f"{r}: {why}" for r, why in late.items()),
                            451, "4.5.3", refused=refused)
        return Handed(self.where, said, refused, taken)

    def out_of_step(self, said: str, refused: dict[str, str]) -> ForwardError:
        """A refusal at the end of DATA with more bytes behind it (see
        `data_replies`); `refused`: those of RCPT only, read before the content."""
        return self.fail(f"a refusal at the end of DATA with more behind it ({said}): "
                         "out of step", 451, "4.4.2", refused=refused)

    def none_taken(self, why: str, refused: dict[str, str]) -> ForwardError:
        """Every recipient refused, each for its reason: permanent only if
        every reason was a 5xx; the reply is the first of the deciding kind."""
        temporary = any(not r.startswith("5") for r in refused.values())
        reply = next(r for r in refused.values() if r.startswith("5") != temporary)
        from_hop = reply[:1] in "45"
        if not from_hop:
            reply = f"451 4.5.3 {self.where}: {why}"
        return ForwardError(f"{self.where}: {why}: "
                            + "; ".join(f"{r}: {said}" for r, said in refused.items()),
                            temporary=temporary, reply=reply, refused=refused,
                            from_hop=from_hop)

    # -- what goes on the command lines ------------------------------------

    def xforward_lines(self, client: HopClient, attributes: dict[str, str]) -> list[str]:
        """XFORWARD commands for the attributes the next hop names, each short
        enough for Postfix (its reply is logged, never fatal: amavisd-new)."""
        offered = _offered(client.esmtp_features.get("xforward", ""))
        if not offered or not attributes:
            return []
        lines: list[str] = []
        current = ""  # the attributes of the line being filled
        for name in XFORWARD_ORDER:
            value = attributes.get(name)
            if value and name in offered:
                value = _NEUTER.sub("?", value)
                if "+" in value or "=" in value:  # neutered: the only ones xtext changes
                    value = xtext(value)
                item = f"{name}={_clip(value, 255)}"
                if current and len(current) + 1 + len(item) <= XFORWARD_LINE:
                    current += " " + item
                else:
                    if current:
                        lines.append("XFORWARD " + current)
                    current = item
        if current:
            lines.append("XFORWARD " + current)
        return lines

    def mail_arguments(self, client: HopClient, sender: str, rcpts: list[str], params: Params,
                       data: Message) -> str:
        features = client.esmtp_features  # smtplib keeps them by lower-case name
        given = {k.upper(): v for k, v in params.mail.items()}
        args: list[str] = []
        needs_utf8 = not (sender.isascii() and "".join(rcpts).isascii())
        if needs_utf8 or "SMTPUTF8" in given:
            if "smtputf8" in features and "8bitmime" in features:
                args.append("SMTPUTF8")
            elif needs_utf8:
                raise self.fail("non-ASCII addresses, but no SMTPUTF8 offered", 550, "5.6.7")
        body = (given.get("BODY") or "").upper()
        if body and body != "7BIT":
            if "8bitmime" not in features:
                raise self.fail(f"BODY={body}, but no 8BITMIME offered", 550, "5.6.3")
            args.append(f"BODY={body}")
        if "size" in features:
            size = message_size(data)
            said = given.get("SIZE") or ""
            if size is None and said.isascii() and said.isdigit() and len(said) <= 20:
                size = int(said)
            if size is not None:
                args.append(f"SIZE={size}")
        if "dsn" in features:
            for key in DSN_MAIL:
                value = given.get(key)
                if value and _VALUE.match(value):
                    args.append(f"{key}={value}")
        return "".join(" " + a for a in args)

    def rcpt_arguments(self, client: HopClient, given: str, params: Params) -> str:
        if "dsn" not in client.esmtp_features:
            return ""
        extras = params.rcpt.get(given, {})
        args = [f"{k.upper()}={v}" for k, v in extras.items()
                if k.upper() in RCPT_KEYWORDS and v and _VALUE.match(v)]
        return "".join(" " + a for a in args)


def plain_path(address: str) -> bool:
    """An address we may put between angle brackets in MAIL/RCPT: no angle
    bracket, space or control character outside a quoted local part, so a
    client's address can never close the path and add ESMTP parameters."""
    if '"' not in address:  # nothing quoted: a control, bracket or space anywhere refuses it
        return _UNQUOTED_BAD.search(address) is None
    quoted = False
    escaped = False
    for c in address:
        if ord(c) < 32 or ord(c) == 127:
            return False
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "<> ":
            return False
    return not quoted


class _Stale(Exception):
    """A kept session did not answer the RSET in front of a message's group."""


class _OutOfStep(Exception):
    """A kept session's replies are not in the plain shape: maybe shifted by a stray line."""


# The replies a kept session may give and be believed, by command (0: not
# sent). A 4xx at any place is believed too: read one place off, it
# tempfails what it did not answer, and the MTA's retry loses nothing, where
# a fresh session for each would double the hop's load just when it asks
# us to back off. (Shifted, DATA's place never holds the hop's 354, so
# nothing is delivered on shifted replies; a stray 354 just there meets
# `send_content`'s check.) A 5xx, or a reply that does not belong (a 250 to
# DATA: every reply one place late), is not: read one place off, a 5xx
# bounces good mail. Cost: a genuine 5xx on a kept session is asked twice,
# the second time on a new session.
_IN_STEP = {"MAIL": (250,), "RCPT": (250, 251, 0), "DATA": (354, 0)}


def in_step(mail: tuple[int, bytes], rcpts: list[tuple[int, bytes]],
            go: tuple[int, bytes]) -> None:
    """Raise `_OutOfStep` unless a kept session's group replies are believable."""
    if 400 <= mail[0] <= 499:
        return  # a tempfail, whatever the rest says (Postfix: 503 "need MAIL" to each)
    for step, (code, text) in [("MAIL", mail), *(("RCPT", r) for r in rcpts), ("DATA", go)]:
        if code not in _IN_STEP[step] and not 400 <= code <= 499:
            raise _OutOfStep(f"{step}: {_reply(code, text)}")
