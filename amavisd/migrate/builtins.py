"""The functions an amavisd-new configuration calls, as far as they set values.

One entry a function in `FUNCTIONS`: `new_RE` builds a regex table,
`read_hash`/`read_array` read the site's lookup files (data, never code),
`push`/`unshift`/`chomp` change variables, `include_config_files` reads
more configuration. Any other call is `Unknown`: import-config does not
run code, it says what it did not read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from amavisd.migrate.sources import read_data_file
from amavisd.migrate.values import (
    MAX_ITEMS,
    ArrayRef,
    HashRef,
    Regex,
    RegexTable,
    Unknown,
    VarRef,
    first_unknown,
    perl_str,
)

if TYPE_CHECKING:
    from amavisd.migrate.evaluate import Reader
    from amavisd.migrate.parser import Node


def call(reader: Reader, name: str, args: list[Node]) -> Any:
    function = FUNCTIONS.get(name)
    if function is None:
        return Unknown(f"a call to {name}() (code import-config does not run)")
    return function(reader, args)


def _new_re(reader: Reader, args: list[Node]) -> Any:
    table = RegexTable()
    for item in reader.items(tuple(args)):
        if isinstance(item, ArrayRef) and item.items:
            result = item.items[1] if len(item.items) > 1 else 1
            table.entries.append((item.items[0], result))
        else:
            table.entries.append((item, 1))
    return table


def _lookup_file(reader: Reader, args: list[Node]) -> tuple[Any, str | Unknown]:
    """(the hash/array ref named first, if any; the file name)."""
    values = reader.items(tuple(args))
    target = values[0] if values and isinstance(values[0], VarRef) else None
    rest = values[1:] if target is not None else values
    name = perl_str(rest[0]) if rest else Unknown("no file name")
    return target, name


def _read_lines(path: str | Unknown) -> list[str] | Unknown:
    """The lookup file's left-hand sides and values, comments dropped
    (amavisd-new's read_hash/read_array format: `key [value]  # comment`)."""
    if isinstance(path, Unknown):
        return path
    text = read_data_file(path)
    if text is None:
        return Unknown(f"{path} cannot be read here")
    return [line.split("#", 1)[0].strip() for line in text.splitlines()]


def _read_hash(reader: Reader, args: list[Node]) -> Any:
    target, path = _lookup_file(reader, args)
    lines = _read_lines(path)
    if isinstance(lines, Unknown):
        return lines
    table: dict[str, Any] = {}
    for line in lines:
        if line:
            key, *value = line.split(None, 1)
            table[key.lower()] = value[0] if value else 1
    if target is not None and target.sigil == "%":
        reader.vars.hashes.setdefault(target.name, {}).update(table)
        return target
    return HashRef(table)


def _read_array(reader: Reader, args: list[Node]) -> Any:
    target, path = _lookup_file(reader, args)
    lines = _read_lines(path)
    if isinstance(lines, Unknown):
        return lines
    items = [line for line in lines if line]
    if target is not None and target.sigil == "@":
        reader.vars.arrays.setdefault(target.name, []).extend(items)
        return target
    return ArrayRef(items)


def _push(front: bool) -> Callable[[Reader, list[Node]], Any]:
    def push(reader: Reader, args: list[Node]) -> Any:
        if not args or args[0].kind != "var" or args[0].value[0] != "@":
            return Unknown("push onto something other than an array")
        name = args[0].value[1]
        items = reader.items(tuple(args[1:]))
        array = reader.vars.arrays.setdefault(name, [])
        if front:
            array[0:0] = items
        else:
            array.extend(items)
        del array[MAX_ITEMS:]
        reader.vars.assigned.setdefault("@" + name, []).append(reader.here)
        return len(array)

    return push


def _chomp(reader: Reader, args: list[Node]) -> Any:
    """chomp($x = `...`) or chomp($x): drop one trailing newline."""
    if len(args) != 1:
        return Unknown("chomp of a list")
    node = args[0]
    reader.scalar(node)
    target = node.children[0] if node.kind == "assign" else node
    if target.kind == "my":
        target = target.children[0]
    if target.kind != "var" or target.value[0] != "$":
        return Unknown("chomp of something other than a scalar")
    name = target.value[1]
    value = reader.vars.scalars.get(name)
    if isinstance(value, str) and value.endswith("\n"):
        reader.vars.scalars[name] = value[:-1]
    return 1


def _include(optional: bool) -> Callable[[Reader, list[Node]], Any]:
    def include(reader: Reader, args: list[Node]) -> Any:
        reader.include([perl_str(v) for v in reader.items(tuple(args))], optional)
        return 1

    return include


def _case(upper: bool) -> Callable[[Reader, list[Node]], Any]:
    def change(reader: Reader, args: list[Node]) -> Any:
        text = perl_str(reader.scalar(args[0])) if args else ""
        return text if isinstance(text, Unknown) else (text.upper() if upper else text.lower())

    return change


def _join(reader: Reader, args: list[Node]) -> Any:
    values = [perl_str(v) for v in reader.items(tuple(args))]
    return first_unknown(*values) or (values[0].join(values[1:]) if values else "")


def _templates(reader: Reader, args: list[Node]) -> Any:
    return Unknown("amavisd has its own notice templates (template_dir holds a site's own, in "
                   "amavisd's format)")


def _dkim(reader: Reader, args: list[Node]) -> Any:
    return Unknown("no DKIM signing in amavisd")


def _regex_only(reader: Reader, args: list[Node]) -> Any:
    value = reader.scalar(args[0]) if args else None
    return value if isinstance(value, Regex) else Unknown("qr// expected")


FUNCTIONS: dict[str, Callable[[Reader, list[Node]], Any]] = {
    "new_RE": _new_re,
    "read_hash": _read_hash,
    "read_array": _read_array,
    "push": _push(front=False),
    "unshift": _push(front=True),
    "chomp": _chomp,
    "include_config_files": _include(optional=False),
    "include_optional_config_files": _include(optional=True),
    "lc": _case(upper=False),
    "uc": _case(upper=True),
    "join": _join,
    "read_l10n_templates": _templates,
    "read_text": _templates,
    "dkim_key": _dkim,
    "qr": _regex_only,
}
