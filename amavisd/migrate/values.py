"""What an amavisd-new setting's value is, once its Perl is read.

Plain values are Python's (str, int, float, None for undef, list for an
array, dict for a hash); the rest are the small types below. `Unknown`
stands for whatever import-config will not compute (a command's output,
a call to code, a variable no file sets) and carries the reason, so a
translator can say why it did not translate a setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_CHARS = 64 * 1024  # longest string value; longer is Unknown (doubling "$a$a")
MAX_ITEMS = 10_000  # longest list or hash


@dataclass(frozen=True)
class Unknown:
    reason: str
    command: str = ""  # the command whose output it is, if that is why


@dataclass
class ArrayRef:
    items: list[Any]
    where: str = field(default="", compare=False)  # file:line of its "[" (for the report)


@dataclass
class HashRef:
    items: dict[str, Any]
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class VarRef:
    """`\\%h`, `\\@a`, `\\$s`: a reference to a variable, read when translated
    (Perl's refs see the variable's later contents too)."""
    sigil: str
    name: str


@dataclass(frozen=True)
class Regex:
    pattern: str  # as Perl's regex engine gets it (after interpolation)
    flags: str  # i, m, s, x ...
    where: str = field(default="", compare=False)


@dataclass
class RegexTable:
    """new_RE(...): (regex, result) pairs, first match wins."""
    entries: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Code:
    name: str  # "ask_daemon", "anonymous sub", ...


@dataclass(frozen=True)
class Bareword:
    name: str  # D_PASS, CC_VIRUS, ...


def first_unknown(*values: Any) -> Unknown | None:
    for value in values:
        if isinstance(value, Unknown):
            return value
    return None


def perl_str(value: Any) -> str | Unknown:
    """A value as Perl would print it, where that is meaningful."""
    if isinstance(value, Unknown):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.15g}"
    if isinstance(value, str):
        return value
    if isinstance(value, Regex):
        return f"(?^{value.flags}:{value.pattern})"
    if isinstance(value, Bareword):
        return value.name
    return Unknown(f"a {type(value).__name__} used as a string")


def perl_num(value: Any) -> int | float | Unknown:
    if isinstance(value, Unknown):
        return value
    if value is None:
        return 0
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return 0 if not text else Unknown(f"{text[:40]!r} used as a number")
    return Unknown(f"a {type(value).__name__} used as a number")


def truthy(value: Any) -> bool | Unknown:
    if isinstance(value, Unknown):
        return value
    if value is None or value == "" or value == "0":
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True


def bounded(value: Any) -> Any:
    """Unknown instead of a value past the size limits."""
    if isinstance(value, str) and len(value) > MAX_CHARS:
        return Unknown(f"a string longer than {MAX_CHARS} characters")
    if isinstance(value, (list, dict)) and len(value) > MAX_ITEMS:
        return Unknown(f"more than {MAX_ITEMS} items")
    return value


def arithmetic(op: str, left: Any, right: Any) -> Any:
    """Perl's + - * / % ** on numbers, bounded: a failure or a number past 64
    bits is Unknown, never an exception."""
    a, b = perl_num(left), perl_num(right)
    unknown = first_unknown(a, b)
    if unknown:
        return unknown
    try:
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            result = a * b
        elif op == "/":
            result = a / b
            result = int(result) if result == int(result) else result
        elif op == "%":
            result = int(a) % int(b)
        elif op == "**" and abs(b) <= 64:
            result = a ** b
        else:
            return Unknown(f"the {op} operator here")
    except (ZeroDivisionError, OverflowError, ValueError):
        return Unknown(f"arithmetic that fails ({op})")
    if isinstance(result, complex) or (isinstance(result, int) and result.bit_length() > 64):
        return Unknown("a number out of range")
    return result
