"""The milter wire protocol, sans I/O: bytes in, typed packets out, and back.

Every packet, both ways, is `uint32 length` (network order, counting the
code byte) + one code byte + data. Strings are NUL-terminated; integers
big-endian. The MTA is the client: it sends commands (`Decoder` turns bytes
into the dataclasses below), we send replies (`encode`). The facts come from
libmilter's mfdef.h as recorded in shared/notes/mta-integration.md part A.

The MTA's bytes are hostile input like any other: a length over
`max_packet` (or zero) is refused before its data is buffered, so one
connection never holds more than one bounded packet; an unknown command or
a malformed negotiation is a `ProtocolError`, after which the connection is
closed (the MTA then applies its own default action: tempfail in our
recommended configuration). Strings are decoded with surrogateescape, so
any byte survives a round trip into the spool or AM.PDP unchanged.

Never: touch a socket, raise anything but ProtocolError from `feed`, or
emit a string containing a NUL (it would shift the MTA's framing).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAX_PACKET = 1 << 20  # bytes of one packet we accept (code + data); bodies come in <= 64 KiB
BODY_CHUNK = 65535  # libmilter's MILTER_CHUNK_SIZE: what an MTA sends at most in one 'B'

# -- option negotiation (mfdef.h) --------------------------------------------------------
SMFIF_ADDHDRS = 0x01  # add and insert headers
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10  # change and delete headers
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

V2_ACTIONS = 0x3F  # what a version-2 MTA can offer at most
V2_PROTOCOL = 0x7F

_HEAD = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_U32X3 = struct.Struct(">III")
_U16 = struct.Struct(">H")


class ProtocolError(Exception):
    """The MTA broke the framing or sent what no MTA sends: close the connection."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings up to the end of the packet; a last one
    without its NUL is taken as it is (tolerant: nothing follows it)."""
    if not data:
        return []
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return parts


# -- commands: MTA -> milter ------------------------------------------------------------


@dataclass(frozen=True)
class OptNeg:
    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class Macro:
    stage: str  # the command the macros belong to: "C", "H", "M", "R", "T", "L", "N", "B", "E"
    macros: dict[str, str] = field(default_factory=dict)  # names without braces


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str = "U"  # "4", "6", "L" (Unix socket), "U" (unknown)
    port: int = 0
    address: str = ""


@dataclass(frozen=True)
class Helo:
    name: str


@dataclass(frozen=True)
class Mail:
    args: tuple[str, ...]  # "<sender>", then ESMTP arguments


@dataclass(frozen=True)
class Rcpt:
    args: tuple[str, ...]  # "<recipient>", then ESMTP arguments


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Header:
    name: bytes
    value: bytes  # as the MTA sent it: folded with "\n", no leading space unless LEADSPC


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class Body:
    data: bytes


@dataclass(frozen=True)
class EndOfMessage:
    data: bytes = b""  # libmilter allows a last body chunk here


@dataclass(frozen=True)
class Unknown:
    command: bytes


@dataclass(frozen=True)
class Abort:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class QuitNewConnection:
    pass


Command = (OptNeg | Macro | Connect | Helo | Mail | Rcpt | Data | Header | EndOfHeaders | Body
           | EndOfMessage | Unknown | Abort | Quit | QuitNewConnection)


def _optneg(data: bytes) -> OptNeg:
    if len(data) < _U32X3.size:
        raise ProtocolError(f"option negotiation of {len(data)} bytes (12 expected)")
    return OptNeg(*_U32X3.unpack_from(data))


def _macro(data: bytes) -> Macro:
    """Name, value, name, value ... (a name without its value is dropped);
    "{name}" loses its braces. An MTA sends eight or more a message: the
    packet is decoded in one call (NUL is ASCII: the same text as pair by
    pair) and split once."""
    if not data:
        return Macro("")
    parts = data[1:].decode("utf-8", "surrogateescape").split("\0")
    if parts[-1] == "":
        parts.pop()
    pairs = zip(parts[0::2], parts[1::2], strict=False)  # a last name without a value: out
    return Macro(_STAGES[data[0]], {name[1:-1] if name[:1] == "{" and name[-1:] == "}"
                                    else name: value for name, value in pairs})


_STAGES = [chr(code) for code in range(256)]  # a macro packet's stage byte as text


def _connect(data: bytes) -> Connect:
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        return Connect(_text(host))
    family = chr(rest[0])
    if family == "U" or len(rest) < 3:
        return Connect(_text(host), family)
    (port,) = _U16.unpack_from(rest, 1)
    address = _strings(rest[3:])
    return Connect(_text(host), family, port, _text(address[0]) if address else "")


def _header(data: bytes) -> Header:
    parts = data.split(b"\0", 2)
    return Header(parts[0], parts[1] if len(parts) > 1 else b"")


def _first(data: bytes) -> str:
    parts = _strings(data)
    return _text(parts[0]) if parts else ""


def _args(data: bytes) -> tuple[str, ...]:
    return tuple(_text(p) for p in _strings(data))


# Commands without data are all alike (frozen): made once, not a packet.
_DATA, _END_OF_HEADERS, _ABORT = Data(), EndOfHeaders(), Abort()

COMMANDS = {
    ord("O"): _optneg,
    ord("D"): _macro,
    ord("C"): _connect,
    ord("H"): lambda d: Helo(_first(d)),
    ord("M"): lambda d: Mail(_args(d)),
    ord("R"): lambda d: Rcpt(_args(d)),
    ord("T"): lambda d: _DATA,
    ord("L"): _header,
    ord("N"): lambda d: _END_OF_HEADERS,
    ord("B"): Body,
    ord("E"): EndOfMessage,
    ord("U"): lambda d: Unknown(_strings(d)[0] if d else b""),
    ord("A"): lambda d: _ABORT,
    ord("Q"): lambda d: Quit(),
    ord("K"): lambda d: QuitNewConnection(),
}


_MACRO = ord("D")


class Framer:
    """Cuts a byte stream into (code, data) packets, either direction.

    A length over `max_packet` or of zero raises ProtocolError as soon as
    the four length bytes are in, before any of its data is kept; after an
    error the framer stays broken (the stream cannot be resynchronised)."""

    def __init__(self, max_packet: int = MAX_PACKET):
        self.max_packet = max_packet
        self._buffer = bytearray()
        self._error: str | None = None

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held (bounded by max_packet + 4)."""
        return len(self._buffer)

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        if self._error is not None:
            raise ProtocolError(self._error)
        held = self._buffer
        if held:  # a packet began in an earlier read: go on only once it is whole
            held += data
            if len(held) < 4:
                return []
            (length,) = _U32.unpack_from(held)
            self._check(length)
            if len(held) < 4 + length:
                return []
            data = bytes(held)
            held.clear()
        # The usual case: whole packets, sliced from the bytes as they came.
        packets: list[tuple[int, bytes]] = []
        pos, end = 0, len(data)
        limit = self.max_packet
        while end - pos >= 4:
            (length,) = _U32.unpack_from(data, pos)
            if not 0 < length <= limit:
                self._check(length)
            after = pos + 4 + length
            if after > end:
                break
            packets.append((data[pos + 4], bytes(data[pos + 5:after])))
            pos = after
        if pos < end:
            held += memoryview(data)[pos:]
        return packets

    def _check(self, length: int) -> None:
        if length < 1 or length > self.max_packet:
            self._error = (f"packet of {length} bytes "
                           f"({'empty' if length < 1 else f'over {self.max_packet}'})")
            self._buffer.clear()
            raise ProtocolError(self._error)


class Decoder:
    """MTA bytes -> commands. `feed` returns the commands completed so far."""

    def __init__(self, max_packet: int = MAX_PACKET):
        self.framer = Framer(max_packet)
        self._macro: tuple[bytes, Macro] = (b"", Macro(""))  # the latest macro packet

    def feed(self, data: bytes | memoryview) -> list[Command]:
        commands: list[Command] = []
        for code, payload in self.framer.feed(data):
            if code == _MACRO:  # Postfix repeats "D L {i}" before every header: parsed once
                raw, macro = self._macro
                if payload != raw:
                    macro = _macro(payload)
                    self._macro = (payload, macro)
                commands.append(macro)
                continue
            parse = COMMANDS.get(code)
            if parse is None:
                self.framer._error = f"unknown command {bytes((code,))!r}"
                raise ProtocolError(self.framer._error)
            commands.append(parse(payload))
        return commands


def frame(code: bytes, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) + 1, code[0]) + payload


def _cstring(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError("a milter string cannot hold a NUL byte")
    return raw + b"\0"


# -- replies: milter -> MTA ---------------------------------------------------------------


@dataclass(frozen=True)
class OptNegReply:
    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Reject:
    pass


@dataclass(frozen=True)
class Tempfail:
    pass


@dataclass(frozen=True)
class Discard:
    pass


@dataclass(frozen=True)
class Progress:
    pass


@dataclass(frozen=True)
class ReplyCode:
    text: str  # "NNN x.y.z text", '%' already doubled, lines joined with CRLF


@dataclass(frozen=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True)
class InsertHeader:
    index: int
    name: str
    value: str


@dataclass(frozen=True)
class ChangeHeader:
    index: int  # 1-based among headers of that name; an empty value deletes
    name: str
    value: str


@dataclass(frozen=True)
class Quarantine:
    reason: str


@dataclass(frozen=True)
class AddRcpt:
    rcpt: str


@dataclass(frozen=True)
class DelRcpt:
    rcpt: str


Reply = (OptNegReply | Continue | Accept | Reject | Tempfail | Discard | Progress | ReplyCode
         | AddHeader | InsertHeader | ChangeHeader | Quarantine | AddRcpt | DelRcpt)

_REPLY_ENCODERS = {
    OptNegReply: lambda r: frame(b"O", _U32X3.pack(r.version, r.actions, r.protocol)),
    Continue: lambda r: frame(b"c"),
    Accept: lambda r: frame(b"a"),
    Reject: lambda r: frame(b"r"),
    Tempfail: lambda r: frame(b"t"),
    Discard: lambda r: frame(b"d"),
    Progress: lambda r: frame(b"p"),
    ReplyCode: lambda r: frame(b"y", _cstring(r.text)),
    AddHeader: lambda r: frame(b"h", _cstring(r.name) + _cstring(r.value)),
    InsertHeader: lambda r: frame(b"i", _U32.pack(r.index) + _cstring(r.name)
                                  + _cstring(r.value)),
    ChangeHeader: lambda r: frame(b"m", _U32.pack(r.index) + _cstring(r.name)
                                  + _cstring(r.value)),
    Quarantine: lambda r: frame(b"q", _cstring(r.reason)),
    AddRcpt: lambda r: frame(b"+", _cstring(r.rcpt)),
    DelRcpt: lambda r: frame(b"-", _cstring(r.rcpt)),
}


def encode(reply: Reply) -> bytes:
    """One reply packet. A string with a NUL, or an index out of uint32,
    raises ValueError: callers sanitise first (state.py does)."""
    try:
        return _REPLY_ENCODERS[type(reply)](reply)
    except struct.error as err:
        raise ValueError(str(err)) from None


# -- commands as bytes: for tests, fuzzing and fake MTAs ------------------------------------

_COMMAND_ENCODERS = {
    OptNeg: lambda c: frame(b"O", _U32X3.pack(c.version, c.actions, c.protocol)),
    Macro: lambda c: frame(b"D", c.stage.encode("latin-1")[:1] + b"".join(
        _cstring(n if len(n) == 1 else "{" + n + "}") + _cstring(v)
        for n, v in c.macros.items())),
    Connect: lambda c: frame(b"C", _cstring(c.hostname) + c.family.encode("latin-1")[:1] + (
        b"" if c.family == "U" else _U16.pack(c.port) + _cstring(c.address))),
    Helo: lambda c: frame(b"H", _cstring(c.name)),
    Mail: lambda c: frame(b"M", b"".join(_cstring(a) for a in c.args)),
    Rcpt: lambda c: frame(b"R", b"".join(_cstring(a) for a in c.args)),
    Data: lambda c: frame(b"T"),
    Header: lambda c: frame(b"L", _cstring(c.name) + _cstring(c.value)),
    EndOfHeaders: lambda c: frame(b"N"),
    Body: lambda c: frame(b"B", c.data),
    EndOfMessage: lambda c: frame(b"E", c.data),
    Unknown: lambda c: frame(b"U", _cstring(c.command)),
    Abort: lambda c: frame(b"A"),
    Quit: lambda c: frame(b"Q"),
    QuitNewConnection: lambda c: frame(b"K"),
}


def encode_command(command: Command) -> bytes:
    """What an MTA would send: the inverse of Decoder, for tests and fake MTAs."""
    return _COMMAND_ENCODERS[type(command)](command)
