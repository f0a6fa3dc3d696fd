"""AM.PDP wire codec, sans I/O (amavisd-new's README.protocol).

A request or a reply is a block of `name=value` lines ending in CR LF, closed
by an empty line. Names and values are %XX-encoded; a value may hold several
fields separated by one *unencoded* space, so the raw bytes are kept until a
caller says how many fields it expects. Attributes may repeat (recipient).

This module is shared by the daemon and the stdlib-only client (and the
milter shim), so it imports nothing beyond the standard library (not even
`re`: start-up time) and never touches a socket.
Hostile input (bad escapes, NULs, endless lines) must never raise: the
decoder records an error on the block instead and keeps its framing.
"""

from __future__ import annotations

from _collections_abc import Iterable, Sequence  # frozen, already loaded: no start-up cost

CRLF = b"\r\n"
MAX_LINE = 64 * 1024  # longer lines are dropped and reported (README.protocol allows it)
MAX_ATTRIBUTES = 20_000  # recipients included; far above any MTA's recipient limit
MAX_ERRORS = 8  # error texts kept a block; the rest are only counted (bounded memory)

_HEX = frozenset(b"0123456789abcdefABCDEF")
# Bytes a value field may carry unencoded: printable ASCII except space and %.
_VALUE_SAFE = frozenset(range(0x21, 0x7F)) - {0x25}
_NAME_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _table(safe: frozenset[int]) -> tuple[bytes, ...]:
    """Each byte's spelling in a field: itself, or %XX."""
    return tuple(bytes((c,)) if c in safe else b"%%%02X" % c for c in range(256))


_VALUE_TABLE, _NAME_TABLE = _table(_VALUE_SAFE), _table(_NAME_SAFE)
_VALUE_SAFE_BYTES, _NAME_SAFE_BYTES = bytes(sorted(_VALUE_SAFE)), bytes(sorted(_NAME_SAFE))


def _encode(data: bytes, table: tuple[bytes, ...], safe_bytes: bytes) -> bytes:
    if not data.translate(None, safe_bytes):  # nothing to escape: the usual case, in C
        return data
    return b"".join(map(table.__getitem__, data))


def encode_name(name: str) -> bytes:
    return _encode(name.encode("utf-8", "surrogateescape"), _NAME_TABLE, _NAME_SAFE_BYTES)


def encode_field(field: str) -> bytes:
    return _encode(field.encode("utf-8", "surrogateescape"), _VALUE_TABLE, _VALUE_SAFE_BYTES)


def decode_bytes(raw: bytes) -> bytes:
    """%XX -> byte; a `%` not followed by two hex digits stays as it is."""
    if b"%" not in raw:
        return raw
    pieces = raw.split(b"%")
    out = bytearray(pieces[0])
    for piece in pieces[1:]:
        if len(piece) >= 2 and piece[0] in _HEX and piece[1] in _HEX:
            out.append(int(piece[:2], 16))
            out += piece[2:]
        else:
            out += b"%" + piece
    return bytes(out)


def decode(raw: bytes) -> str:
    return decode_bytes(raw).decode("utf-8", "surrogateescape")


class Block:
    """One request or reply: ordered (name, raw value) pairs plus framing errors.

    Only the first MAX_ERRORS error texts are kept, the rest counted in
    `more_errors`: a client sending megabytes of bad lines must not make the
    daemon hold one string per line."""

    __slots__ = ("pairs", "errors", "more_errors")

    def __init__(self, pairs: list[tuple[str, bytes]] | None = None,
                 errors: list[str] | None = None):
        self.pairs = pairs if pairs is not None else []
        self.errors = errors if errors is not None else []
        self.more_errors = 0

    def add_error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)
        else:
            self.more_errors += 1

    @property
    def error_count(self) -> int:
        return len(self.errors) + self.more_errors

    @property
    def first_name(self) -> str | None:
        return self.pairs[0][0] if self.pairs else None

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, raw in self.pairs:
            if key == name:
                return decode(raw)
        return default

    def getall(self, name: str) -> list[str]:
        return [decode(raw) for key, raw in self.pairs if key == name]

    def fields(self, name: str, count: int) -> list[list[str]]:
        """Every `name` value split into at most `count` fields on unencoded spaces."""
        out = []
        for key, raw in self.pairs:
            if key == name:
                out.append([decode(part) for part in raw.split(b" ", count - 1)])
        return out

    def as_dict(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for key, raw in self.pairs:
            result.setdefault(key, []).append(decode(raw))
        return result

    def __repr__(self) -> str:
        return f"Block({[(k, decode(v)) for k, v in self.pairs]!r}, errors={self.errors!r})"


Value = str | Sequence[str]


def encode_block(attrs: Iterable[tuple[str, Value]]) -> bytes:
    """Serialise attributes; a sequence value becomes space-separated fields."""
    out = bytearray()
    for name, value in attrs:
        fields = [value] if isinstance(value, str) else list(value)
        out += encode_name(name) + b"=" + b" ".join(encode_field(f) for f in fields) + CRLF
    out += CRLF
    return bytes(out)


class Decoder:
    """Incremental parser: `feed(bytes)` returns the blocks completed so far.

    Accepts CR LF (the protocol) and bare LF (telnet, sloppy clients). A line
    over `max_line` bytes is discarded up to its end and noted in the block's
    errors, so one hostile line cannot exhaust memory or desynchronise us.
    """

    def __init__(self, max_line: int = MAX_LINE, max_attributes: int = MAX_ATTRIBUTES):
        self.max_line = max_line
        self.max_attributes = max_attributes
        self._buffer = bytearray()
        self._skipping = False  # inside an over-long line
        self._block = Block()

    @property
    def pending(self) -> bool:
        """True when a block has started but is not complete."""
        return bool(self._buffer or self._skipping or self._block.pairs or self._block.errors)

    def feed(self, data: bytes) -> list[Block]:
        self._buffer += data
        blocks: list[Block] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    if not self._skipping:
                        self._block.add_error(f"line longer than {self.max_line} bytes")
                    self._skipping = True
                    del self._buffer[:]
                return blocks
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:  # the tail of an over-long line
                self._skipping = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                self._block.add_error(f"line longer than {self.max_line} bytes")
                continue
            if not line:
                if self._block.pairs or self._block.errors:
                    blocks.append(self._block)
                    self._block = Block()
                continue
            self._add_line(line)

    def _add_line(self, line: bytes) -> None:
        block = self._block
        name_raw, sep, value_raw = line.partition(b"=")
        if not sep:
            block.add_error(f"malformed line (no '='): {line[:60]!r}")
            return
        name = decode(name_raw)
        if not name:  # encoded specials are legal in names; only we never look them up
            block.add_error("empty attribute name")
            return
        if len(block.pairs) >= self.max_attributes:
            if not any(text.startswith("too many attributes") for text in block.errors):
                block.add_error(f"too many attributes (> {self.max_attributes})")
            return
        block.pairs.append((name, value_raw))


def decode_blocks(data: bytes) -> list[Block]:
    """Convenience for tests and one-shot use."""
    return Decoder().feed(data)
