"""Perl's strings as a configuration builds them: "..." interpolation, qr//
interpolation, the `.` operator, and backticks (read, never run).

Every result is bounded by `MAX_CHARS` as it is built (a string that names
a 64 KiB variable ten thousand times stops growing at the limit, it is not
built first), so a hostile file cannot make a large value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from amavisd.migrate.sources import read_data_file
from amavisd.migrate.values import MAX_CHARS, Unknown, bounded, first_unknown, perl_str

INTERPOLATED = re.compile(
    r"\$(?:\{\s*([A-Za-z_]\w*)\s*\}|([A-Za-z_]\w*(?:::\w+)*))|@([A-Za-z_]\w*)", re.ASCII)
HEX_ESCAPE = re.compile(r"x\{([0-9a-fA-F]{1,6})\}|x([0-9a-fA-F]{0,2})")
OCTAL_ESCAPE = re.compile(r"[0-7]{1,3}")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "b": "\b", "a": "\a", "e": "\x1b",
           "0": "\0"}
TOO_LONG = Unknown(f"a string longer than {MAX_CHARS} characters")

Lookup = Callable[[str, str], Any]  # (sigil, name) -> the variable's value


class _Builder:
    """Pieces of a string, refused as soon as they pass MAX_CHARS."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.size = 0

    def add(self, piece: str) -> bool:
        self.size += len(piece)
        self.pieces.append(piece)
        return self.size <= MAX_CHARS

    def text(self) -> str:
        return "".join(self.pieces)


def interpolate(raw: str, lookup: Lookup, arrays: dict[str, list[Any]]) -> Any:
    """A "..." string: escapes, then $scalar, ${scalar}, @array."""
    return _interpolate(raw, lookup, arrays, _string_escape)


def interpolate_regex(raw: str, lookup: Lookup, arrays: dict[str, list[Any]]) -> Any:
    """qr/.../ with variables in it: only $name, ${name} and @name are
    replaced; the regex's own escapes stay as they are."""
    return _interpolate(raw, lookup, arrays, _regex_escape)


def _interpolate(raw: str, lookup: Lookup, arrays: dict[str, list[Any]],
                 escape: Callable[[str, int], tuple[str | Unknown, int]]) -> Any:
    """The one scan both kinds share: `escape` reads a backslash sequence."""
    out = _Builder()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            piece, i = escape(raw, i)
        elif ch in "$@" and (match := INTERPOLATED.match(raw, i)):
            piece = _variable(match, lookup, arrays)
            i = match.end()
        else:
            piece, i = ch, i + 1
        if isinstance(piece, Unknown):
            return piece
        if not out.add(piece):
            return TOO_LONG
    return out.text()


def _string_escape(raw: str, i: int) -> tuple[str | Unknown, int]:
    """A "..." string's escape; a lone backslash at the end is itself."""
    return _escape(raw, i) if i + 1 < len(raw) else ("\\", i + 1)


def _regex_escape(raw: str, i: int) -> tuple[str | Unknown, int]:
    """A regex keeps its escapes, backslash and all."""
    return raw[i:i + 2], i + 2


def _escape(raw: str, i: int) -> tuple[str | Unknown, int]:
    nxt = raw[i + 1]
    if nxt in "lLuUEQ":
        return Unknown(f"the \\{nxt} case escape"), i
    if nxt == "x":
        match = HEX_ESCAPE.match(raw, i + 1)
        assert match is not None  # the second branch matches "x" alone
        code = int(match.group(1) or match.group(2) or "0", 16)
        valid = code < 0x110000 and not 0xD800 <= code < 0xE000
        return (chr(code) if valid else "\ufffd"), match.end()
    if nxt in "1234567" or (nxt == "0" and raw[i + 2:i + 3] in set("01234567")):
        match = OCTAL_ESCAPE.match(raw, i + 1)
        assert match is not None
        return chr(int(match.group(0), 8)), match.end()
    return ESCAPES.get(nxt, nxt), i + 2


def _variable(match: re.Match[str], lookup: Lookup,
              arrays: dict[str, list[Any]]) -> str | Unknown:
    scalar = match.group(1) or match.group(2)
    if scalar:
        return perl_str(lookup("$", scalar))
    name = match.group(3)
    if name not in arrays:
        return Unknown(f"@{name} in a string (an address written with an unescaped @?)")
    out = _Builder()
    for n, value in enumerate(arrays[name]):
        text = perl_str(value)
        if isinstance(text, Unknown):
            return text
        if not out.add((" " if n else "") + text):
            return TOO_LONG
    return out.text()


def concat(left: Any, right: Any) -> Any:
    a, b = perl_str(left), perl_str(right)
    unknown = first_unknown(a, b)
    return unknown if unknown else bounded(a + b)  # each side is already bounded


def command(text: str) -> Any:
    """Debian's `head -n 1 /etc/mailname` reads a file: the file is read;
    nothing a shell would run is ever run."""
    words = text.split()
    path = ""
    if (len(words) == 4 and words[:3] == ["head", "-n", "1"]) or \
            (len(words) == 3 and words[:2] == ["head", "-1"]):
        path = words[-1]
    if path.startswith("/") and re.fullmatch(r"[\w./+-]+", path, re.ASCII):
        content = read_data_file(path)
        if content is None:
            return Unknown(f"`{text}`: {path} cannot be read here", text)
        return content.split("\n", 1)[0] + ("\n" if "\n" in content else "")
    return Unknown(f"the output of `{text}`, a command import-config does not run", text)
