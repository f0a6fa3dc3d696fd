"""`$banned_filename_re` as amavisd's `banned_rules`.

amavisd-new matches each regex of the table against strings of a part:
its declared names, its declared MIME type, its file(1) short types with a
dot in front (`.exe-ms`), and `UNDECIPHERABLE`; the first regex that
matches decides (`[qr'...' => 0]` allows). So a regex is translated by what
it was written to match: `^\\.(exe-ms|dll)$` becomes `deny type = exe`
(our detected types, where we have one), `^application/x-msdownload$`
becomes `deny mime ~ ...`, anything else `deny name ~ ...`, in the same
order. A deny keeps matching regardless of case (matching more is the safe
side); an allow written without /i stays case-sensitive.

What does not carry over, and is reported: allows on a container's type
(amavisd-new let everything inside a zip through; our rules judge each part
on its own), `UNDECIPHERABLE` (such a part is UNCHECKED here, never banned
nor clean), types we do not detect, regexes Python cannot read the same way.
"""

from __future__ import annotations

import re
from typing import Any

from amavisd.migrate.perlre import RegexNotTranslated, to_python
from amavisd.migrate.rows import Row
from amavisd.migrate.scope import Scope
from amavisd.migrate.values import Regex, RegexTable, Unknown, truthy
from amavisd.policy.banned import BannedRuleError, BannedRules

# amavisd-new's short types (its $map_full_type_to_short_type_re) -> the types
# amavisd.decode.detect gives. "exe" there is any executable; ours is a DOS or
# Windows program (EXE and DLL alike), elf a Unix one.
SHORT_TYPES: dict[str, tuple[str, ...]] = {
    "exe-ms": ("exe",), "dll": ("exe",), "exe": ("exe", "elf"), "exe-unix": ("elf",),
    "zip": ("zip",), "7z": ("7z",), "rar": ("rar",), "arj": ("arj",), "arc": ("arc",),
    "zoo": ("zoo",), "lha": ("lha",), "cab": ("cab",), "tar": ("tar",), "cpio": ("cpio",),
    "rpm": ("rpm",), "tnef": ("tnef",), "gz": ("gzip",), "bz2": ("bzip2",), "Z": ("compress",),
    "xz": ("xz",), "lzma": ("lzma",), "zst": ("zstd",), "lz4": ("lz4",), "F": ("freeze",),
    "iso": ("iso",), "pdf": ("pdf",), "doc": ("ole2",), "a": ("ar",),
}
TYPE_RULE = re.compile(r"\^\\\.\(?(?:\?:)?([A-Za-z0-9_|-]+)\)?(?:\$|\\z|\\Z)")
MIME_RULE = re.compile(r"\^[a-z]+/")
UNDECIPHERABLE = re.compile(r"\^?UNDECIPHERABLE\$?")
SIMPLE = re.compile(r"(?:[^{()*+?\\]|\\.|\((?!\?)|\)(?![*+?{])|[*+?])*")
QUANTIFIER = re.compile(r"(?<!\\)[*+?]")
NOTE = ("amavisd-new tried each regex on a part and all its containers; amavisd tries "
        "every part (containers too) on its own")


def translate(scope: Scope) -> None:
    var = "$banned_filename_re"
    value = scope.get(var)
    if value is None:
        scope.set("banned_rules", [], var, "no banned names or types here")
        return
    if isinstance(value, Regex):
        value = RegexTable([(value, 1)])
    if not isinstance(value, RegexTable):
        reason = value.reason if isinstance(value, Unknown) else "not a new_RE(...) table"
        scope.skip(var, reason)
        return
    rules: list[str] = []
    for pattern, result in value.entries:
        where = getattr(pattern, "where", "") or scope.where(var)
        for rule in _rules(scope, var, pattern, result, where):
            if rule not in rules:
                rules.append(rule)
    scope.set("banned_rules", rules, var, NOTE)


def _rules(scope: Scope, var: str, pattern: Any, result: Any, where: str) -> list[str]:
    if not isinstance(pattern, Regex):
        reason = pattern.reason if isinstance(pattern, Unknown) else "an entry that is not qr//"
        scope.skip(var, reason, where)
        return []
    deny = truthy(result)
    if isinstance(deny, Unknown):
        scope.skip(var, f"qr'{pattern.pattern}': {deny.reason}", where)
        return []
    shown = f"qr'{pattern.pattern}'{pattern.flags}"
    if UNDECIPHERABLE.fullmatch(pattern.pattern):
        scope.skip(var, f"{shown}: an undecipherable part is UNCHECKED in amavisd (never "
                        "banned, never clean; see unchecked_destinies)", where)
        return []
    typed = TYPE_RULE.fullmatch(pattern.pattern)
    if typed:
        return _type_rules(scope, var, shown, typed.group(1).split("|"), deny, where)
    field = "mime" if MIME_RULE.match(pattern.pattern) else "name"
    try:
        body = to_python(pattern, case="broaden" if deny else "insensitive-ok",
                         blanks_escaped=True)
    except RegexNotTranslated as err:
        scope.skip(var, f"{shown}: {err}", where)
        return []
    rules = [f"{'deny' if deny else 'allow'} {field} ~ {body}"]
    if deny and field == "name":
        rules += _types_it_also_matched(pattern)
    try:
        BannedRules.parse(rules)
    except BannedRuleError as err:
        scope.skip(var, f"{shown}: {err}", where)
        return []
    return rules


def _type_rules(scope: Scope, var: str, shown: str, names: list[str], deny: bool,
                where: str) -> list[str]:
    if not deny:
        scope.skip(var, f"{shown}: an allow on a container's type let everything inside it "
                        "through; amavisd's rules judge each part on its own", where)
        return []
    rules = []
    for name in names:
        ours = SHORT_TYPES.get(name)
        if ours is None:
            scope.skip(var, f"{shown}: amavisd detects no type like file(1)'s {name!r}", where)
            continue
        rules += [f"deny type = {t}" for t in ours]
    return rules


def _types_it_also_matched(pattern: Regex) -> list[str]:
    """A name regex such as \\.exe$ also matched amavisd-new's '.exe' type string.
    Only simple regexes are tried (few quantifiers, none on a group, no {n,m}):
    Python's re has no time limit, and a hostile one could backtrack for ever."""
    if not SIMPLE.fullmatch(pattern.pattern) or len(QUANTIFIER.findall(pattern.pattern)) > 4:
        return []
    try:
        compiled = re.compile(to_python(pattern, case="given"))
    except (RegexNotTranslated, re.error):
        return []
    return [f"deny type = {t}" for name, ours in SHORT_TYPES.items()
            if compiled.search("." + name) for t in ours]


ROWS = (
    Row(("$banned_filename_re",), translate),
)
