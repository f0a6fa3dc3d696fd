"""The SMTP/LMTP server's codec: bytes in, commands and message data out.

Sans-IO and handler-free, so it can be fuzzed directly: command lines are
cut from the input (CRLF only, bounded length), `MAIL FROM:` / `RCPT TO:`
arguments parsed into an address and ESMTP parameters (RFC 5321 4.1.2,
RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 DSN), XFORWARD
attributes read (Postfix's XFORWARD_README: xtext values), the message
after DATA dot-unstuffed and streamed to a sink as it arrives (RFC 5321
4.5.2), BDAT chunks (RFC 3030 CHUNKING) counted out octet by octet, and
replies formatted (multi-line, no CR/LF a value could smuggle).

What is hostile here is everything: a line without an end, a parameter
twice, an address with a control character, a message that ends in the
middle of a block. Only CRLF "." CRLF ends the DATA: a bare LF never does,
so no message can carry a second one past us (SMTP smuggling); the
forwarder writes a bare LF out as CRLF and dot-stuffs after, so the next
hop never sees one either. A BDAT chunk is framed by its count alone: its
octets are never looked at, and a count we cannot read leaves the rest of
the stream unframeable, so the session hangs up.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_LINE = 4096  # a command line, CRLF included (RFC 5321: 512; SMTPUTF8 and DSN make it longer)
MAX_ADDRESS = 512  # characters of one address
END = b"\r\n.\r\n"

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+\Z")  # esmtp-value (UTF-8 allowed)
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_CONTROL_NOT_SPACE = re.compile(r"[\x00-\x1f\x7f]")
_ADDRESS_CONTROL = _CONTROL_NOT_SPACE
_KNOWN_PARAMS = frozenset(("SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "NOTIFY", "ORCPT"))


class SyntaxProblem(ValueError):
    """A command argument we refuse: `reply` says it to the client."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


# -- replies -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # the same few replies, message after message
def reply(code: str | int, enhanced: str, *lines: str) -> bytes:
    """A reply, multi-line when given several lines; control characters in a
    line (from an address or a next hop's text) become spaces."""
    texts = [" ".join(_CONTROL.sub(" ", line).split()) for line in lines] or [""]
    out = []
    for i, text in enumerate(texts):
        sep = " " if i == len(texts) - 1 else "-"
        body = f"{enhanced} {text}" if enhanced else text
        out.append(f"{code}{sep}{body}".rstrip() + "\r\n")
    return "".join(out).encode("utf-8", "replace")


def split_reply(line: str) -> tuple[str, str, str]:
    """'451 4.3.0 text' -> ('451', '4.3.0', 'text'); a reply without an
    enhanced code gets one of its class ('x.0.0'); garbage is ('451', '4.5.0', line)."""
    match = re.match(r"([245]\d\d)[ -]?(?:([245]\.\d{1,3}\.\d{1,3})\b)?\s*(.*)\Z", line, re.S)
    if not match:
        return "451", "4.5.0", line
    code, enhanced, text = match.groups()
    return code, enhanced or f"{code[0]}.0.0", text


# -- command lines -------------------------------------------------------------------------


@dataclass
class Command:
    verb: str  # upper case
    argument: str  # the rest, stripped
    raw_length: int


def take_line(buffer: bytearray) -> bytes | None:
    """The next complete line (without CRLF) removed from `buffer`, or None.
    A line longer than MAX_LINE is returned as is (the caller refuses it)."""
    end = buffer.find(b"\r\n", 0, MAX_LINE + 2)
    if end < 0:
        return None
    line = bytes(buffer[:end])
    del buffer[:end + 2]
    return line


def parse_command(line: bytes) -> Command:
    text = line.decode("utf-8", "replace")
    verb, _, argument = text.strip(" ").partition(" ")
    return Command(verb.upper(), argument.strip(" "), len(line))


# -- MAIL FROM / RCPT TO -------------------------------------------------------------------


@dataclass
class Path:
    address: str  # without the angle brackets; "" for the null sender
    params: dict[str, str | None] = field(default_factory=dict)  # KEYWORD -> value


def parse_path(argument: str, keyword: str) -> Path:
    """`FROM:<a@b> SIZE=10` (keyword FROM) or `TO:<c@d> NOTIFY=NEVER`.

    The address must be in angle brackets (Postfix sends them; a bare one is
    taken as amavisd-new does, up to the first space); no control character,
    no space outside a quoted local part, bounded length."""
    head, colon, rest = argument.partition(":")
    if not colon or (head != keyword and head.strip().upper() != keyword):
        raise SyntaxProblem(f"501 5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}"
                            ":<address>")
    if rest[:1] == " ":
        rest = rest.lstrip(" ")
    if rest[:1] == "<":
        # no quote: the first '>' closes the path (the scan is for quoted local parts)
        end = _closing_bracket(rest) if '"' in rest else rest.find(">", 1)
        if end < 0:
            raise SyntaxProblem("501 5.1.7 Bad address syntax")
        address, tail = rest[1:end], rest[end + 1:]
    else:
        address, space, tail = rest.partition(" ")
        tail = space + tail
    if tail and tail[0] != " ":
        raise SyntaxProblem("501 5.5.4 Syntax error in parameters")
    if address[MAX_ADDRESS:] or _ADDRESS_CONTROL.search(address):
        raise SyntaxProblem("501 5.1.7 Bad address syntax")
    if address[:1] == "@" and ":" in address:  # an obsolete source route: drop it
        address = address.split(":", 1)[1]
    return Path(address, parse_params(tail) if tail else {})


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping a quoted local part."""
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


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, eq, value = item.partition("=")
        if keyword not in _KNOWN_PARAMS:  # the usual ones need neither the pattern nor upper()
            if not _KEYWORD.match(keyword):
                raise SyntaxProblem("501 5.5.4 Syntax error in parameters")
            keyword = keyword.upper()
        if eq and not _VALUE.match(value):
            raise SyntaxProblem("501 5.5.4 Syntax error in parameters")
        if keyword in params:
            raise SyntaxProblem(f"501 5.5.4 Duplicate parameter {keyword}")
        params[keyword] = value if eq else None
    return params


def xtext_decode(value: str) -> str:
    """RFC 3461 xtext; SyntaxProblem when it is not xtext."""
    if not _XTEXT.match(value):
        raise SyntaxProblem("501 5.5.4 Bad xtext value")
    raw = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
    return raw.encode("latin-1").decode("utf-8", "replace")


XFORWARD_NAMES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")


def parse_xforward(argument: str) -> dict[str, str]:
    """XFORWARD attributes, decoded; "[UNAVAILABLE]" and "[TEMPUNAVAIL]" are empty."""
    attributes: dict[str, str] = {}
    if not argument:
        raise SyntaxProblem("501 5.5.4 Syntax: XFORWARD attribute=value...")
    for item in argument.split():
        name, eq, value = item.partition("=")
        if name not in XFORWARD_NAMES:  # Postfix spells them in upper case
            name = name.upper()
        if not eq or name not in XFORWARD_NAMES or value[255 * 3:]:
            raise SyntaxProblem(f"501 5.5.4 Bad XFORWARD attribute {name[:20]}")
        if value[:1] == "[" and value.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            attributes[name] = ""
            continue
        decoded = xtext_decode(value) if "+" in value else value
        if _CONTROL_NOT_SPACE.search(decoded):
            raise SyntaxProblem(f"501 5.5.4 Bad XFORWARD attribute {name}")
        attributes[name] = decoded[:255]
    return attributes


# -- DATA ----------------------------------------------------------------------------------


class DataReader:
    """The message after DATA, dot-unstuffed, written to `sink` as it comes.

    `feed()` returns None while the message goes on, and the bytes after the
    final "." (pipelined commands) once it ended. At most 4 bytes are held
    back (a possible start of CRLF "." CRLF), so memory stays flat whatever
    the size. Past `limit` bytes nothing more is written (`oversized`), but
    the end is still looked for, so the client can be answered 552."""

    def __init__(self, sink: Callable[[bytes], object], limit: int):
        self.sink = sink
        self.limit = limit
        self.size = 0  # message bytes (after unstuffing), counted past the limit too
        self.oversized = False
        self.done = False
        self._carry = b""  # undecided tail: a prefix of CRLF "." CRLF
        self._bol = True  # the carry (or the next byte) starts a line

    def feed(self, data: bytes) -> bytes | None:
        context = b"\r\n" if self._bol else b"xx"
        work = context + self._carry + data
        end = work.find(END)
        if end >= 0:
            self._emit(work[:end + 2])
            self.done = True
            return work[end + len(END):]
        keep = 0
        for k in (4, 3, 2, 1):
            if work.endswith(END[:k]):
                keep = k
                break
        body = len(work) - 2  # bytes after the context
        if keep >= body:  # undecided all through: wait for more
            self._carry = work[2:]
            return None
        decided = work[:len(work) - keep]
        self._emit(decided)
        self._carry = work[len(work) - keep:]
        self._bol = decided.endswith(b"\r\n")
        return None

    def _emit(self, region: bytes) -> None:
        """`region` starts with the 2 context bytes: unstuff, drop them, write."""
        out = region.replace(b"\r\n.", b"\r\n")[2:]
        self.size += len(out)
        if self.oversized:
            return
        if self.size > self.limit:
            self.oversized = True
            return
        if out:
            self.sink(out)


# -- BDAT (RFC 3030) -----------------------------------------------------------------------

_BDAT = re.compile(r"([0-9]{1,20})(?: +(LAST))?\Z", re.IGNORECASE)


def parse_bdat(argument: str) -> tuple[int, bool]:
    """`<count> [LAST]` -> (count, last). SyntaxProblem otherwise: the octets
    that follow can no longer be told from commands, so the caller hangs up."""
    match = _BDAT.match(argument)
    if not match:
        raise SyntaxProblem("501 5.5.4 Syntax: BDAT count [LAST]")
    return int(match.group(1)), match.group(2) is not None


class ChunkReader:
    """One BDAT chunk: exactly `size` octets, raw (no dot-stuffing, no line
    ends looked at), written to `sink` as they come. `feed()` returns None
    while octets are owed, then the bytes after the chunk (commands); a
    chunk of 0 is done before it is fed."""

    def __init__(self, size: int, sink: Callable[[bytes], object]):
        self.size = size
        self.remaining = size
        self.sink = sink

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes | None:
        take = min(len(data), self.remaining)
        if take:
            self.sink(data if take == len(data) else data[:take])
            self.remaining -= take
        if self.remaining:
            return None
        return data[take:]
