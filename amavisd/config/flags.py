"""Command-line flags from the settings table (`amavisd run --help`).

A row with `flags` becomes a flag; a value not given stays absent, so the
file's value (or the default) stands. A list setting's flag may be given
several times, each a value or a comma-separated list, and they add up
(`--smtp-listen 127.0.0.1:10024 --smtp-listen lmtp:127.0.0.1:10026`); they
replace the file's list, as any flag replaces its value. `overrides_from`
hands what was given to `loading.load`, which checks it like any other value.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from amavisd.config.table import BY_NAME, SETTINGS


def add_flags(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """Add each setting's flags; values not given stay absent (argparse.SUPPRESS)."""
    wanted = set(only) if only is not None else None
    for s in SETTINGS:
        if not s.flags or (wanted is not None and s.name not in wanted):
            continue
        if s.type is bool:
            parser.add_argument(*s.flags, dest=s.name, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=s.help)
            if s.negative_flag:
                parser.add_argument(s.negative_flag, dest=s.name, action="store_const",
                                    const=False, default=argparse.SUPPRESS,
                                    help=f"the opposite of {s.flags[0]}")
        elif s.type is list:  # repeatable; overrides_from() splits and joins them
            parser.add_argument(*s.flags, dest=s.name, action="append", type=str,
                                metavar=s.metavar, default=argparse.SUPPRESS,
                                help=f"{s.help} (repeatable)")
        else:
            parser.add_argument(*s.flags, dest=s.name, type=s.type, metavar=s.metavar,
                                default=argparse.SUPPRESS, help=s.help)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: value for name, value in vars(args).items() if name in BY_NAME}
    for name, value in given.items():
        if BY_NAME[name].type is list and isinstance(value, list):
            given[name] = [item.strip() for flag in value for item in str(flag).split(",")
                           if item.strip()]
    return given
