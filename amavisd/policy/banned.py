"""Banned parts: ordered allow/deny rules over every part of the tree.

A part is banned when the first rule that matches it is a `deny`; a part no
rule matches is not banned. Every part is checked, members of archives too,
so a `setup.exe` inside a zip inside a mail is as banned as one attached
directly.

A rule is one line, parsed once at load time:

    deny name ~ \\.(exe|scr)$          regex search on the part's names
    allow name ~ \\.txt$               an earlier allow wins over a later deny
    deny type = exe                   the type detected from the content
    deny mime = message/partial       the declared MIME type
    deny magic ~ ^application/x-dosexec$   libmagic's MIME type (when named)
    deny type = exe and name !~ \\.exe$     conditions joined with `and`

Fields: `name` (declared MIME file name or archive member name; for member
paths the last component is tried as well, and every name also with trailing
dots and spaces removed, as Windows does), `mime` (declared MIME type),
`type` (short type detected from the bytes: exe, elf, zip, ...), `magic`
(libmagic's MIME type; only filled when the pipeline asks libmagic, see
`BannedRules.needs_magic`). Operators: `~` regex search, `=` equality,
`!~` and `!=` their negations; all comparisons ignore case. A value is one
word, or quoted with '...' or "..." when it holds spaces. In TOML, write
rules as literal strings ('...') so that regex backslashes stay as written.

Names are hostile labels: they are only ever matched, never used as paths.
This module must never read part contents: it judges what the decoder
already found out.
"""

from __future__ import annotations

import email.header
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

from amavisd.decode.parts import Part, declared_name


class BannedRuleError(ValueError):
    """A rule that does not parse: one line naming the rule and the fault."""


# Extensions that Windows runs (or hands to a script host) when opened.
EXECUTABLE_EXTENSIONS = (
    "exe|com|scr|pif|bat|cmd|cpl|dll|vbs|vbe|js|jse|wsf|wsh|hta|lnk|reg|msi|msp|scf|ps1"
)

# Modelled on amavisd-new's Debian defaults: first the most telling reasons,
# so the hit names the rule that says most about the part.
DEFAULT_RULES: tuple[str, ...] = (
    # AnnaKournikova.jpg.vbs, invoice.pdf.exe: a harmless-looking extension
    # in front of one that runs.
    rf"deny name ~ \.[^./]+\.({EXECUTABLE_EXTENSIONS})$",
    # {CLSID} names make Explorer open a file with a handler of the sender's choice.
    r"deny name ~ \{[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\}",
    r"deny mime ~ ^application/(x-msdownload|x-msdos-program|hta)$",
    rf"deny name ~ \.({EXECUTABLE_EXTENSIONS})$",
    # A Windows executable whatever its name says (photo.jpg that starts
    # with MZ). No exception by default: a PE runs when opened however it
    # arrives; a site that must receive some puts an allow rule first.
    "deny type = exe",
    # Fragments reassembled by the reader's client: we never see the whole.
    "deny mime = message/partial",
)


def _views(name: str) -> tuple[str, ...]:
    """One reading of a name as the rules see it: as given, its last path
    component, and both with trailing dots and spaces removed (Windows drops
    them: 'a.exe. ')."""
    names = [name]
    if "/" in name:
        names.append(name.rsplit("/", 1)[1])
    names += [n.rstrip(". ") for n in names]
    return tuple(dict.fromkeys(names))


def _name_candidates(part: Part) -> tuple[str, ...]:
    return _views(part.name)


# What makes a name read differently elsewhere: an RFC 2047 encoded word
# (Thunderbird decodes it in a file name), or a character Windows refuses in
# one, which Outlook removes (MS-OXCMAIL 2.2.3.4.1.1): 'a.v:bs' is saved as
# a.vbs. ("?" also stands for the control characters the decoders replaced.)
_ODD = re.compile(r'=\?|["*:<>?|\\]')
_WINDOWS_DROPS = str.maketrans("", "", '"*:<>?|\\')


def readings(part: Part) -> tuple[str, ...]:
    """Every name a reader may give the part: its name (first, even empty),
    the other names a decoder found (`alt_names`), and of each the
    encoded-word decoding and the last component less what Windows refuses,
    where those differ."""
    if not part.alt_names and not _ODD.search(part.name):
        return (part.name,)
    found = [part.name, *part.alt_names]
    found += [_encoded_words(name) for name in found if "=?" in name]
    found += [name.rsplit("/", 1)[-1].translate(_WINDOWS_DROPS) for name in found]
    return (part.name, *(n for n in dict.fromkeys(found[1:]) if n and n != part.name))


def _encoded_words(name: str) -> str:
    """The decoded name, cleaned as every name is (controls as "?": it goes
    into replies, notices and logs), clipped as they are."""
    try:
        decoded = str(email.header.make_header(email.header.decode_header(name)))
    except Exception:  # noqa: BLE001 - a hostile word the stdlib cannot read: no reading
        return ""
    return declared_name(decoded.replace("\x7f", "?"))


# field -> the strings of a part that the field compares against
FIELDS: dict[str, Callable[[Part], tuple[str, ...]]] = {
    "name": _name_candidates,
    "mime": lambda part: (part.mime_type,),
    "type": lambda part: (part.detected,),
    "magic": lambda part: (part.detected_mime,),
    # informational flags a decoder set, e.g. "deny flag = macros" (VBA in Office files)
    "flag": lambda part: tuple(sorted(part.flags)) or ("",),
}


def _regex_test(value: str) -> Callable[[str], object]:
    try:
        pattern = re.compile(value, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"bad regex {value!r}: {err}") from None
    return pattern.search  # a match object or None: only its truth is asked


def _equal_test(value: str) -> Callable[[str], object]:
    wanted = value.casefold()
    return lambda text: text.casefold() == wanted


# operator -> (test builder, negated)
OPERATORS: dict[str, tuple[Callable[[str], Callable[[str], object]], bool]] = {
    "~": (_regex_test, False),
    "!~": (_regex_test, True),
    "=": (_equal_test, False),
    "!=": (_equal_test, True),
}

ACTIONS = ("allow", "deny")


@dataclass(frozen=True)
class Condition:
    """Holds for a part when its test passes any of the part's strings for
    the field; negated, when it passes none (BannedRules.first_match)."""

    field: str
    test: Callable[[str], object]  # its truth: the string passes
    negated: bool


@dataclass(frozen=True)
class Rule:
    text: str
    number: int  # 1-based position in the list, for messages
    deny: bool
    conditions: tuple[Condition, ...]  # all must hold


@dataclass(frozen=True)
class BannedHit:
    """One banned part and the rule that banned it."""

    part_path: str
    part_name: str
    rule_text: str
    rule_number: int = 0

    @property
    def label(self) -> str:
        """Short form for the verdict summary: the name, else the path."""
        return self.part_name or self.part_path

    def __str__(self) -> str:
        label = f"{self.part_name!r} " if self.part_name else ""
        return f"{label}({self.part_path}) by rule [{self.rule_text}]"


def _tokens(text: str) -> Iterator[str]:
    """Words separated by blanks; '...' or "..." keeps blanks (no escapes,
    so regex backslashes pass through untouched)."""
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        quote = text[pos]
        if quote in "'\"":
            end = text.find(quote, pos + 1)
            if end < 0:
                raise ValueError(f"unterminated {quote} quote")
            yield text[pos + 1:end]
            pos = end + 1
            continue
        end = pos
        while end < len(text) and not text[end].isspace():
            end += 1
        yield text[pos:end]
        pos = end


def parse_rule(text: str, number: int) -> Rule:
    """One rule line -> Rule; BannedRuleError (one line) when it is wrong."""
    try:
        if not isinstance(text, str):
            raise ValueError("must be a string")
        words = list(_tokens(text))
        if not words or words[0].lower() not in ACTIONS:
            raise ValueError("must start with allow or deny")
        conditions = []
        rest = words[1:]
        while True:
            if len(rest) < 3:
                raise ValueError("expected FIELD OP VALUE, e.g. name ~ \\.exe$")
            field, op, value = rest[0].lower(), rest[1], rest[2]
            if field not in FIELDS:
                raise ValueError(f"unknown field {field!r}; use {', '.join(FIELDS)}")
            if op not in OPERATORS:
                raise ValueError(f"unknown operator {op!r}; use {' '.join(OPERATORS)}")
            build, negated = OPERATORS[op]
            conditions.append(Condition(field, build(value), negated))
            rest = rest[3:]
            if not rest:
                break
            if rest[0].lower() != "and":
                raise ValueError(f"expected 'and' before {rest[0]!r} "
                                 "(quote a value that holds spaces)")
            rest = rest[1:]
    except ValueError as err:
        raise BannedRuleError(f"banned rule {number} {text!r}: {err}") from None
    return Rule(text.strip(), number, words[0].lower() == "deny", tuple(conditions))


class BannedRules:
    """The parsed rule list; `check()` gives the banned parts of a tree."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> BannedRules:
        return cls(parse_rule(text, n) for n, text in enumerate(lines, 1))

    @classmethod
    def default(cls) -> BannedRules:
        return cls.parse(DEFAULT_RULES)

    @cached_property  # asked for every message; the rules never change
    def needs_magic(self) -> bool:
        """True when a rule looks at libmagic's type, which the pipeline
        fills only on request (it triples the cost of decoding)."""
        return any(c.field == "magic" for r in self.rules for c in r.conditions)

    def first_match(self, part: Part) -> Rule | None:
        """The first rule all of whose conditions hold for `part`. A part
        that reads as several names (`readings`) is judged once a name, and
        the first of those judgements that denies is the part's: a reader
        that sees a.vbs must not be let through by the a.txt we read."""
        return self._judge(part)[0]

    def _judge(self, part: Part) -> tuple[Rule | None, str]:
        """first_match, and the name it judged (the reading that was denied)."""
        names = readings(part)
        if len(names) == 1:
            return self._first_match(part, None), part.name
        first = None
        for n, name in enumerate(names):
            rule = self._first_match(part, _views(name))
            if rule is not None and rule.deny:
                return rule, name
            if n == 0:
                first = rule
        return first, part.name

    def _first_match(self, part: Part, views: tuple[str, ...] | None) -> Rule | None:
        """One loop, no call a rule or a condition: every part of every
        message passes through here; each field's strings are found once a
        part (the name's: `views`, when given)."""
        strings: dict[str, tuple[str, ...]] = {} if views is None else {"name": views}
        for rule in self.rules:
            for condition in rule.conditions:
                texts = strings.get(condition.field)
                if texts is None:
                    texts = strings[condition.field] = FIELDS[condition.field](part)
                if any(map(condition.test, texts)) == condition.negated:
                    break  # this condition fails, and with it the rule
            else:
                return rule
        return None

    def check(self, root: Part) -> list[BannedHit]:
        """Every part of the tree whose first matching rule denies it."""
        hits = []
        for part in root.walk():
            rule, name = self._judge(part)
            if rule is not None and rule.deny:
                hits.append(BannedHit(part.path, name, rule.text, rule.number))
        return hits
