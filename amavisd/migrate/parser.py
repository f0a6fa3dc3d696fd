"""Statements of an amavisd-new configuration, parsed from its tokens.

The configuration language is Perl, of which a conf.d file uses a small
part: assignments (`$x = ...;`, `@x = (...)`, `%x = (...)`,
`$h{'k'} = ...`), lists, anonymous arrays and hashes, `qw`, `qr`, refs
(`\\%h`, `\\&ask_daemon`), a few calls (`new_RE`, `read_hash`, `push`,
`chomp`) and arithmetic for sizes (`300*1024*1024`). That part is parsed
into plain nodes; a statement outside it is kept as a `Skipped` entry
with its line and the reason, and reading goes on at the next statement,
so one odd line does not cost the rest of the file.

Bounded: nesting deeper than `MAX_DEPTH` is an error (no recursion
blow-up on `((((...`), a statement of more than `MAX_OPERATORS` binary
operators and subscripts is skipped (`1+1+...` and `$h{a}{b}...` nest to
the left, where no bracket counts, and the evaluator walks them
recursively), and every step consumes a token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amavisd.migrate.lexer import PerlSyntaxError, Token

MAX_DEPTH = 40
MAX_OPERATORS = 200  # in one statement; conf.d files use a few (300*1024*1024)


@dataclass(frozen=True)
class Node:
    kind: str  # num str istr words regex cmd var elem list array hash call ref sub undef
    #            bareword binop unop assign cond my
    value: Any = None
    children: tuple[Any, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class Statement:
    node: Node
    line: int


@dataclass(frozen=True)
class Skipped:
    line: int
    reason: str


class _Unreadable(Exception):
    """A statement outside the subset; reading resumes at the next one."""


# binary operators: precedence (higher binds tighter), right-associative?
BINARY: dict[str, tuple[int, bool]] = {
    "**": (16, True), "*": (14, False), "/": (14, False), "%": (14, False), "x": (14, False),
    "+": (13, False), "-": (13, False), ".": (13, False),
    "==": (9, False), "!=": (9, False), "eq": (9, False), "ne": (9, False),
    "&&": (7, False), "||": (6, False), "//": (6, False), "..": (5, False),
}
ASSIGN_OPS = {"=", ".=", "+=", "-=", "*=", "/=", "||=", "//=", "&&=", "**=", "|="}
LIST_OPERATORS = {"push", "unshift", "new_RE", "read_hash", "read_array", "read_text",
                  "include_config_files", "include_optional_config_files", "join", "lc", "uc",
                  "chomp", "read_l10n_templates", "read_cidr", "dkim_key", "qw"}
BLOCK_WORDS = {"if", "unless", "for", "foreach", "while", "until", "sub", "BEGIN", "END",
               "eval", "do", "package"}
SILENT_WORDS = {"use", "no", "require"}


def parse(tokens: list[Token], where: str) -> list[Statement | Skipped]:
    """The file's statements, in order."""
    return _Parser(tokens, where).program()


class _Parser:
    def __init__(self, tokens: list[Token], where: str):
        self.tokens = tokens
        self.where = where
        self.i = 0
        self.depth = 0
        self.operators = 0  # binary operators in the statement being read

    # -- token helpers ---------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def at(self, *values: str) -> bool:
        return self.tok.kind == "op" and self.tok.value in values

    def take(self) -> Token:
        tok = self.tok
        if tok.kind != "eof":
            self.i += 1
        return tok

    def expect(self, value: str) -> Token:
        if not self.at(value):
            raise _Unreadable(f"expected {value!r}, found {describe(self.tok)}")
        return self.take()

    # -- statements ---------------------------------------------------------------
    def program(self) -> list[Statement | Skipped]:
        out: list[Statement | Skipped] = []
        while self.tok.kind != "eof":
            if self.at(";"):
                self.take()
                continue
            start = self.i
            line = self.tok.line
            try:
                out.append(self.statement())
            except _Unreadable as err:
                self.i = start
                self.recover()
                out.append(Skipped(line, str(err)))
        return out

    def statement(self) -> Statement | Skipped:
        tok = self.tok
        if tok.kind == "ident" and tok.value in SILENT_WORDS:
            self.recover()
            return Skipped(tok.line, "")  # use strict; use vars qw(...): nothing to translate
        if tok.kind == "ident" and tok.value in BLOCK_WORDS and not self.peek().value == "=>":
            article = "an" if tok.value[0] in "aeiouAEIOU" else "a"
            raise _Unreadable(f"{article} {tok.value} statement (code, not a setting)")
        if self.at("{"):
            raise _Unreadable("a bare block (code, not a setting)")
        self.depth = self.operators = 0
        node = self.expression()
        if self.tok.kind == "ident" and self.tok.value in ("if", "unless", "or", "and"):
            raise _Unreadable(f"a statement with {self.tok.value!r} (a condition, not a setting)")
        if not (self.at(";") or self.tok.kind == "eof" or self.at("}")):
            raise _Unreadable(f"expected ';', found {describe(self.tok)}")
        if self.at(";"):
            self.take()
        return Statement(node, tok.line)

    def recover(self) -> None:
        """Skip to just after the next ';' outside brackets, or after a
        closing '}' of a block at the outer level (`if (...) { ... }`)."""
        depth = 0
        while self.tok.kind != "eof":
            tok = self.take()
            if tok.kind != "op":
                continue
            if tok.value in "([{":
                depth += 1
            elif tok.value in ")]}":
                depth = max(0, depth - 1)
                if tok.value == "}" and depth == 0 and self.block_ended():
                    return
            elif tok.value == ";" and depth == 0:
                return

    def block_ended(self) -> bool:
        nxt = self.tok
        if nxt.kind == "ident" and nxt.value in ("else", "elsif", "continue"):
            return False
        return not (nxt.kind == "op" and nxt.value not in ("{",) and nxt.value not in "$@%&")

    # -- expressions ----------------------------------------------------------------
    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise PerlSyntaxError(self.where, self.tok.line,
                                  f"nested deeper than {MAX_DEPTH} levels")

    def grown(self) -> None:
        """One more binary operator or subscript: each makes the tree a level
        deeper on the left, where `nested` does not count."""
        self.operators += 1
        if self.operators > MAX_OPERATORS:
            raise _Unreadable(f"more than {MAX_OPERATORS} operators or subscripts in one "
                              "statement")

    def expression(self) -> Node:
        """A comma list at statement level (`$x = 1, $y = 2` is rare but legal)."""
        first = self.assignment()
        if not self.at(",", "=>"):
            return first
        items = [first]
        while self.at(",", "=>"):
            self.take()
            if self.at(";", ")") or self.tok.kind == "eof":
                break
            items.append(self.assignment())
        return Node("list", children=tuple(items), line=first.line)

    def assignment(self) -> Node:
        self.nested()
        try:
            left = self.conditional()
            if self.tok.kind == "op" and self.tok.value in ASSIGN_OPS:
                op = self.take().value
                right = self.assignment()
                return Node("assign", op, (left, right), left.line)
            return left
        finally:
            self.depth -= 1

    def conditional(self) -> Node:
        cond = self.binary(0)
        if not self.at("?"):
            return cond
        self.take()
        yes = self.assignment()
        self.expect(":")
        no = self.assignment()
        return Node("cond", None, (cond, yes, no), cond.line)

    def binary(self, min_prec: int) -> Node:
        left = self.unary()
        while True:
            tok = self.tok
            name = tok.value if tok.kind in ("op", "ident") else None
            if name not in BINARY:
                return left
            prec, right_assoc = BINARY[name]
            if prec < min_prec:
                return left
            self.take()
            self.grown()
            self.nested()  # a**b**c... nests to the right: bounded like brackets
            try:
                right = self.binary(prec if right_assoc else prec + 1)
            finally:
                self.depth -= 1
            left = Node("binop", name, (left, right), left.line)

    def unary(self) -> Node:
        self.nested()  # every operand passes here: `2**2**...` and `!!!...` are bounded too
        try:
            tok = self.tok
            if not self.at("!", "-", "+", "\\"):
                return self.postfix(self.primary())
            self.take()
            if tok.value == "-" and self.tok.kind == "ident":  # -bareword is a string
                return Node("str", "-" + self.take().value, line=tok.line)
            operand = self.unary()
            if tok.value == "\\":
                return Node("ref", None, (operand,), tok.line)
            return Node("unop", tok.value, (operand,), tok.line)
        finally:
            self.depth -= 1

    def postfix(self, node: Node) -> Node:
        """Subscripts: `$h{k}` is an element of %h, `$r->{k}` and `$h{a}{b}` go
        through a reference (the node's value says which: "{" or "->{")."""
        while True:
            arrow = ""
            if self.at("->") and self.peek().kind == "op" and self.peek().value in ("{", "["):
                self.take()
                arrow = "->"
            elif not (self.at("{", "[") and not self.tok.spaced and node.kind in ("var", "elem")
                      and (node.kind == "elem" or node.value[0] == "$")):
                return node
            if node.kind == "elem":
                arrow = "->"  # $h{a}{b} is $h{a}->{b}
            elif node.kind != "var" or node.value[0] != "$":
                raise _Unreadable("a subscript on something other than a variable")
            self.grown()  # $h{a}{b}... nests to the left too
            opener = self.take().value
            key = self.hash_key() if opener == "{" else self.assignment()
            self.expect("}" if opener == "{" else "]")
            node = Node("elem", arrow + opener, (node, key), node.line)

    def hash_key(self) -> Node:
        tok = self.tok
        if tok.kind == "ident" and self.peek().kind == "op" and self.peek().value == "}":
            self.take()
            return Node("str", tok.value, line=tok.line)
        if self.at("-") and self.peek().kind == "ident" and self.peek(2).value == "}":
            self.take()
            return Node("str", "-" + self.take().value, line=tok.line)
        return self.expression()

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind in ("num", "str", "istr", "words", "regex", "cmd"):
            self.take()
            return Node(tok.kind, tok.value, line=tok.line)
        if tok.kind == "var":
            self.take()
            return Node("var", tok.value, line=tok.line)
        if self.at("(", "[", "{"):
            return self.bracketed()
        if tok.kind == "ident":
            return self.word()
        raise _Unreadable(f"unexpected {describe(tok)}")

    def bracketed(self) -> Node:
        opener = self.take()
        close = {"(": ")", "[": "]", "{": "}"}[opener.value]
        self.nested()
        try:
            items: list[Node] = []
            while not self.at(close):
                if self.tok.kind == "eof":
                    raise _Unreadable(f"unclosed {opener.value!r} from line {opener.line}")
                if self.tok.kind == "ident" and self.peek().kind == "op" \
                        and self.peek().value == "=>":
                    word = self.take()  # a bareword before => is a string
                    items.append(Node("str", word.value, line=word.line))
                else:
                    items.append(self.assignment())
                if not self.at(",", "=>"):
                    break
                while self.at(",", "=>"):
                    self.take()
            self.expect(close)
        finally:
            self.depth -= 1
        kind = {"(": "list", "[": "array", "{": "hash"}[opener.value]
        return Node(kind, None, tuple(items), opener.line)

    def word(self) -> Node:
        tok = self.take()
        name = tok.value
        if name == "undef":
            if self.at("(") and self.peek().kind == "op" and self.peek().value == ")":
                self.take()
                self.take()
            return Node("undef", line=tok.line)
        if name == "sub" and self.at("{"):
            self.skip_block()
            return Node("sub", None, line=tok.line)
        if name in ("my", "our", "local"):
            if self.tok.kind != "var":
                raise _Unreadable(f"{name} with a list of variables")
            var = self.take()
            return Node("my", name, (Node("var", var.value, line=var.line),), tok.line)
        if self.at("=>"):
            return Node("str", name, line=tok.line)
        if self.at("("):
            args = self.bracketed()
            return Node("call", name, args.children, tok.line)
        if name in LIST_OPERATORS and self.starts_term():
            items = [self.assignment()]
            while self.at(","):
                self.take()
                items.append(self.assignment())
            return Node("call", name, tuple(items), tok.line)
        if name in BLOCK_WORDS or name in ("if", "unless", "or", "and", "not", "else"):
            raise _Unreadable(f"{name!r} (code, not a setting)")
        return Node("bareword", name, line=tok.line)

    def starts_term(self) -> bool:
        tok = self.tok
        if tok.kind in ("num", "str", "istr", "words", "regex", "cmd", "var", "ident"):
            return True
        return tok.kind == "op" and tok.value in ("\\", "[", "{", "-")

    def skip_block(self) -> None:
        """Skip `{ ... }` of an anonymous sub: code is never read."""
        depth = 0
        while self.tok.kind != "eof":
            tok = self.take()
            if tok.kind == "op" and tok.value in "([{":
                depth += 1
            elif tok.kind == "op" and tok.value in ")]}":
                depth -= 1
                if depth == 0:
                    return
        raise _Unreadable("unclosed sub { ... }")


def describe(tok: Token) -> str:
    if tok.kind == "eof":
        return "the end of the file"
    if tok.kind == "var":
        return f"{tok.value[0]}{tok.value[1]}"
    text = str(tok.value if not isinstance(tok.value, tuple) else tok.value[0])
    return f"{tok.kind} {text[:40]!r}" if tok.kind != "op" else repr(text)
