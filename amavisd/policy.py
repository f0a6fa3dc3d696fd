"""Policy: from a verdict category to a destiny.

For now one configurable destiny for INFECTED mail; banned-file rules and a
destiny per category (and per UNCHECKED reason) extend this table. A message
we could not check never gets PASS by accident: UNCHECKED maps to TEMPFAIL
until a postmaster says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amavisd.verdict import Category, Destiny


def destinies(config: Mapping[str, Any]) -> dict[Category, Destiny]:
    return {
        Category.CLEAN: Destiny.PASS,
        Category.UNCHECKED: Destiny.TEMPFAIL,
        Category.BANNED: Destiny(config["virus_destiny"]),
        Category.INFECTED: Destiny(config["virus_destiny"]),
    }
