"""The scanner interface: hand parts to a virus scanner, get a report back.

A scanner either returns a `ScanReport` (findings, plus the parts it could
not take, e.g. over clamd's StreamMaxLength) or raises `ScannerError` (down,
timeout, protocol error). It never reports "clean" for something it did not
see: errors, size limits and timeouts are failures or misses, not verdicts.
A scanner may keep a connection between messages (clamd's session); a
`close()` method, where it has one, lets go of it when the worker leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from amavisd.decode.parts import Part
from amavisd.verdict import Finding


class ScannerError(Exception):
    """The scanner could not check the parts (down, timeout, limit, protocol error).

    Its text is for the log (it names sockets, errno, the scanner's output);
    a reply says only "virus scanner unavailable" (amavisd.failures)."""


@dataclass
class ScanReport:
    scanner: str
    findings: list[Finding] = field(default_factory=list)
    # part path -> why this scanner could not look at it; another scanner may
    missed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Health:
    scanner: str
    ok: bool
    detail: str  # version and signature date when ok, the error otherwise


class Scanner(Protocol):
    name: str
    timeout: float

    def scan(self, parts: Sequence[Part]) -> ScanReport: ...

    def health(self) -> Health: ...
