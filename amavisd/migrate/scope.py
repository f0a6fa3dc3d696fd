"""Where a translator reads amavisd-new variables and writes amavisd settings.

A translator row sees a `Scope`: the whole configuration (`TopScope`), or
one `$policy_bank{NAME}` (`BankScope`, whose keys are the same variables
without their sigil, and which falls back to the whole configuration for
what it does not set, as amavisd-new's banks do). It writes to the
`Translation` through the scope: a setting (with the file:line it came
from), a setting of a bank, or a `# not translated` line with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amavisd.migrate.evaluate import Variables
from amavisd.migrate.values import ArrayRef, HashRef, Unknown, VarRef

MISSING = object()
BANK_SECTIONS = ("policy", "notify", "headers")


class NotTranslated(Exception):
    """Raised by a converter: the value has no equivalent, and why."""


@dataclass
class Entry:
    value: Any
    where: str
    source: str  # the amavisd-new variable(s), for the comment
    note: str = ""


@dataclass
class Untranslated:
    where: str
    what: str
    reason: str


@dataclass
class Translation:
    settings: dict[str, Entry] = field(default_factory=dict)
    banks: dict[str, dict[str, Entry]] = field(default_factory=dict)
    bank_where: dict[str, str] = field(default_factory=dict)
    scanners: dict[str, Entry] = field(default_factory=dict)
    untranslated: list[Untranslated] = field(default_factory=list)
    notes: list[Untranslated] = field(default_factory=list)  # what was read, not a loss


class Scope:
    bank: str | None = None

    def __init__(self, out: Translation, sections: dict[str, str]):
        self.out = out
        self.sections = sections  # setting -> its section (the table's, else the planned one)

    # reading -------------------------------------------------------------------------
    def assigned(self, var: str) -> bool:
        raise NotImplementedError

    def get(self, var: str, default: Any = MISSING) -> Any:
        raise NotImplementedError

    def where(self, var: str) -> str:
        raise NotImplementedError

    def deref(self, value: Any) -> Any:
        raise NotImplementedError

    def first_where(self, *names: str) -> str:
        return next((self.where(v) for v in names if self.assigned(v)), "?")

    # writing -------------------------------------------------------------------------
    def set(self, key: str, value: Any, var: str, note: str = "", where: str = "") -> None:
        """Setting `key` = value, translated from `var` (its file:line unless given)."""
        entry = Entry(value, where or self.where(var), var, note)
        if self.bank is None:
            self.out.settings[key] = entry
        elif self.sections.get(key) in BANK_SECTIONS:
            self.out.banks[self.bank][key] = entry
        else:
            self.skip(var, f"{key} is a daemon-wide setting in amavisd, not one of a "
                           "policy bank", where)

    def skip(self, var: str, reason: str, where: str = "") -> None:
        what = f"{var} (policy bank {self.bank})" if self.bank else var
        if not where:
            earlier = self.earlier(var)
            what += f" (also set at {', '.join(earlier)})" if earlier else ""
        self.out.untranslated.append(Untranslated(where or self.where(var), what, reason))

    def earlier(self, var: str) -> list[str]:
        """Where a variable was set before the assignment in effect."""
        return []

    def info(self, var: str, text: str) -> None:
        what = f"{var} (policy bank {self.bank})" if self.bank else var
        self.out.notes.append(Untranslated(self.where(var), what, text))


class TopScope(Scope):
    def __init__(self, out: Translation, sections: dict[str, str], variables: Variables):
        super().__init__(out, sections)
        self.vars = variables

    def assigned(self, var: str) -> bool:
        return var in self.vars.assigned and var not in self.vars.private

    def get(self, var: str, default: Any = MISSING) -> Any:
        sigil, name = var[0], var[1:]
        if not self.assigned(var):
            return None if default is MISSING else default
        if sigil == "$":
            return self.vars.scalars.get(name)
        if sigil == "@":
            return self.vars.arrays.get(name, [])
        return self.vars.hashes.get(name, {})

    def where(self, var: str) -> str:
        return self.vars.where(var)

    def earlier(self, var: str) -> list[str]:
        places = self.vars.assigned.get(var, [])
        return list(dict.fromkeys(p for p in places[:-1] if p != places[-1]))[:5]

    def deref(self, value: Any) -> Any:
        return self.vars.deref(value) if isinstance(value, VarRef) else value


class BankScope(Scope):
    def __init__(self, top: TopScope, name: str, bank: HashRef, where: str):
        super().__init__(top.out, top.sections)
        self.top = top
        self.bank = name
        self.items = bank.items
        self.bank_where = where

    def assigned(self, var: str) -> bool:
        return var[1:] in self.items

    def get(self, var: str, default: Any = MISSING) -> Any:
        if var[1:] not in self.items:
            return self.top.get(var, default)
        value = self.items[var[1:]]
        if var[0] == "@":  # a bank holds `bypass_virus_checks_maps => [...]`
            return value.items if isinstance(value, ArrayRef) else [value]
        if var[0] == "%" and isinstance(value, HashRef):
            return value.items
        return value

    def where(self, var: str) -> str:
        return self.bank_where if var[1:] in self.items else self.top.where(var)

    def deref(self, value: Any) -> Any:
        return self.top.deref(value)


def known(value: Any) -> Any:
    """The value, or NotTranslated with the reason it is not known."""
    if isinstance(value, Unknown):
        raise NotTranslated(value.reason)
    return value
