# SPDX-License-Identifier: MIT
"""The soak's verdict on itself and its Markdown summary (var/soak-summary.md).

"Flat" is judged of the workers alive at start and at end (a recycled worker
is a new process), with room for noise: descriptors may differ by
`FD_SLACK`, the median worker PSS and the master's PSS may grow by
`MEMORY_SLACK` and `MEMORY_FLOOR_KB` at most.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.soak.probe import Snapshot

__all__ = ["Outcome", "summary"]

FD_SLACK = 2
MEMORY_SLACK = 1.25
MEMORY_FLOOR_KB = 4096


def _flat(start: int, end: int) -> bool:
    return end <= start * MEMORY_SLACK + MEMORY_FLOOR_KB


@dataclass
class Outcome:
    opts: dict[str, Any]
    calibration: Counter = field(default_factory=Counter)
    calibration_seconds: float = 0.0
    counts: Counter = field(default_factory=Counter)
    checks: list = field(default_factory=list)
    seconds: float = 0.0
    killed: int = 0
    workers_seen: int = 0
    workers_spawned: int = 0
    retired: int = 0  # workers that left by themselves (max_requests): "worker N exited"
    start: Snapshot | None = None
    end: Snapshot | None = None
    leftovers_idle: list[str] = field(default_factory=list)
    leftovers_stopped: list[str] = field(default_factory=list)
    zombies: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def all_checks(self) -> list[tuple[str, bool, Any]]:
        checks = list(self.checks)
        if not checks:
            checks.append(("the soak ran to its end", False, "no count was made"))
        s, e = self.start, self.end
        if s and e:
            checks += [
                ("master fds flat", e.master_fds <= s.master_fds + FD_SLACK,
                 f"{s.master_fds} -> {e.master_fds}"),
                ("worker fds flat (max)", e.worker_fds[2] <= s.worker_fds[2] + FD_SLACK,
                 f"{s.worker_fds} -> {e.worker_fds}"),
                ("worker PSS flat (median)", _flat(s.worker_pss_kb[1], e.worker_pss_kb[1]),
                 f"{s.worker_pss_kb} -> {e.worker_pss_kb} kB"),
                ("master PSS flat", _flat(s.master_pss_kb, e.master_pss_kb),
                 f"{s.master_pss_kb} -> {e.master_pss_kb} kB"),
            ]
        expected_kills = self.opts["kill_every"] > 0 and self.seconds > self.opts["kill_every"]
        checks += [
            ("workers were killed", self.killed > 0 or not expected_kills, self.killed),
            ("workers recycled after max_requests (where kills leave them time to)",
             self.retired > 0 or not self._recycling_expected(),
             f"{self.retired} retired, {self.workers_spawned} spawned, {self.killed} killed"),
            ("work and temp bases empty while idle", not self.leftovers_idle,
             self.leftovers_idle),
            ("work and temp bases empty after stop", not self.leftovers_stopped,
             self.leftovers_stopped),
            ("no zombie processes", not self.zombies, self.zombies),
            ("no process of the daemon left after stop", not self.survivors, self.survivors),
            ("the daemon stopped with status 0", self.exit_code == 0, self.exit_code),
        ]
        return checks

    def _recycling_expected(self) -> bool:
        """A worker gets max_requests in before a kill only if, on average, its
        life between kills (kill_every x workers) at its share of the rate lasts."""
        rate = self.counts["sent"] / self.seconds if self.seconds else 0.0
        per_worker = self.counts["sent"] / max(1, self.opts["workers"])
        lives = self.opts["kill_every"] * rate if self.opts["kill_every"] else per_worker
        return min(lives, per_worker) > self.opts["max_requests"] * 1.2

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.all_checks())


def _detail(value: Any) -> str:
    if isinstance(value, list):
        shown = "; ".join(str(v) for v in value[:5])
        return f"{len(value)}: {shown}" + (" ..." if len(value) > 5 else "") if value else ""
    return str(value)


def summary(outcome: Outcome) -> str:
    o, c = outcome.opts, outcome.counts
    rate = c["sent"] / outcome.seconds if outcome.seconds else 0.0
    lines = [
        "# Soak summary", "",
        f"{c['sent']} messages through the SMTP content filter at concurrency "
        f"{o['concurrency']}, {o['workers']} workers recycling every {o['max_requests']} "
        f"requests, one SIGKILLed every {o['kill_every']} s; corpus: {o['corpus']}.",
        f"Soak: {outcome.seconds:.0f} s ({rate:.1f} msgs/s); calibration of "
        f"{sum(outcome.calibration.values())} corpus files first ({outcome.calibration_seconds:.0f} s"
        f", {dict(sorted(outcome.calibration.items()))}).",
        f"Workers: {outcome.killed} killed, {outcome.retired} retired, "
        f"{outcome.workers_spawned} spawned, "
        f"{outcome.workers_seen} seen in all; daemon log errors/tracebacks: "
        f"{len(outcome.log_errors)}.", *(f"    {line}" for line in outcome.log_errors[:3]), "",
        "| count | value |", "|---|---:|",
    ]
    lines += [f"| {name} | {value} |" for name, value in sorted(c.items())]
    lines += ["", "| processes | workers | worker PSS MiB min/med/max | worker fds min/med/max "
              "| master RSS MiB | master PSS MiB | master fds |", "|---|---|---|---|---|---|---|"]
    for name, snap in (("start", outcome.start), ("end", outcome.end)):
        if snap:
            lines.append(f"| {name} | " + " | ".join(snap.row()) + " |")
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    for name, passed, detail in outcome.all_checks():
        lines.append(f"| {name} | {'ok' if passed else '**FAILED**'} | {_detail(detail)} |")
    lines += ["", f"**{'PASSED' if outcome.ok else 'FAILED'}**", ""]
    return "\n".join(lines)
