"""The SMTP filter's fast paths against the plain code they replaced.

Each fast path (a path's closing bracket found by find() when nothing is
quoted, control characters by one regex, the session's command lines taken
in one pass and dispatched through a table, XFORWARD, the forward side's
plain_path, xtext and XFORWARD lines) is run beside the per-character or
per-line code it replaced on the same random and hostile inputs, and must
give the same answer, byte for byte:
the same result or the same refusal, the same replies, the same spooled
message, the same bytes left for the next command.
"""

from __future__ import annotations

import random
import re
import socket

import pytest

from amavisd.actions import smtpout
from amavisd.protocol import smtpcodec
from amavisd.protocol.smtp import LMTPSession, SMTPSession
from amavisd.protocol.smtpcodec import (
    MAX_ADDRESS,
    MAX_LINE,
    XFORWARD_NAMES,
    Path,
    SyntaxProblem,
    parse_command,
    parse_params,
    parse_path,
    parse_xforward,
    take_line,
    xtext_decode,
)
from amavisd.verdict import Destiny
from tests.rigs.smtp_standin import StandIn
from tests.unit.test_smtp_listen import drive, stand_in

# -- the code replaced, kept as the oracle --------------------------------------------------

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+\Z")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def old_closing_bracket(text: str) -> int:
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    return -1


def old_parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.match(keyword) or (eq and not _VALUE.match(value)):
            raise SyntaxProblem("501 5.5.4 Syntax error in parameters")
        keyword = keyword.upper()
        if keyword in params:
            raise SyntaxProblem(f"501 5.5.4 Duplicate parameter {keyword}")
        params[keyword] = value if eq else None
    return params


def old_parse_path(argument: str, keyword: str) -> Path:
    head, colon, rest = argument.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise SyntaxProblem(f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}"
                            ":<address>")
    rest = rest.lstrip(" ")
    if rest.startswith("<"):
        end = old_closing_bracket(rest)
        if end < 0:
            raise SyntaxProblem("501 5.1.7 Bad address syntax")
        address, tail = rest[1:end], rest[end + 1:]
    else:
        address, space, tail = rest.partition(" ")
        tail = space + tail
    if tail and not tail.startswith(" "):
        raise SyntaxProblem("501 5.5.4 Syntax error in parameters")
    if len(address) > MAX_ADDRESS or any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise SyntaxProblem("501 5.1.7 Bad address syntax")
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    return Path(address, old_parse_params(tail))


def old_parse_xforward(argument: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    if not argument:
        raise SyntaxProblem("501 5.5.4 Syntax: XFORWARD attribute=value...")
    for item in argument.split():
        name, eq, value = item.partition("=")
        name = name.upper()
        if not eq or name not in XFORWARD_NAMES or len(value) > 255 * 3:
            raise SyntaxProblem(f"501 5.5.4 Bad XFORWARD attribute {name[:20]}")
        if value.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            attributes[name] = ""
            continue
        decoded = xtext_decode(value) if "+" in value else value
        if _CONTROL.search(decoded.replace(" ", "")):
            raise SyntaxProblem(f"501 5.5.4 Bad XFORWARD attribute {name}")
        attributes[name] = decoded[:255]
    return attributes


class OldCommands:
    """The session's command loop and dispatch as they were: a line at a time."""

    def answer_commands(self) -> bytes:
        out = []
        while not self.closing and self.reader is None:
            if self.chunk is not None:
                if not self.read_chunk(out):
                    break
                continue
            if len(self.inbox) > MAX_LINE and self.inbox.find(b"\r\n", 0, MAX_LINE + 2) < 0:
                self.inbox.clear()
                self.closing = True
                out.append(smtpcodec.reply(500, "5.5.2", "Error: line too long"))
                break
            line = take_line(self.inbox)
            if line is None:
                break
            out.append(self.dispatch(line))
        if self.reader is not None and self.inbox:
            early, self.inbox = bytes(self.inbox), bytearray()
            self.receive(early)
        return b"".join(out)

    def dispatch(self, line: bytes) -> bytes:
        command = parse_command(line)
        handler = getattr(self, f"smtp_{command.verb}", None) if command.verb.isalpha() \
            else None
        try:
            if handler is None:
                return self.error(500, "5.5.2", "Error: command not recognized")
            return handler(command.argument)
        except SyntaxProblem as problem:
            code, _, text = problem.reply.partition(" ")
            enhanced, _, text = text.partition(" ")
            return self.error(int(code), enhanced, text)


class OldSMTP(OldCommands, SMTPSession):
    pass


class OldLMTP(OldCommands, LMTPSession):
    pass


def old_plain_path(address: str) -> bool:
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


def old_xtext(value: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in value)


def old_xforward_lines(offered_line: str, attributes: dict[str, str]) -> list[str]:
    offered = set(offered_line.upper().split())
    if not offered or not attributes:
        return []
    items = []
    for name in smtpout.XFORWARD_ORDER:
        value = attributes.get(name, "")
        if name in offered and value:
            value = old_xtext(smtpout._NEUTER.sub("?", value))
            value = re.sub(r"\+[0-9A-F]?\Z", "", value[:255])  # never a cut escape (stop 27)
            items.append(f"{name}={value}")
    lines: list[list[str]] = []
    for item in items:
        if not lines or len(" ".join([*lines[-1], item])) > smtpout.XFORWARD_LINE:
            lines.append([])
        lines[-1].append(item)
    return ["XFORWARD " + " ".join(line) for line in lines]


# -- inputs -------------------------------------------------------------------------------

PIECES = ["a", "b", "@", ".", "<", ">", '"', "\\", " ", ":", "=", "+", "\t", "\x00", "\x01", "\x1f",
          "\x7f", "\x80", "é", "ſ", "ı", "\u00a0", "[", "]", "(", ";", "FROM", "TO", " SIZE=10",
          " BODY=8BITMIME", " size=", " ORCPT=rfc822;x@y", " NOTIFY=NEVER", "+2B", "+41", "+4",
          "x" * 300, "SMTPUTF8", " RET=FULL", "=", "\r", "\n", "-"]


def text(rng: random.Random, most: int = 12) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, most)))


def outcome(function, *args):
    try:
        result = function(*args)
    except SyntaxProblem as problem:
        return "refused", problem.reply
    return "ok", vars(result) if isinstance(result, Path) else result


def path_argument(rng: random.Random, keyword: str) -> str:
    if rng.random() < 0.4:
        return rng.choice(["FROM:", "TO:", "from:", " FROM :", "FROM: ", "To:", "ſROM:", ""]) \
            + rng.choice(["<", "", '<"', "< "]) + text(rng, 20)
    local = rng.choice(["a", "a.b", '"a b"', '"a>b"', '"a\\"b"', '"x', "é", "a\x01", "@r:a", "",
                        "a b", "x" * rng.choice([1, 500, 511, 512, 513])])
    domain = rng.choice(["@b", "@b.c", "", "@é", "@[1.2.3.4]"])
    params = [rng.choice(["SIZE=10", "size=10", "BODY=8BITMIME", "ORCPT=rfc822;a@b", "X-Y=z",
                          "-X=1", "SIZE", "SIZE=", "SIZE=a=b", "ENVID=\x01", "SMTPUTF8",
                          "ſIZE=1", "NOTIFY=SUCCESS,FAILURE"]) for _ in range(rng.randint(0, 3))]
    return (keyword + ":" + rng.choice(["", " ", "  "])
            + rng.choice([f"<{local}{domain}>", local + domain])
            + "".join(rng.choice([" ", "  ", "\t", ""]) + p for p in params)
            + rng.choice(["", " ", "x"]))


# -- the checks ---------------------------------------------------------------------------


def test_paths_and_parameters_as_before():
    rng = random.Random(5321)
    for _ in range(6000):
        keyword = rng.choice(["FROM", "TO"])
        argument = path_argument(rng, keyword)
        assert outcome(parse_path, argument, keyword) == \
            outcome(old_parse_path, argument, keyword), argument
        assert outcome(parse_params, argument) == outcome(old_parse_params, argument), argument


def test_xforward_as_before():
    rng = random.Random(10024)
    names = [*XFORWARD_NAMES, "name", "Addr", "FOO", "", "ſOURCE"]
    values = ["[UNAVAILABLE]", "[unavailable]", "[TEMPUNAVAIL]", "[x", "a+2Bb", "+0A", "+7F",
              "+20", "+zz", "x" * 765, "x" * 766, "host.example", "\x01", "é", "", "["]
    for _ in range(6000):
        items = [rng.choice(names) + rng.choice(["=", "", "=="])
                 + (rng.choice(values) if rng.random() < 0.6 else text(rng, 6))
                 for _ in range(rng.randint(0, 5))]
        argument = rng.choice([" ", "  ", "\t", "\x1c"]).join(items)
        assert outcome(parse_xforward, argument) == outcome(old_parse_xforward, argument), \
            argument


COMMANDS = [b"EHLO mta.test\r\n", b"HELO x\r\n", b"LHLO x\r\n", b"ehlo\r\n",
            b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME\r\n",
            b"MAIL FROM:<a@b> SIZE=99999\r\n", b"mail from:<> body=7bit\r\n",
            b'MAIL FROM:<"a b"@c> RET=HDRS ENVID=x\r\n', b"MAIL FROM:<a@b> SMTPUTF8=1\r\n",
            b"MAIL FROM:<\xc3\xa9@b>\r\n", b"MAIL FROM:<a@b> FOO=1\r\n",
            b"MAIL FROM:<a@b> BODY=bin\r\n", b"MAIL FROM:<a@b> SIZE=\r\n",
            b"MAIL FROM:<a@b> RET=x\r\n", b"RCPT TO:<c@d>\r\n",
            b"RCPT TO:<c@d> NOTIFY=NEVER ORCPT=rfc822;c@d\r\n", b"RCPT TO:<>\r\n",
            b"RCPT TO:<c@d> X=1\r\n", b"RCPT TO:<\xc3\xa9@d>\r\n", b"DATA\r\n", b"DATA x\r\n",
            b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n", b"EXPN x\r\n",
            b"XFORWARD NAME=a ADDR=1.2.3.4\r\n", b"XFORWARD\r\n", b"XFORWARD IDENT=+0A\r\n",
            b"QUIT\r\n", b"BDAT 5\r\nabcde", b"BDAT 3 LAST\r\nx\r\n", b"BDAT x\r\n",
            b"BDAT 0 LAST\r\n", b"\r\n", b" \r\n", b"\x00\r\n", b"M\xffIL FROM:<a@b>\r\n",
            "maıl FROM:<a@b>\r\n".encode(), b"ehlo\rx\r\n", b"NOOP\n", b"NOOP\r\r\n", b"X" * 5000,
            b"NOOP " + b"y" * 4090 + b"\r\n", b"NOOP " + b"y" * 4089 + b"\r\n",
            b"smtp_MAIL x\r\n", b"MAIL_X\r\n", b"  MAIL  FROM:<a@b>  \r\n", b"noop \r\n"]
BODIES = [b"a\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\r\n",
          b"\x00", b"\xff\xfe", b"x" * 1500, b".x\r\n", b"\r", b"\n", b"\r\n.",
          b"MAIL FROM:<z@z>\r\n", b"QUIT\r\n"]


def wire(rng: random.Random) -> bytes:
    if rng.random() < 0.5:  # transactions, mostly well formed
        parts = [b"EHLO mta.test\r\n"]
        for _ in range(rng.randint(1, 4)):
            parts += [rng.choice(COMMANDS[4:13]), rng.choice(COMMANDS[15:20]),
                      rng.choice(COMMANDS[15:20]),
                      rng.choice([b"DATA\r\n"] * 5 + [b"BDAT 5\r\nabcde", b"BDAT 3 LAST\r\nx\r\n"])]
            parts += [rng.choice(BODIES) for _ in range(rng.randint(0, 8))]
            parts.append(rng.choice([b"\r\n.\r\n", b".\r\n", b"NOOP\r\n"]))
        return b"".join(parts)
    parts = [rng.choice(COMMANDS) for _ in range(rng.randint(1, 14))]
    if rng.random() < 0.5:
        parts.insert(0, b"EHLO mta.test\r\n")
    return b"".join(parts)


@pytest.mark.parametrize("lmtp", [False, True])
def test_sessions_answer_as_before_on_any_cut(tmp_path, lmtp):
    rng = random.Random(2920 + lmtp)
    handler = StandIn.at(tmp_path, destiny=Destiny.DISCARD, max_message_size=3000,
                         smtp_max_recipients=3)
    new, old = (LMTPSession, OldLMTP) if lmtp else (SMTPSession, OldSMTP)
    for _ in range(300):
        stream = wire(rng)
        cuts = [rng.choice([1, 2, 5, 17, 100, 1 << 20]) for _ in range(len(stream) + 1)]
        seen = []
        for kind in (new, old):
            handler.spooled.clear()
            handler.ids = 0  # the same log ids in both replies
            ours, theirs = socket.socketpair()
            try:
                session = kind(ours, handler)
                out, pos = [session.greeting()], 0
                for cut in cuts:
                    piece, pos = stream[pos:pos + cut], pos + cut
                    if piece and not session.closing:
                        session.receive(piece)
                    while session.request_ready() and not session.closing:
                        out.append(session.answer())
                    if pos >= len(stream):
                        break
                session.finish()
                seen.append((out, list(handler.spooled), session.closing, bytes(session.inbox)))
            finally:
                ours.close()
                theirs.close()
        assert seen[0] == seen[1], stream


def test_forward_side_encoders_as_before():
    rng = random.Random(25)
    for _ in range(6000):
        address = text(rng, 10)
        assert smtpout.plain_path(address) is old_plain_path(address), address
        assert smtpout.xtext(address) == old_xtext(address)
        offered = rng.choice(["NAME ADDR PORT PROTO HELO IDENT SOURCE", "name addr", "", "ADDR"])
        attributes = {k: rng.choice([text(rng, 8), "", "x" * rng.randint(0, 300), "a+b=c",
                                     "é+=\x00<>"])
                      for k in rng.sample([*smtpout.XFORWARD_ORDER, "other"], rng.randint(0, 8))}
        client = type("Hop", (), {"esmtp_features": {"xforward": offered} if offered else {}})()
        transaction = smtpout.Transaction("smtp:[127.0.0.1]:1", "127.0.0.1", 1, "", False, None,
                                          1.0, False)
        assert transaction.xforward_lines(client, attributes) == \
            old_xforward_lines(offered, attributes), attributes


# -- found by the hostile review of stop 27 (older than the fast paths) ---------------------


def test_an_xforward_value_is_never_cut_inside_an_escape():
    client = type("Hop", (), {"esmtp_features": {"xforward": "NAME ADDR"}})()
    transaction = smtpout.Transaction("smtp:[127.0.0.1]:1", "127.0.0.1", 1, "", False, None,
                                      1.0, False)
    [line] = transaction.xforward_lines(client, {"NAME": "a" + "=" * 100})
    assert line == "XFORWARD NAME=a" + "+3D" * 84  # 253 characters, not "...+3D+3" (255)


@pytest.mark.parametrize("size, code", [("\u00b2", b"501"), ("\u0661\u0662", b"501"),
                                        ("1" * 30, b"552")])
def test_a_size_of_other_digits_or_absurd_length_is_answered_not_a_crash(tmp_path, size, code):
    wire = f"EHLO x\r\nMAIL FROM:<a@b> SIZE={size}\r\nQUIT\r\n".encode()
    driven = drive(stand_in(tmp_path), wire)
    assert [line[:3] for line in driven][-2:] == [code, b"221"], driven
