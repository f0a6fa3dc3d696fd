"""Command-line flags from the settings table (`amavisd run --help`).

A row with `flags` becomes a flag; a value not given stays absent, so the
file's value (or the default) stands. `overrides_from` hands what was given
to `loading.load`, which checks it like any other value.
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
        else:
            # lists are given comma-separated; coerce() splits them
            parser.add_argument(*s.flags, dest=s.name, type=str if s.type is list else s.type,
                                metavar=s.metavar,
                                default=argparse.SUPPRESS, help=s.help)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {name: value for name, value in vars(args).items() if name in BY_NAME}
