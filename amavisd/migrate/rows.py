"""Translator rows for the settings that map one to one, and their converters.

A `Row` names the amavisd-new variables it reads and the function that
writes amavisd settings from them. `simple(var, key, convert)` is the row
for a variable that becomes one setting through a converter; a converter
returns the value amavisd takes or raises `NotTranslated` with the reason.
Rows that combine several variables live beside the concern they handle
(`lookups.py`, `listen.py`, `banned.py`, `scanners.py`, `notices.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amavisd.migrate.scope import NotTranslated, Scope, known
from amavisd.migrate.values import Bareword, Unknown, perl_num, perl_str, truthy

DESTINIES = {"D_PASS": "pass", "D_DISCARD": "discard", "D_BOUNCE": "bounce",
             "D_REJECT": "reject", "D_TEMPFAIL": "tempfail"}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
DESTINY_NUMBERS = {1: "pass", 0: "discard", -2: "bounce", -3: "reject", -4: "tempfail"}


@dataclass(frozen=True)
class Row:
    reads: tuple[str, ...]
    translate: Callable[[Scope], None]
    banks: bool = True  # may it appear in a $policy_bank{...}?


def simple(var: str, key: str, convert: Callable[[Any], Any], note: str = "") -> Row:
    def translate(scope: Scope) -> None:
        try:
            scope.set(key, convert(scope.get(var)), var, note)
        except NotTranslated as err:
            scope.skip(var, str(err))

    return Row((var,), translate)


def skipped(var: str, reason: str, banks: bool = True) -> Row:
    """A variable amavisd reads no equivalent of, with the reason said once here."""
    return Row((var,), lambda scope: scope.skip(var, reason), banks)


def noted(var: str, text: str) -> Row:
    """A variable that needs no setting (its value is used elsewhere, or is ours)."""
    return Row((var,), lambda scope: scope.info(var, text))


# -- converters --------------------------------------------------------------------------


def text(value: Any) -> str:
    result = known(perl_str(known(value)))
    control = CONTROL.search(result)
    if control:  # a line break in a path, an address or a header line is an injection
        raise NotTranslated(f"a control character ({control.group(0)!r}) in the value")
    return result


def path(value: Any) -> str:
    result = text(value).rstrip("/") or "/"
    if not result.startswith("/"):
        raise NotTranslated(f"{result!r} is not an absolute path")
    return result


def integer(value: Any) -> int:
    number = known(perl_num(known(value)))
    if isinstance(number, float) and (not math.isfinite(number) or number != int(number)):
        raise NotTranslated(f"{number!r} is not a whole number")
    return int(number)


def seconds(value: Any) -> float:
    number = known(perl_num(known(value)))
    if not math.isfinite(number):
        raise NotTranslated(f"{number!r} is not a number of seconds")
    return float(number)


def boolean(value: Any) -> bool:
    return bool(known(truthy(known(value))))


def destiny(value: Any) -> str:
    value = known(value)
    if isinstance(value, Bareword) and value.name in DESTINIES:
        return DESTINIES[value.name]
    if isinstance(value, str) and value in DESTINIES:
        return DESTINIES[value]
    number = perl_num(value)
    if isinstance(number, (int, float)) and not isinstance(number, bool) \
            and number in DESTINY_NUMBERS:
        return DESTINY_NUMBERS[int(number)]
    raise NotTranslated(f"{describe(value)} is not a destiny (D_PASS, D_DISCARD, D_BOUNCE, "
                        "D_REJECT, D_TEMPFAIL)")


def octal_mode(value: Any) -> str:
    number = known(perl_num(known(value)))
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value.strip()):
        number = int(value.strip(), 8)  # a mode written as a string is octal
    if not isinstance(number, int) or not 0 <= number <= 0o7777:
        raise NotTranslated(f"{describe(value)} is not a file mode")
    return f"{number:04o}"


def log_level(value: Any) -> str:
    level = integer(value)
    if level <= -2:
        return "error"
    if level == -1:
        return "warning"
    return "info" if level <= 2 else "debug"


def lowercase(value: Any) -> str:
    return text(value).lower()


def describe(value: Any) -> str:
    if isinstance(value, Unknown):
        return value.reason
    if isinstance(value, Bareword):
        return value.name
    shown = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
    return shown[:60]
