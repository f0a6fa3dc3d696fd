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
import re
from collections.abc import Callable, Mapping
from typing import Any

from amavisd.actions.methods import method_spec as _method_spec
from amavisd.config.setting import ConfigError, Setting, coerce
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


# -- policy banks: names, the doors and networks that choose them, address lists -----------
#
# The syntax lives here, beside the other validators, and the daemon's side
# (policy/banks.py, policy/recipients.py) builds its lookup structures from
# the normalised text these return: the settings layer may not import the
# policy code that uses them.

# Built into every daemon (a [policy_banks.NAME] table of the same name adds
# to it): MYNETS is chosen for clients in `mynetworks` and, as in
# amavisd-new, marks the mail as originating; ORIGINATING is what a listener
# for our own users (interface_policy) or a client (policy_bank=) names.
BUILTIN_BANKS: dict[str, dict[str, Any]] = {
    "MYNETS": {"originating": True},
    "ORIGINATING": {"originating": True},
}
# The sections whose settings a bank may override: what is decided per message.
BANK_SECTIONS = ("policy", "notify", "headers")
_BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,63}")


def is_bank_name(name: str) -> bool:
    return isinstance(name, str) and _BANK_NAME.fullmatch(name) is not None


def bank_name(value: str) -> str:
    if not is_bank_name(value):
        raise ValueError(f"bad policy bank name {value!r}: letters, digits and . _ + : - "
                         "(at most 64)")
    return value


def _pairs(value: list[str], key_check: Callable[[str], str], what: str) -> list[str]:
    out = []
    for entry in value:
        key, sep, bank = str(entry).rpartition("=")
        if not sep or not key.strip():
            raise ValueError(f"{entry!r}: use {what}=BANK")
        out.append(f"{key_check(key.strip())}={bank_name(bank.strip())}")
    return out


def door(key: str) -> str:
    """An interface_policy key: SOCK (every Unix socket), a socket path, a
    port, or host:port (IPv6 in brackets), as amavisd-new's %interface_policy."""
    if key == "SOCK" or key.startswith("/"):
        return key
    if key.isascii() and key.isdigit():
        if not 0 < int(key) < 65536:
            raise ValueError(f"bad port {key!r}")
        return str(int(key))
    try:
        host, port = parse_host_port(key)
    except AddressError:
        raise ValueError(f"{key!r}: use SOCK, a socket path, a port or host:port") from None
    return door_key(host, port)


def door_key(host: str, port: int) -> str:
    """host:port as interface_policy keys and the listeners spell it."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def interface_policy(value: list[str]) -> list[str]:
    return _pairs(value, door, "SOCK|PORT|HOST:PORT|/socket/path")


def network(entry: str) -> str:
    """[!]CIDR or address; amavisd-new's [::1] and [fe80::]/10 too. Normalised."""
    text = str(entry).strip()
    negate = text.startswith("!")
    text = text[1:].strip() if negate else text
    addr, slash, bits = text.partition("/")
    if addr.startswith("[") and addr.endswith("]"):
        addr = addr[1:-1]
    try:
        net = ipaddress.ip_network(addr + slash + bits, strict=False)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP network (e.g. 10.0.0.0/8, ::1)") from None
    return ("!" if negate else "") + str(net)


def networks(value: list[str]) -> list[str]:
    return [network(entry) for entry in value]


_SPEC_CHARS = re.compile(r"[^\s,=<>()\[\];\\\"]+")


def address_spec(entry: str) -> str:
    """A recipient lookup key, lowercased: user@domain, user@, domain,
    .domain (it and its subdomains), "." (everyone), @domain (= domain);
    "!" in front makes a match say no."""
    text = str(entry).strip().lower()
    negate = text.startswith("!")
    body = text[1:] if negate else text
    if body.startswith("@"):
        body = body[1:]
    if not body or _SPEC_CHARS.fullmatch(body) is None or body.count("@") > 1 or (
            "@" not in body and body != "." and (".." in body or body.endswith("."))):
        raise ValueError(f"{entry!r}: use user@domain, user@, domain or .domain")
    return ("!" if negate else "") + body


def address_specs(value: list[str]) -> list[str]:
    return [address_spec(entry) for entry in value]


def recipient_key(key: str) -> str:
    if key.startswith("!"):
        raise ValueError(f"{key!r}: a recipient_policy key cannot be negated")
    return address_spec(key)


def recipient_policy(value: list[str]) -> list[str]:
    return _pairs(value, recipient_key, "ADDRESS|DOMAIN|.DOMAIN")


def policy_bank_tables(settings: Mapping[str, Setting]) -> Callable[[dict[str, Any]], dict]:
    """The validator of [policy_banks.NAME] tables: every key a setting of
    BANK_SECTIONS, every value checked by that setting's own row. `settings`
    is the table's BY_NAME (given by table.py, which this module may not import)."""

    def check(tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, table in tables.items():
            if not is_bank_name(name):
                raise ValueError(f"policy_banks.{name}: bad policy bank name (letters, digits "
                                 "and . _ + : -)")
            if not isinstance(table, dict):
                raise ValueError(f"policy_banks.{name}: must be a table of settings")
            bank: dict[str, Any] = {}
            for key, value in table.items():
                setting = settings.get(key)
                if setting is None or setting.section not in BANK_SECTIONS:
                    raise ValueError(f"policy_banks.{name}: unknown key {key!r} (a bank sets "
                                     f"keys of [{'], ['.join(BANK_SECTIONS)}])")
                try:
                    bank[key] = coerce(setting, value, f"policy_banks.{name}.{key}")
                except ConfigError as err:
                    raise ValueError(str(err)) from None
            out[name] = bank
        return out

    return check
