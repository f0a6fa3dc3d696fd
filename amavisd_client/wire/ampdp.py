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

import io  # loaded at start-up anyway
from _collections_abc import Iterable, Sequence  # frozen, already loaded: no start-up cost

CRLF = b"\r\n"
MAX_LINE = 64 * 1024  # longer lines are dropped and reported (README.protocol allows it)
MAX_ATTRIBUTES = 20_000  # recipients included; far above any MTA's recipient limit
MAX_ERRORS = 8  # error texts kept a block; the rest are only counted (bounded memory)

_HEX = frozenset(b"0123456789abcdefABCDEF")
_PERCENT = ord("%")  # as an int: `_PERCENT in raw` is a memchr, `b"%" in raw` 7 times slower
# Bytes a value field may carry unencoded: printable ASCII except space and %.
_VALUE_SAFE = frozenset(range(0x21, 0x7F)) - {0x25}
_NAME_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _table(safe: frozenset[int]) -> tuple[bytes, ...]:
    """Each byte's spelling in a field: itself, or %XX."""
    return tuple(bytes((c,)) if c in safe else b"%%%02X" % c for c in range(256))


_VALUE_TABLE, _NAME_TABLE = _table(_VALUE_SAFE), _table(_NAME_SAFE)
_VALUE_SAFE_BYTES, _NAME_SAFE_BYTES = bytes(sorted(_VALUE_SAFE)), bytes(sorted(_NAME_SAFE))


# Each field is encoded in one frame: nothing to escape, the usual case, is
# found by a translate in C; only then is the text escaped a byte at a time.
def encode_name(name: str) -> bytes:
    data = name.encode("utf-8", "surrogateescape")
    if not data.translate(None, _NAME_SAFE_BYTES):
        return data
    return b"".join(map(_NAME_TABLE.__getitem__, data))


def encode_field(field: str) -> bytes:
    data = field.encode("utf-8", "surrogateescape")
    if not data.translate(None, _VALUE_SAFE_BYTES):
        return data
    return b"".join(map(_VALUE_TABLE.__getitem__, data))


def decode_bytes(raw: bytes) -> bytes:
    """%XX -> byte; a `%` not followed by two hex digits stays as it is."""
    if _PERCENT not in raw:
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
    if _PERCENT in raw:
        raw = decode_bytes(raw)
    return raw.decode("utf-8", "surrogateescape")


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

    def firsts(self) -> dict[str, str]:
        """Each name's first value, decoded: `get` for a reader that asks
        for many names (one pass over the pairs, not one a name)."""
        return {name: decode(raw) for name, raw in dict(reversed(self.pairs)).items()}

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
        fields = (encode_field(value) if isinstance(value, str)
                  else b" ".join(map(encode_field, value)))
        out += encode_name(name) + b"=" + fields + CRLF
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
        buffer = self._buffer
        buffer += data
        blocks: list[Block] = []
        end = buffer.rfind(b"\n") + 1
        if end:  # every complete line at once, one at a time; the rest waits for its end
            lines = io.BytesIO(bytes(buffer[:end]))  # (a list of them: 20x the bytes at worst)
            del buffer[:end]
            if self._skipping:  # the first is the tail of an over-long line
                self._skipping = False
                lines.readline()
            max_line, max_attributes = self.max_line, self.max_attributes
            block = self._block
            for line in lines:
                line = line[:-1]  # its LF
                if line[-1:] == b"\r":
                    line = line[:-1]
                name, sep, value = line.partition(b"=")
                if (sep and name and _PERCENT not in name and len(line) <= max_line
                        and len(block.pairs) < max_attributes):
                    # the usual line, taken as _add_line would, without the call
                    block.pairs.append((name.decode("utf-8", "surrogateescape"), value))
                elif len(line) > max_line:
                    block.add_error(f"line longer than {max_line} bytes")
                elif not line:
                    if block.pairs or block.errors:
                        blocks.append(block)
                        block = self._block = Block()
                else:
                    self._add_line(line)
        if len(buffer) > self.max_line:
            if not self._skipping:
                self._block.add_error(f"line longer than {self.max_line} bytes")
            self._skipping = True
            del buffer[:]
        return blocks

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
