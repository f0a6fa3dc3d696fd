"""Reading an amavisd-new configuration into variables, without running Perl.

`Reader` walks the files in amavisd-new's order and applies each parsed
assignment to its own variables (scalars, arrays, hashes), as Perl would for
the subset `parser.py` reads: strings with interpolation of earlier
variables (`"$MYHOME/tmp"`), lists flattened, hashes from pairs, refs kept
as refs (`\\%bypass_virus_checks` is read when translated, as Perl's ref
sees later changes), `new_RE(...)`, `read_hash(FILE)`. It never executes:
a backtick is the text of a command (only Debian's `head -n 1 FILE` idiom
is read, as the file it reads), a sub is `Code`, any other call `Unknown`.

It records where each variable was last set (file:line) and what it read
but could not use, for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from amavisd.migrate.builtins import call
from amavisd.migrate.lexer import PerlSyntaxError, tokenize
from amavisd.migrate.parser import Node, Skipped, parse
from amavisd.migrate.sources import MAX_FILES, SourceError, config_files, read_config_text
from amavisd.migrate.strings import command, concat, interpolate, interpolate_regex
from amavisd.migrate.values import (
    MAX_ITEMS,
    ArrayRef,
    Bareword,
    Code,
    HashRef,
    Regex,
    Unknown,
    VarRef,
    arithmetic,
    first_unknown,
    perl_num,
    perl_str,
    truthy,
)

# What amavisd-new itself sets before reading the configuration, where a
# configuration interpolates it ("Debian $myproduct_name at $mydomain").
BUILT_IN: dict[str, Any] = {
    "MYHOME": "/var/amavis",
    "myproduct_name": "amavis",
    "myversion_id": "2.13.0",
    "myversion_date": "20230106",
    "myversion": "amavis-2.13.0 (20230106)",
}
MAX_INCLUDE_DEPTH = 5
TOO_LONG = Unknown(f"a list of more than {MAX_ITEMS} items")


@dataclass
class Unread:
    where: str
    what: str
    reason: str


@dataclass
class Variables:
    scalars: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, list[Any]] = field(default_factory=dict)
    hashes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "$x" / "@x" / "%x" -> where it was set, in order (the last one is in effect)
    assigned: dict[str, list[str]] = field(default_factory=dict)
    # ("%policy_bank", "NAME") -> where that element was last set
    elements: dict[tuple[str, str], str] = field(default_factory=dict)
    private: set[str] = field(default_factory=set)  # my/our: the file's own helpers
    built_in_used: dict[str, str] = field(default_factory=dict)  # name -> first use

    def deref(self, ref: VarRef) -> Any:
        if ref.sigil == "$":
            return self.scalars.get(ref.name)
        if ref.sigil == "@":
            return self.arrays.get(ref.name, [])
        return self.hashes.get(ref.name, {})

    def where(self, key: str) -> str:
        return self.assigned.get(key, ["?"])[-1]


class Reader:
    """Reads files into `variables`; `unread` lists what it left out, and why."""

    def __init__(self, defines: dict[str, str] | None = None):
        self.vars = Variables()
        self.defines = dict(defines or {})
        self.vars.scalars.update(self.defines)
        self.unread: list[Unread] = []
        self.files: list[str] = []
        self.skipped_files: list[str] = []
        self.include_depth = 0
        self.here = "?"

    # -- files ----------------------------------------------------------------------
    def read_path(self, path: str, optional: bool = False) -> None:
        try:
            files, skipped = config_files(path)
        except SourceError:
            if optional:
                return
            raise
        self.skipped_files += skipped
        for name in files:
            self.read_file(name)

    def read_file(self, path: str) -> None:
        if len(self.files) >= MAX_FILES:
            raise PerlSyntaxError(path, 1, f"more than {MAX_FILES} configuration files")
        self.files.append(path)
        for item in parse(tokenize(read_config_text(path), path), path):
            self.here = f"{path}:{item.line}"
            if isinstance(item, Skipped):
                if item.reason:
                    self.unread.append(Unread(self.here, "a statement", item.reason))
                continue
            try:
                self.statement(item.node)
            except _AssignError as err:
                self.note("a statement", str(err))

    def include(self, args: list[Any], optional: bool) -> None:
        if self.include_depth >= MAX_INCLUDE_DEPTH:
            self.note("include_config_files", f"nested deeper than {MAX_INCLUDE_DEPTH}")
            return
        here = self.here
        self.include_depth += 1
        try:
            for arg in args:
                if isinstance(arg, str) and arg.startswith("/"):
                    self.read_path(arg, optional)
                elif not optional:
                    self.note("include_config_files", f"a file name that is not an absolute "
                              f"path ({arg!r})")
        except SourceError as err:
            self.unread.append(Unread(here, "include_config_files", str(err)))
        finally:
            self.include_depth -= 1
            self.here = here

    def at(self, line: int) -> str:
        """file:line for a line of the file being read."""
        return f"{self.here.rpartition(':')[0]}:{line}"

    def note(self, what: str, reason: str) -> None:
        self.unread.append(Unread(self.here, what, reason))

    # -- statements -----------------------------------------------------------------
    def statement(self, node: Node) -> None:
        if node.kind in ("assign", "my"):
            self.scalar(node)
        elif node.kind == "call":
            result = self.scalar(node)
            if isinstance(result, Unknown) and node.value not in ("push", "unshift", "chomp"):
                self.note(f"{node.value}(...)", result.reason)
        elif node.kind == "list":
            for child in node.children:
                self.statement(child)
        elif node.kind in ("num", "str", "undef"):
            pass  # `1;`: the file's return value
        else:
            self.note("a statement", "an expression that sets nothing")

    # -- assignment -------------------------------------------------------------------
    def assign(self, target: Node, op: str, source: Node) -> Any:
        if target.kind == "my":
            var = target.children[0]
            self.vars.private.add(var.value[0] + var.value[1])
            target = var
        if target.kind == "var":
            sigil, name = target.value
            key = sigil + name
            if sigil == "$":
                value = self.combine(op, self.vars.scalars.get(name), self.scalar(source))
                if name in self.defines:
                    value = self.defines[name]  # --define wins over the files
                self.vars.scalars[name] = value
            elif sigil == "@":
                value = self.listval(source) if op == "=" else Unknown(f"{op} on an array")
                self.vars.arrays[name] = value if isinstance(value, list) else [value]
            elif sigil == "%":
                value = self.pairs(self.listval(source)) if op == "=" else Unknown(f"{op} on a hash")
                self.vars.hashes[name] = value if isinstance(value, dict) else {}
            else:
                raise_unreadable(f"assignment to {key}")
            self.vars.assigned.setdefault(key, []).append(self.here)
            return value
        if target.kind == "elem":
            container, key = self.container(target)
            if isinstance(container, Unknown):
                self.note(describe_target(target), container.reason)
                return container
            value = self.combine(op, container.get(key), self.scalar(source))
            if len(container) >= MAX_ITEMS and key not in container:
                return Unknown("a hash with too many keys")
            container[key] = value
            return value
        raise_unreadable("an assignment to something other than a variable or an element")
        return None

    def container(self, node: Node) -> tuple[Any, str]:
        """The dict (or list) an element assignment writes into, and its key;
        hashes and anonymous hashes spring into being as Perl's do."""
        opener = node.value
        base, key_node = node.children
        key = perl_str(self.scalar(key_node))
        if isinstance(key, Unknown):
            return key, ""
        if opener.endswith("["):
            return Unknown("an array element assignment"), ""
        if opener == "{":  # $h{k}: %h
            name = base.value[1]
            hash_ = self.vars.hashes.setdefault(name, {})
            self.vars.assigned.setdefault("%" + name, []).append(self.here)
            self.vars.elements[("%" + name, key)] = self.here
            return hash_, key
        holder = self.reference_target(base)
        if isinstance(holder, Unknown):
            return holder, ""
        return holder.items, key

    def reference_target(self, node: Node) -> HashRef | Unknown:
        """What `node` holds as a hash ref, made one if it is empty (autovivification)."""
        if node.kind == "var":
            current = self.vars.scalars.get(node.value[1])
            if current is None:
                current = self.vars.scalars[node.value[1]] = HashRef({})
            return current if isinstance(current, HashRef) else Unknown("not a hash reference")
        parent, key = self.container(node)
        if isinstance(parent, Unknown):
            return parent
        current = parent.get(key)
        if current is None:
            current = parent[key] = HashRef({})
        return current if isinstance(current, HashRef) else Unknown("not a hash reference")

    def combine(self, op: str, old: Any, new: Any) -> Any:
        if op == "=":
            return new
        if op == ".=":
            return concat(old, new)
        if op == "||=":
            test = truthy(old)
            return test if isinstance(test, Unknown) else (old if test else new)
        if op == "//=":
            return new if old is None else old
        if op in ("+=", "-=", "*=", "/=", "**="):
            return arithmetic(op[:-1], old, new)
        return Unknown(f"the {op} operator")

    # -- values -----------------------------------------------------------------------
    def scalar(self, node: Node) -> Any:
        kind = node.kind
        if kind in ("num", "str"):
            return node.value
        if kind == "istr":
            return interpolate(node.value, self.variable, self.vars.arrays)
        if kind == "words":
            return node.value[-1] if node.value else None
        if kind == "regex":
            pattern, flags, interpolating = node.value
            text = interpolate_regex(pattern, self.variable, self.vars.arrays) \
                if interpolating else pattern
            return text if isinstance(text, Unknown) else Regex(text, flags, self.at(node.line))
        if kind == "cmd":
            return command(node.value)
        if kind == "var":
            return self.variable(*node.value)
        if kind == "elem":
            return self.element(node)
        if kind == "list":
            return self.scalar(node.children[-1]) if node.children else None
        if kind == "array":
            return ArrayRef(self.items(node.children), self.at(node.line))
        if kind == "hash":
            pairs = self.pairs(self.items(node.children))
            return HashRef(pairs, self.at(node.line)) if isinstance(pairs, dict) else pairs
        if kind == "call":
            return call(self, node.value, list(node.children))
        if kind == "ref":
            return self.reference(node.children[0])
        if kind == "sub":
            return Code("an anonymous sub")
        if kind == "undef":
            return None
        if kind == "bareword":
            return Bareword(node.value)
        if kind == "assign":
            return self.assign(node.children[0], node.value, node.children[1])
        if kind == "my":
            var = node.children[0]
            self.vars.private.add(var.value[0] + var.value[1])
            return None
        if kind == "cond":
            test = truthy(self.scalar(node.children[0]))
            if isinstance(test, Unknown):
                return test
            return self.scalar(node.children[1] if test else node.children[2])
        if kind == "unop":
            return self.unary(node.value, self.scalar(node.children[0]))
        if kind == "binop":
            return self.binary(node)
        return Unknown(f"a {kind} expression")

    def listval(self, node: Node) -> list[Any]:
        """The node in list context: arrays and hashes flatten, ranges expand."""
        kind = node.kind
        if kind == "list":
            return self.items(node.children)
        if kind == "var" and node.value[0] == "@":
            return list(self.vars.arrays.get(node.value[1], []))
        if kind == "var" and node.value[0] == "%":
            return [x for pair in self.vars.hashes.get(node.value[1], {}).items() for x in pair]
        if kind == "words":
            return list(node.value)
        if kind == "binop" and node.value == "..":
            low, high = (perl_num(self.scalar(c)) for c in node.children)
            unknown = first_unknown(low, high)
            if unknown:
                return [unknown]
            if not (math.isfinite(low) and math.isfinite(high)) or high - low > 1000:
                return [Unknown("a range of more than 1000 numbers")]
            return list(range(int(low), int(high) + 1))
        return [self.scalar(node)]

    def items(self, children: tuple[Node, ...]) -> list[Any]:
        out: list[Any] = []
        for child in children:
            part = self.listval(child)
            if len(out) + len(part) > MAX_ITEMS or TOO_LONG in part:
                return [TOO_LONG]  # and it stays so: (@l, @l) of it is too long too
            out.extend(part)
        return out

    def pairs(self, items: list[Any]) -> dict[str, Any] | Unknown:
        out: dict[str, Any] = {}
        for i in range(0, len(items), 2):
            key = perl_str(items[i])
            if isinstance(key, Unknown):
                return key
            out[key] = items[i + 1] if i + 1 < len(items) else None
        return out

    def variable(self, sigil: str, name: str) -> Any:
        if sigil == "$":
            if name in self.vars.scalars:
                return self.vars.scalars[name]
            if name in BUILT_IN:
                self.vars.built_in_used.setdefault(name, self.here)
                return BUILT_IN[name]
            return Unknown(f"${name} is not set in the files read")
        if sigil == "@":
            return len(self.vars.arrays.get(name, []))
        if sigil == "%":
            return len(self.vars.hashes.get(name, {}))
        return Unknown(f"a call to &{name}")

    def element(self, node: Node) -> Any:
        base, key_node = node.children
        key = perl_str(self.scalar(key_node))
        if isinstance(key, Unknown):
            return key
        if node.value == "{":
            return self.vars.hashes.get(base.value[1], {}).get(key)
        if node.value == "[":
            items = self.vars.arrays.get(base.value[1], [])
        else:
            holder = self.scalar(base)
            if isinstance(holder, HashRef) and node.value == "->{":
                return holder.items.get(key)
            if not isinstance(holder, ArrayRef):
                return first_unknown(holder) or None
            items = holder.items
        index = perl_num(key)
        if isinstance(index, Unknown) or not math.isfinite(index) or \
                not -len(items) <= index < len(items):
            return None
        return items[int(index)]

    def reference(self, node: Node) -> Any:
        if node.kind == "var":
            sigil, name = node.value
            return Code(name) if sigil == "&" else VarRef(sigil, name)
        if node.kind == "sub":
            return Code("an anonymous sub")
        return Unknown("a reference to an expression")

    # -- operators ---------------------------------------------------------------------
    def unary(self, op: str, value: Any) -> Any:
        if op == "!":
            test = truthy(value)
            return test if isinstance(test, Unknown) else ("" if test else 1)
        number = perl_num(value)
        if isinstance(number, Unknown):
            return number
        return -number if op == "-" else number

    def binary(self, node: Node) -> Any:
        op = node.value
        left = self.scalar(node.children[0])
        if op in ("&&", "||", "//"):
            test = truthy(left) if op != "//" else left is not None
            if isinstance(test, Unknown):
                return test
            if (op == "&&") != bool(test):
                return left
            return self.scalar(node.children[1])
        right = self.scalar(node.children[1])
        if op == ".":
            return concat(left, right)
        if op in ("eq", "ne", "==", "!="):
            return Unknown(f"a comparison ({op})")
        return arithmetic(op, left, right)

def describe_target(node: Node) -> str:
    while node.kind == "elem":
        node = node.children[0]
    return f"{node.value[0]}{node.value[1]}" if node.kind == "var" else "an element"


def raise_unreadable(what: str) -> None:
    raise _AssignError(f"{what} is not read")


class _AssignError(Exception):
    """An assignment outside the subset: noted, and reading goes on."""
