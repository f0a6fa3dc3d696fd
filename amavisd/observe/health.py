"""`/healthz`: may a load balancer send mail here?

Healthy when at least one worker is serving and a primary scanner answered
within `FRESH` seconds. Mail itself shows a scanner answering (the workers'
`amavisd_scanner_last_success_timestamp_seconds`); when no mail came for a
while, the master asks the primary scanners itself (their `health()`, a
VERSION to clamd), at most once every `PROBE_EVERY` seconds, so an idle
server stays healthy and a dead clamd is seen within that time even
without traffic. The probe runs in the HTTP thread, never in the master's
loop, and records its answer in the master's memory, never in the metric
files (a lock the library holds in this thread could be inherited, locked,
by a worker forked meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from amavisd.observe.collect import LAST_SUCCESS, Scrape
from amavisd.scan.scanners import build_scanner_set

log = logging.getLogger("amavisd.observe")

FRESH = 60.0  # seconds since a primary scanner last answered
PROBE_EVERY = 10.0


class Health:
    def __init__(self, scrape: Scrape, config: Any = None):
        self.scrape = scrape
        self.config = config  # the master's, when there is no master (tests)
        self.probed_at = 0.0
        self.probing = threading.Lock()  # one probe at a time; others use its answer
        self._scanners: Any = None
        self._scanners_for: Any = None

    def current_config(self) -> Any:
        master = self.scrape.master
        return master.config if master is not None else self.config

    def last_answers(self) -> dict[str, float]:
        """Scanner -> when it last answered (mail or the master's probe)."""
        answers: dict[str, float] = {}
        for metric in self.scrape.merged():
            if metric.name == LAST_SUCCESS:
                for sample in metric.samples:
                    answers[sample.labels.get("scanner", "")] = sample.value
        return answers

    def check(self, probe: bool = True) -> tuple[bool, str]:
        """(healthy, one line saying why)."""
        if self.scrape.master is not None and not any(
                w["master_state"] == "serving" for w in self.scrape.workers()):
            return False, "no worker is serving"
        config = self.current_config()
        primaries = list(config["primary_scanners"]) if config is not None else []
        now = time.time()
        fresh = self._fresh(primaries, now)
        if not fresh and probe:
            with self.probing:
                if time.time() - self.probed_at >= PROBE_EVERY:
                    self.probe(config)
            fresh = self._fresh(primaries, time.time())
        if fresh:
            return True, f"ok: {', '.join(fresh)} answered"
        return False, (f"no primary scanner ({', '.join(primaries) or 'none configured'}) "
                       f"answered in the last {FRESH:g} s")

    def _fresh(self, primaries: list[str], now: float) -> list[str]:
        answers = self.last_answers()
        return [name for name in primaries if now - answers.get(name, 0.0) <= FRESH]

    def probe(self, config: Any) -> None:
        """Ask each primary scanner for its version; record who answered."""
        self.probed_at = time.time()
        if config is None:
            return
        if self._scanners_for is not config:  # built again after a reload
            self._scanners, self._scanners_for = build_scanner_set(config), config
        for scanner in self._scanners.primary:
            try:
                answer = scanner.health()
            except Exception as err:  # a probe must not take the HTTP thread down
                log.warning("health probe of %s failed: %s", scanner.name, err)
                continue
            if answer.ok:
                self.scrape.probed[scanner.name] = time.time()
            else:
                log.info("health probe: %s: %s", scanner.name, answer.detail)
