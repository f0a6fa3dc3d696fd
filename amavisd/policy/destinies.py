"""Policy: from a verdict category to a destiny.

One configurable destiny for INFECTED (and, until banned rules exist,
BANNED) mail and one for UNCHECKED; a destiny per UNCHECKED reason extends
this table. A message we could not check never gets PASS unless a postmaster
configures exactly that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amavisd.verdict import Category, Destiny


def destinies(config: Mapping[str, Any]) -> dict[Category, Destiny]:
    return {
        Category.CLEAN: Destiny.PASS,
        Category.UNCHECKED: Destiny(config["unchecked_destiny"]),
        Category.BANNED: Destiny(config["virus_destiny"]),
        Category.INFECTED: Destiny(config["virus_destiny"]),
    }
