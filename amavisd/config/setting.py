"""One row of the settings table, and how a value is checked against it.

A `Setting` says everything about one key (name, section, type, default,
validator, help, flags), so the table in `table.py` is the only place a key
is declared. `coerce` is the one path by which a value from TOML, a flag or
`Config.replace` becomes a setting: type first, then the validator, and any
problem is a `ConfigError` of one line naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(Exception):
    """A configuration problem, said in one line that names the key."""


@dataclass(frozen=True)
class Setting:
    name: str
    section: str
    type: type
    default: Any
    help: str
    validator: Callable[[Any], Any] | None = None
    flags: tuple[str, ...] = ()
    # For booleans: the flag that sets False (e.g. --foreground for daemon).
    negative_flag: str | None = None
    metavar: str | None = None


def coerce(setting: Setting, value: Any, where: str) -> Any:
    """Check a value's type (TOML gives real types) and run the validator."""
    expected = setting.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is list and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {value!r}")
    if setting.validator is not None:
        try:
            value = setting.validator(value)
        except ValueError as err:
            raise ConfigError(f"{where}: {err} (got {value!r})") from None
    return value
