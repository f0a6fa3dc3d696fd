"""Validators of the settings table: each returns the normalised value or
raises ValueError, which `coerce` turns into a one-line `ConfigError`.

Validators that need another part's vocabulary (scanner tables, mail-sending
methods, banned rules, destinies) call the checker that part keeps beside
its registry, in a module that imports no scanner, no socket and nothing
of the settings: `scan/definitions.py`, `actions/methods.py`,
`policy/banned.py`, `policy/destinies.py`. Addresses are read by the one
parser, `amavisd_client.wire.address`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

from amavisd.actions.methods import method_spec as _method_spec
from amavisd.policy.banned import BannedRules
from amavisd.policy.destinies import reason_destinies
from amavisd.scan.definitions import check_definitions
from amavisd_client.wire.address import AddressError, parse, parse_host_port


def positive(value: Any) -> Any:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def non_negative(value: Any) -> Any:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def between(low: int, high: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return check


def one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        value = value.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def absolute_path_or_empty(value: str) -> str:
    if value and not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def absolute_path(value: str) -> str:
    if not value:
        raise ValueError("must be an absolute path, not empty")
    return absolute_path_or_empty(value)


def file_mode(value: str) -> str:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError("must be an octal mode such as '0660'") from None
    if mode & 0o007:
        raise ValueError("must not give any access to others (the socket is the daemon's door)")
    return f"{mode:04o}"


def parse_address(value: str) -> tuple[str, str | tuple[str, int]]:
    """`unix:/path` -> ("unix", path); `tcp:host:port` -> ("tcp", (host, port))."""
    try:
        where = parse(value, accept=("unix", "tcp"))
    except AddressError:
        raise ValueError("must be unix:/path or tcp:host:port") from None
    return where.kind, where.target


def scanner_address(value: str) -> str:
    parse_address(value)
    return value


def loopback_listen(value: str) -> str:
    """Optional TCP listener: loopback only, since AM.PDP passes file paths."""
    if not value:
        return value
    try:
        host, _ = parse_host_port(value)
    except AddressError:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9998") from None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError("must be a loopback address: AM.PDP hands over file paths")
    return value


def reason_destinies_validator(value: list[str]) -> list[str]:
    return reason_destinies(value)


def scanner_names(value: list[str]) -> list[str]:
    bad = [v for v in value if not isinstance(v, str) or not v.replace("-", "").replace(
        "_", "").isalnum()]
    if bad:
        raise ValueError(f"bad scanner name {bad[0]!r}")
    return list(value)


def scanner_tables(tables: dict[str, Any]) -> dict[str, Any]:
    return check_definitions(tables)  # the scanners' schema knows their keys


def categories(*allowed: str) -> Callable[[list[str]], list[str]]:
    def check(value: list[str]) -> list[str]:
        value = [v.lower() for v in value]
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"unknown category {bad[0]!r}; use {', '.join(allowed)}")
        return value

    return check


def banned_rules(value: list[str]) -> list[str]:
    BannedRules.parse(value)  # BannedRuleError is a ValueError naming the bad rule
    return list(value)


def method_spec(value: str) -> str:
    return _method_spec(value)


def method_spec_or_empty(value: str) -> str:
    return method_spec(value) if value else value


def log_targets(value: list[str]) -> list[str]:
    allowed = {"syslog", "stderr"}
    bad = [v for v in value if v not in allowed]
    if bad:
        raise ValueError(f"unknown target {bad[0]!r}; use syslog and/or stderr")
    return list(value)
