"""The scanner interface: hand parts to a virus scanner, get findings back.

A scanner either returns findings (empty = it looked and found nothing) or
raises `ScannerError`. It never returns "clean" for something it did not
see: errors, size limits and timeouts are failures, not verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from amavisd.decode.parts import Part
from amavisd.verdict import Finding


class ScannerError(Exception):
    """The scanner could not check the parts (down, timeout, limit, protocol error)."""


class Scanner(Protocol):
    name: str

    def scan(self, parts: Sequence[Part]) -> list[Finding]: ...
