"""Which scanners look at a message, and what their answers add up to.

`primary` scanners are asked first: all of them (`primary_mode = "all"`) or
in order until one answers (`"first"`). `backup` scanners are asked only
when every primary failed, and for the parts the answering scanners could
not take (over clamd's StreamMaxLength, say). A failure is logged with its
reason, counted, and the scanner rests for `scanner_retry_after` seconds
before it is tried again, so a hung clamd costs one timeout, not one per
message; when it answers again it is used again, without a restart.
`close()` ends what scanners keep between messages (clamd's session), for a
worker that retires or leaves.

If no scanner answered, `scan()` raises `ScannerError`: the pipeline turns
that into a tempfail (the MTA keeps the mail and retries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amavisd import metrics
from amavisd.decode.parts import Part
from amavisd.scan.base import Health, Scanner, ScannerError, ScanReport
from amavisd.scan.clamd import ClamdScanner
from amavisd.scan.commandline import CommandScanner
from amavisd.scan.definitions import (
    BUILTIN,
    check_definitions,  # noqa: F401  (the tests' vocabulary)
    command_definition,
)
from amavisd.verdict import Finding

log = logging.getLogger("amavisd.scan")


@dataclass
class ScanOutcome:
    findings: list[Finding] = field(default_factory=list)
    missed: dict[str, str] = field(default_factory=dict)  # part path -> why nobody scanned it
    answered: list[str] = field(default_factory=list)  # scanners that answered
    failures: list[str] = field(default_factory=list)  # "name: reason"


class ScannerSet:
    def __init__(self, primary: Sequence[Scanner], backup: Sequence[Scanner] = (),
                 mode: str = "all", retry_after: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.primary = list(primary)
        self.backup = list(backup)
        self.mode = mode
        self.retry_after = retry_after
        self.clock = clock
        self.resting: dict[str, float] = {}  # scanner name -> when it may be tried again

    @property
    def all(self) -> list[Scanner]:
        return self.primary + self.backup

    def scan(self, parts: Sequence[Part]) -> ScanOutcome:
        outcome = ScanOutcome()
        reports = self._ask(self.primary, parts, outcome, first_only=self.mode == "first")
        if reports:
            missed = _missed_by_all(reports)
        else:
            missed = {p.path: "no primary scanner answered" for p in parts}
        if missed and self.backup:
            retry = [p for p in parts if p.path in missed]
            backup_reports = self._ask(self.backup, retry, outcome, first_only=True)
            if backup_reports:
                reports += backup_reports
                still = _missed_by_all(backup_reports)
                missed = {path: f"{missed[path]}; {why}" for path, why in still.items()}
        if not reports:
            raise ScannerError("no virus scanner answered: " + "; ".join(outcome.failures))
        for report in reports:
            outcome.findings.extend(report.findings)
        outcome.missed = missed
        return outcome

    def _ask(self, scanners: Sequence[Scanner], parts: Sequence[Part], outcome: ScanOutcome,
             first_only: bool) -> list[ScanReport]:
        reports: list[ScanReport] = []
        now = self.clock()
        awake = [s for s in scanners if self.resting.get(s.name, 0.0) <= now]
        # A resting scanner is still tried when nothing else in its list is awake.
        candidates = awake or list(scanners)
        for scanner in candidates:
            started = time.monotonic()
            try:
                report = scanner.scan(parts)
            except ScannerError as err:
                metrics.scanner_request(scanner.name, time.monotonic() - started, err)
                self._failed(scanner, str(err), outcome)
                continue
            metrics.scanner_request(scanner.name, time.monotonic() - started)
            if scanner.name in self.resting:
                log.info("scanner %s answers again", scanner.name)
                del self.resting[scanner.name]
            outcome.answered.append(scanner.name)
            reports.append(report)
            if first_only:
                break
        return reports

    def _failed(self, scanner: Scanner, reason: str, outcome: ScanOutcome) -> None:
        outcome.failures.append(f"{scanner.name}: {reason}")
        self.resting[scanner.name] = self.clock() + self.retry_after
        metrics.scanner_failed(scanner.name)
        log.warning("scanner %s failed: %s", scanner.name, reason)

    def health(self) -> list[Health]:
        return [scanner.health() for scanner in self.all]

    def close(self) -> None:
        """Let go of what scanners keep between messages (clamd's session):
        a worker calls this when it retires or leaves."""
        for scanner in self.all:
            close = getattr(scanner, "close", None)  # a command scanner keeps nothing
            if close is not None:
                close()


def _missed_by_all(reports: Sequence[ScanReport]) -> dict[str, str]:
    """Parts that no answering scanner could take (one that any scanner saw is covered)."""
    common = set(reports[0].missed)
    for report in reports[1:]:
        common &= set(report.missed)
    return {path: "; ".join(r.missed[path] for r in reports if path in r.missed)
            for path in sorted(common)}


# -- building them from the configuration ---------------------------------------

def _clamd(name: str, spec: Mapping[str, Any], config: Mapping[str, Any]) -> Scanner:
    return ClamdScanner(spec.get("address", config["clamd"]),
                        timeout=float(spec.get("timeout", config["clamd_timeout"])),
                        max_stream=int(spec.get("max_stream", config["clamd_max_stream"])),
                        name=name)


def _command(name: str, spec: Mapping[str, Any], config: Mapping[str, Any]) -> Scanner:
    # Parts are written in the daemon's own work base (0700), never in the
    # temp base, where clients could reach them.
    return CommandScanner(name, command_definition(spec), tempbase=config.get("work_base_path"))


# The registry: a [scanners.NAME] table's `type` -> what builds it. The keys
# each type takes are in definitions.TYPE_KEYS, where the config checks them
# (a test keeps the two alike).
SCANNER_TYPES: dict[str, Callable[[str, Mapping[str, Any], Mapping[str, Any]], Scanner]] = {
    "clamd": _clamd,
    "command": _command,
}


def build_scanner_set(config: Mapping[str, Any]) -> ScannerSet:
    definitions = BUILTIN | config.get("scanners", {})
    env = dict(config) | {"work_base_path": getattr(config, "work_base_path", None)}

    def make(name: str) -> Scanner:
        spec = definitions[name]
        return SCANNER_TYPES[spec["type"]](name, spec, env)

    return ScannerSet([make(n) for n in config["primary_scanners"]],
                      [make(n) for n in config["backup_scanners"]],
                      mode=config["primary_mode"], retry_after=config["scanner_retry_after"])
