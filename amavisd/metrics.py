"""The one seam for instrumentation: the rest of the code calls these verbs.

Counts live in this process for now (`amavisd status` and tests read them);
the Prometheus exporter, when it comes, changes only this module.
"""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()


def scanner_failed(scanner: str) -> None:
    COUNTS[f"scanner_failures:{scanner}"] += 1
