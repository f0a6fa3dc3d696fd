"""Tokens of an amavisd-new Perl configuration file, read as hostile text.

A site's `conf.d` file may hold anything, so this reads only the Perl a
configuration is made of (variables, numbers, the quoting operators, the
punctuation of lists, hashes and assignments) and says where it stopped
for anything else. It never evaluates and never runs a thing: backticks and
`qx` become a token holding the command's text, nothing more.

Bounded: the text is at most `MAX_FILE_CHARS`, every loop advances, and the
token count is capped, so a hostile file costs time linear in its size. An
error is a `PerlSyntaxError` naming file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_FILE_CHARS = 1 << 20  # conf.d files are a few KiB; Debian's largest is 25 KiB
MAX_TOKENS = 100_000


class PerlSyntaxError(ValueError):
    """What could not be read, with the file and line."""

    def __init__(self, where: str, line: int, message: str):
        super().__init__(f"{where}:{line}: {message}")
        self.where = where
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Token:
    kind: str  # var num str istr words regex cmd ident op eof
    value: Any
    line: int
    spaced: bool = False  # whitespace before it (`$h {k}` is rare; `$h{k}` a subscript)


IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*")
NUMBER = re.compile(
    r"0[xX][0-9a-fA-F_]+|0[bB][01_]+|"
    r"(?:[0-9][0-9_]*(?:\.(?!\.)[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?")
OPERATORS = ("||=", "//=", "&&=", "**=", "<=>", "...",
             "=>", "->", "..", "||", "&&", "//", "==", "!=", "<=", ">=", ".=", "+=", "-=",
             "*=", "/=", "=~", "!~", "**", "|=", "<<", ">>", "++", "--",
             "=", ",", ";", "(", ")", "[", "]", "{", "}", ".", "+", "-", "*", "/", "%",
             "\\", "?", ":", "!", "<", ">", "&", "|", "^", "~")
QUOTE_WORDS = {"q", "qq", "qw", "qr", "qx", "m", "s", "tr", "y"}
PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
# after these a term (not an operator) comes next: `%` and `&` are sigils there
TERM_AFTER = {None, "op", "ident"}
DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
WORD_START = LETTERS + "_"  # Perl's identifiers here are ASCII: never str.isalpha()
DIGITS_SET, LETTERS_SET, WORD_START_SET = set(DIGITS), set(LETTERS), set(WORD_START)
REGEX_FLAGS = re.compile(r"[msixpodualngcer]*")


def tokenize(text: str, where: str) -> list[Token]:
    """The tokens of one file, ending with an `eof` token."""
    if len(text) > MAX_FILE_CHARS:
        raise PerlSyntaxError(where, 1, f"file longer than {MAX_FILE_CHARS} characters")
    return _Lexer(text, where).run()


class _Lexer:
    def __init__(self, text: str, where: str):
        self.text = text
        self.where = where
        self.pos = 0
        self.line = 1
        self.tokens: list[Token] = []

    def fail(self, message: str, line: int | None = None) -> PerlSyntaxError:
        return PerlSyntaxError(self.where, line or self.line, message)

    def add(self, kind: str, value: Any, line: int, spaced: bool) -> None:
        if len(self.tokens) >= MAX_TOKENS:
            raise self.fail(f"more than {MAX_TOKENS} tokens")
        self.tokens.append(Token(kind, value, line, spaced))

    def term_expected(self) -> bool:
        if not self.tokens:
            return True
        last = self.tokens[-1]
        if last.kind == "op":
            return last.value not in (")", "]", "}")
        return last.kind == "ident"

    def run(self) -> list[Token]:
        text = self.text
        while True:
            spaced = self.skip_space()
            if self.pos >= len(text):
                break
            ch = text[self.pos]
            line = self.line
            if ch in "$@%&" and self.sigil(ch, spaced):
                continue
            if ch in DIGITS or (ch == "." and text[self.pos + 1:self.pos + 2] in DIGITS_SET):
                self.number(line, spaced)
            elif ch == "'" or ch == '"' or ch == "`":
                self.pos += 1
                raw = self.delimited(ch, line)
                kind = {"'": "str", '"': "istr", "`": "cmd"}[ch]
                self.add(kind, unquote_single(raw, ch) if ch == "'" else raw, line, spaced)
            elif ch in WORD_START:
                if self.word(line, spaced):
                    break  # __END__
            elif ch == "<" and self.term_expected() and text.startswith("<<", self.pos):
                raise self.fail("here-documents (<<) are not read")
            elif ch == "<" and self.term_expected():
                raise self.fail("<FILEHANDLE> reads are not read")
            else:
                for op in OPERATORS:
                    if text.startswith(op, self.pos):
                        self.pos += len(op)
                        self.add("op", op, line, spaced)
                        break
                else:
                    raise self.fail(f"unexpected character {ch!r}")
        self.add("eof", None, self.line, True)
        return self.tokens

    def skip_space(self) -> bool:
        """Whitespace, comments and POD; True if any was skipped."""
        text, start = self.text, self.pos
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "\n":
                self.line += 1
                self.pos += 1
                if text.startswith("=", self.pos) and text[self.pos + 1:self.pos + 2] in LETTERS_SET:
                    self.pod()
            elif ch in " \t\r\f\v":
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif self.pos == 0 and ch == "=" and text[1:2] in LETTERS_SET:
                self.pod()
            else:
                break
        return self.pos > start

    def pod(self) -> None:
        """Skip a POD block: from a line starting with =word to the line after =cut."""
        match = re.compile(r"^=cut\b.*$", re.M).search(self.text, self.pos)
        end = len(self.text) if match is None else match.end()
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def sigil(self, ch: str, spaced: bool) -> bool:
        """A variable ($x @x %x &x ${x}); False if `%`/`&` is an operator here."""
        text, line = self.text, self.line
        nxt = text[self.pos + 1:self.pos + 2]
        if ch in "%&" and not (self.term_expected() and nxt and nxt in WORD_START + ":{$"):
            return False
        self.pos += 1
        if nxt == "{":
            match = re.compile(r"\{\s*(" + IDENT.pattern + r")\s*\}").match(text, self.pos)
            if not match:
                raise self.fail(f"{ch}{{...}} dereference blocks are not read")
            self.pos = match.end()
            self.add("var", (ch, match.group(1)), line, spaced)
            return True
        if nxt == "#":
            raise self.fail("$#array is not read")
        if nxt in ("$", "@", "%", "&") and ch == "$" and \
                text[self.pos + 1:self.pos + 2] in WORD_START_SET:
            raise self.fail("references used as $$name are not read")
        match = IDENT.match(text, self.pos)
        if match is None and text.startswith("::", self.pos):
            match = re.compile(r"::" + IDENT.pattern).match(text, self.pos)
        if match is not None:
            self.pos = match.end()
            self.add("var", (ch, match.group(0).removeprefix("main::").lstrip(":")),
                     line, spaced)
            return True
        if ch == "$" and nxt and nxt in DIGITS + "_&`'+!@/\\,;.":
            self.pos += 1  # $_, $1, $!, ...: Perl's own variables
            self.add("var", (ch, nxt), line, spaced)
            return True
        raise self.fail(f"a {ch!r} that is not a variable")

    def number(self, line: int, spaced: bool) -> None:
        match = NUMBER.match(self.text, self.pos)
        assert match is not None  # the caller saw a digit, or a dot and a digit
        raw = match.group(0)
        self.pos = match.end()
        clean = raw.replace("_", "")
        try:
            if clean[:2] in ("0x", "0X"):
                value: int | float = int(clean[2:] or "x", 16)
            elif clean[:2] in ("0b", "0B"):
                value = int(clean[2:] or "x", 2)
            elif len(clean) > 1 and clean[0] == "0" and clean.isdigit():
                value = int(clean, 8)
            elif clean.isdigit():
                value = int(clean)
            else:
                value = float(clean)
        except ValueError:
            raise self.fail(f"bad number {raw!r}") from None
        if isinstance(value, int) and value.bit_length() > 64:
            raise self.fail(f"number {raw[:30]!r} is out of range")
        self.add("num", value, line, spaced)

    def word(self, line: int, spaced: bool) -> bool:
        """A bareword, or a quote-like operator (q qq qw qr qx); True at __END__."""
        match = IDENT.match(self.text, self.pos)
        assert match is not None
        name = match.group(0)
        self.pos = match.end()
        if name in ("__END__", "__DATA__"):
            return True
        if name in QUOTE_WORDS and self.quote_like(name, line, spaced):
            return False
        self.add("ident", name, line, spaced)
        return False

    def quote_like(self, name: str, line: int, spaced: bool) -> bool:
        """q{..}, qw(..), qr'..'i and friends; False when the word is a plain
        bareword (`q => 1`, a hash key)."""
        text = self.text
        after = self.pos
        while after < len(text) and text[after] in " \t\r\n":
            after += 1
        if after >= len(text) or text.startswith("=>", after) or text[after] in ",;)}":
            return False
        delim = text[after]
        if delim in WORD_START or delim in DIGITS or (delim == "#" and after != self.pos):
            return False
        if name in ("m", "s", "tr", "y"):
            raise self.fail(f"the {name}// operator is not read")
        self.line += text.count("\n", self.pos, after)
        self.pos = after + 1
        raw = self.delimited(delim, line)
        if name == "q":
            self.add("str", unquote_single(raw, delim), line, spaced)
        elif name == "qq":
            self.add("istr", raw, line, spaced)
        elif name == "qx":
            self.add("cmd", raw, line, spaced)
        elif name == "qw":
            self.add("words", unquote_single(raw, delim).split(), line, spaced)
        else:
            flags = REGEX_FLAGS.match(text, self.pos)
            assert flags is not None
            self.pos = flags.end()
            self.add("regex", (raw, flags.group(0), delim != "'"), line, spaced)
        return True

    def delimited(self, open_char: str, line: int) -> str:
        """The text up to the closing delimiter (nested for brackets), raw."""
        text = self.text
        close = PAIRS.get(open_char, open_char)
        depth = 0
        start = self.pos
        pos = self.pos
        while pos < len(text):
            ch = text[pos]
            if ch == "\\":
                pos += 2
                continue
            if ch == close and depth == 0:
                raw = text[start:pos]
                self.line += raw.count("\n")
                self.pos = pos + 1
                return raw
            if ch == close:
                depth -= 1
            elif ch == open_char and close != open_char:
                depth += 1
            pos += 1
        raise self.fail(f"unterminated string or quote starting with {open_char!r}", line)


def unquote_single(raw: str, delim: str) -> str:
    """A '...' or q(...) string: only \\\\ and an escaped delimiter are escapes."""
    close = PAIRS.get(delim, delim)
    out: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in ("\\", delim, close):
            out.append(raw[i + 1])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)
