"""Reading the settings: defaults, then the TOML file, then the command line.

`load` is the one way a `Config` is made (the CLI, the master on HUP, the
tests): every value passes `coerce` against its row of the table, every
`[scanners.NAME]` table its schema, and then the checks that span several
keys (scanner names defined, the work base out of the clients' reach). A
problem is one `ConfigError` line naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from amavisd.config.setting import ConfigError, coerce
from amavisd.config.table import BY_NAME, SECTIONS, SETTINGS, TABLE_SECTIONS
from amavisd.config.validators import BUILTIN_BANKS
from amavisd.config.values import Config
from amavisd.scan.definitions import BUILTIN

DEFAULT_CONFIG_PATH = "/etc/amavisd/amavisd.toml"


def defaults() -> dict[str, Any]:
    values = {s.name: (list(s.default) if isinstance(s.default, list) else s.default)
              for s in SETTINGS}
    values["scanners"] = {}
    values["policy_banks"] = {}
    return values


def read_toml(path: str) -> dict[str, Any]:
    """Flatten `[section] key = value` into {key: value}, refusing unknown keys."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section in TABLE_SECTIONS and isinstance(table, dict):
            try:
                flat[section] = TABLE_SECTIONS[section](table)
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from None
            continue
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            setting = BY_NAME.get(key)
            if setting is None or setting.section != section:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            flat[key] = coerce(setting, value, f"{path}: {section}.{key}")
    return flat


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the effective config. A missing *default* file means all defaults."""
    values = defaults()
    source = None
    if path is None:
        path = os.environ.get("AMAVISD_CONFIG") or None
    if path is not None:
        values.update(read_toml(path))
        source = path
    elif os.path.exists(DEFAULT_CONFIG_PATH):
        values.update(read_toml(DEFAULT_CONFIG_PATH))
        source = DEFAULT_CONFIG_PATH
    for key, value in (overrides or {}).items():
        if key in TABLE_SECTIONS:
            try:
                values[key] = TABLE_SECTIONS[key](value)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            continue
        setting = BY_NAME[key]
        flag = setting.flags[0] if setting.flags else key
        values[key] = coerce(setting, value, flag)
    check_scanner_names(values, source)
    check_bank_names(values, source)
    config = Config(values, source)
    check_work_base(config)
    return config


def check_work_base(config: Config) -> None:
    """The workers' own dirs must be out of the clients' reach."""
    work = os.path.normpath(config.work_base_path)
    temp = os.path.normpath(config.tempbase_path)
    if os.path.commonpath([work, temp]) in (work, temp):
        where = f"{config.source}: " if getattr(config, "source", None) else ""
        raise ConfigError(f"{where}daemon.work_base {work} must be neither inside nor above "
                          f"the temp base {temp}, which clients may write")


def check_scanner_names(values: dict[str, Any], source: str | None) -> None:
    known = set(BUILTIN) | set(values.get("scanners", {}))
    for key in ("primary_scanners", "backup_scanners"):
        for name in values[key]:
            if name not in known:
                where = f"{source}: scan.{key}" if source else key
                raise ConfigError(f"{where}: no scanner named {name!r} "
                                  f"(define it in a [scanners.{name}] table)")
    if not values["primary_scanners"]:
        raise ConfigError(f"{source + ': ' if source else ''}scan.primary_scanners is empty")


def check_bank_names(values: dict[str, Any], source: str | None) -> None:
    """A bank the config itself names (by listener, by recipient) must be
    defined: a typo would silently switch a policy off. Names a client sends
    (AM.PDP policy_bank=) are another matter: unknown ones are ignored then,
    as amavisd-new does."""
    banks = values.get("policy_banks", {})
    known = set(BUILTIN_BANKS) | set(banks)
    places = [("daemon.interface_policy", values.get("interface_policy", [])),
              ("policy.recipient_policy", values.get("recipient_policy", []))]
    places += [(f"policy_banks.{bank}.recipient_policy", table["recipient_policy"])
               for bank, table in banks.items() if "recipient_policy" in table]
    for where, entries in places:
        for entry in entries:
            name = entry.rpartition("=")[2]
            if name not in known:
                place = f"{source}: {where}" if source else where
                raise ConfigError(f"{place}: no policy bank named {name!r} "
                                  f"(define it in a [policy_banks.{name}] table)")
