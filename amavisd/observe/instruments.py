"""The metrics: Prometheus names (amavisd_ prefix, units in the name, _total
counters), their labels and how each verb of `amavisd.metrics` feeds them.

Imported by `metrics.setup()` only, after PROMETHEUS_MULTIPROC_DIR is set:
prometheus_client picks its storage when it is imported. Every process
writes its own files in that dir (the library keys them by pid and starts
afresh after a fork); this module adds what a forked worker needs before
its first count: its files allocated on disk (an mmap'd page that a full
disk cannot give is SIGBUS, not an exception), and its slot.

Label values are bounded (`labels.py`): verdicts, destinies, stages, kinds
and causes come from fixed vocabularies; ingresses, scanner names and
banned rules from the configuration; detected types from our detector's
table; virus names are capped here and cut to the top N at export
(`collect.py`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from amavisd import failures
from amavisd.observe.labels import OTHER, Bounded, Closed
from amavisd.observe.slots import Slot
from amavisd.verdict import Unchecked

ENV = "PROMETHEUS_MULTIPROC_DIR"
FILE_SIZE = 1 << 16  # what prometheus_client's mmap starts at; allocated up front

VERDICTS = ("CLEAN", "UNCHECKED", "BANNED", "INFECTED", "TEMPFAIL")
DESTINIES = ("pass", "discard", "bounce", "reject", "tempfail")
STAGES = ("spool", "decode", "scan", "act")
EXIT_CAUSES = ("max_requests", "child_timeout", "crash", "reload", "stop", "killed",
               "boot_error")
OUTCOMES = ("ok", "failed")
# The classes of failure a reply may name (amavisd.failures) -> the cause label.
TEMPFAIL_CAUSES = {
    failures.SCANNER_UNAVAILABLE: "scanner_unavailable",
    failures.LOCAL_PROBLEM: "local_problem",
    failures.MESSAGE_UNREADABLE: "message_unreadable",
    failures.QUARANTINE_UNAVAILABLE: "quarantine_unavailable",
    failures.TIME_EXCEEDED: "child_timeout",
    failures.INTERNAL_ERROR: "internal_error",
    failures.RELAY_TEMPFAIL: "relay_tempfail",
    failures.RELAY_REJECTED: "relay_rejected",
}

# Seconds: a message takes milliseconds to minutes (child_timeout is 300 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)

DETECTION_NAMES_PER_PROCESS = 200  # distinct virus names one worker keeps apart
RULES_PER_PROCESS = 100  # banned rules (the config's, a few dozen)
TYPES_PER_PROCESS = 100  # detected types (our detector's table, a few dozen)
NAMES_PER_PROCESS = 32  # ingresses, scanners: a handful, from the config

_live: list[Instruments] = []  # for the fork hook


def _after_fork() -> None:
    for instruments in _live:
        instruments.forked()


os.register_at_fork(after_in_child=_after_fork)


class Instruments:
    """The metric objects, and the per-process state a verb needs."""

    def __init__(self) -> None:
        self.directory = os.environ[ENV]
        self.messages = _counter("amavisd_messages", "Messages answered, by ingress, verdict "
                                 "and destiny.", "ingress", "verdict", "destiny")
        self.received = _counter("amavisd_received_bytes", "Bytes of messages received.",
                                 "ingress")
        self.duration = _histogram("amavisd_message_duration_seconds", "Time from request "
                                   "to verdict, per message.", "ingress")
        self.stages = _histogram("amavisd_stage_duration_seconds", "Time per stage of a "
                                 "message: spool, decode, scan, act.", "stage")
        self.parts = _counter("amavisd_parts_decoded", "Parts decoded, by the type detected "
                              "from their content.", "type")
        self.unchecked_kinds = _counter("amavisd_unchecked", "Messages with a part not fully "
                                        "checked, by kind of UNCHECKED.", "kind")
        self.banned = _counter("amavisd_banned_hits", "Messages a banned rule hit, by rule.",
                               "rule")
        self.detections = _counter("amavisd_detections", "Messages a virus was found in, by "
                                   "name (the top names; the rest as other).", "name")
        self.scanner_requests = _counter("amavisd_scanner_requests", "Requests to a scanner "
                                         "(one per message and scanner).", "scanner")
        self.scanner_errors = _counter("amavisd_scanner_errors", "Requests a scanner failed "
                                       "(timeouts included).", "scanner")
        self.scanner_timeouts = _counter("amavisd_scanner_timeouts", "Requests a scanner did "
                                         "not answer in time.", "scanner")
        self.scanner_latency = _histogram("amavisd_scanner_duration_seconds", "Time a "
                                          "scanner took on one message.", "scanner")
        self.scanner_success = Gauge("amavisd_scanner_last_success_timestamp_seconds",
                                     "When a scanner last answered (Unix time).", ["scanner"],
                                     multiprocess_mode="max", registry=None)
        self.exits = _counter("amavisd_worker_exits", "Workers reaped by the master, by "
                              "cause.", "cause")
        self.tempfails = _counter("amavisd_tempfails", "Tempfail answers, by cause (a "
                                  "verdict's, or a forward's after a pass; LMTP: one a "
                                  "recipient).", "cause")
        self.quarantine = _counter("amavisd_quarantine_writes", "Messages written to the "
                                   "quarantine, by outcome.", "outcome")
        self.notifications = _counter("amavisd_notifications", "Notifications (admin alerts, "
                                      "DSNs, recipient notices) sent, by outcome.", "outcome")
        self.ingress_label = Bounded(NAMES_PER_PROCESS)
        self.scanner_label = Bounded(NAMES_PER_PROCESS)
        self.type_label = Bounded(TYPES_PER_PROCESS)
        self.rule_label = Bounded(RULES_PER_PROCESS)
        self.name_label = Bounded(DETECTION_NAMES_PER_PROCESS)
        self.verdict_label = Closed(VERDICTS)
        self.destiny_label = Closed(DESTINIES)
        self.stage_label = Closed(STAGES)
        self.kind_label = Closed(Unchecked.KINDS)
        self.cause_label = Closed(EXIT_CAUSES)
        self.tempfail_label = Closed(TEMPFAIL_CAUSES.values())
        self._children: dict[tuple, Any] = {}
        self.forked()
        _live.append(self)

    def forked(self) -> None:
        """A new process: its own files, slot, ingress and clock."""
        self.pid = os.getpid()
        self.files_ready = False
        self.slot: Slot | None = None
        self.ingress = "none"
        self.request_started: float | None = None
        self.lap_started: float | None = None
        self.answered: dict[str, float] = {}  # scanner -> last success written

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached (the library's lookup takes a lock)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            if not self.files_ready:
                self.allocate_files()
            found = self._children[key] = metric.labels(*labels)
        return found

    def allocate_files(self) -> None:
        """Give this process's files their first 64 KiB on disk before the
        library maps them: a sparse page the disk cannot back kills the
        process (SIGBUS) at the write; here it is an OSError, logged."""
        self.files_ready = True
        for prefix in ("counter", "histogram", "gauge_max"):
            path = os.path.join(self.directory, f"{prefix}_{self.pid}.db")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size == 0:
                    os.posix_fallocate(fd, 0, FILE_SIZE)
            finally:
                os.close(fd)

    # -- messages --------------------------------------------------------------

    def connected(self, ingress: str) -> None:
        self.ingress = self.ingress_label(ingress)

    def message(self, ingress: str, verdict: str, destiny: str, size: int,
                seconds: float) -> None:
        ingress = self.ingress_label(ingress)
        self.child(self.messages, ingress, self.verdict_label(verdict),
                   self.destiny_label(destiny)).inc()
        if size > 0:
            self.child(self.received, ingress).inc(size)
        self.child(self.duration, ingress).observe(max(0.0, seconds))

    def finished(self, result: Any) -> None:
        if self.request_started is not None:  # end to end, as the worker saw it
            seconds = time.monotonic() - self.request_started
        else:
            seconds = result.elapsed_ms / 1000
        self.message(self.ingress, result.verdict, result.destiny.value, result.size, seconds)
        for kind in {getattr(u, "kind", "limit") for u in result.unchecked}:
            self.unchecked(kind)
        for rule in {hit.rule_text for hit in result.banned_hits}:
            self.banned_hit(rule)
        for name in result.viruses:
            self.detection(name)
        if result.category is None:
            self.tempfail(result.public_reason or failures.LOCAL_PROBLEM)
        if result.tree is not None:
            self.parts_decoded(part.detected for part in _walk(result.tree))

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        started = self.lap_started if self.lap_started is not None else self.request_started
        self.lap_started = now
        if started is not None:
            self.stage(stage, now - started)

    def stage(self, name: str, seconds: float) -> None:
        self.child(self.stages, self.stage_label(name)).observe(max(0.0, seconds))

    def parts_decoded(self, types: Iterable[str]) -> None:
        counts: dict[str, int] = {}
        for detected in types:
            counts[detected] = counts.get(detected, 0) + 1
        labelled: dict[str, int] = {}
        for detected, count in counts.items():
            label = self.type_label(detected or "unknown")
            labelled[label] = labelled.get(label, 0) + count
        for label, count in labelled.items():
            self.child(self.parts, label).inc(count)

    def unchecked(self, kind: str) -> None:
        self.child(self.unchecked_kinds, self.kind_label(kind)).inc()

    def banned_hit(self, rule: str) -> None:
        self.child(self.banned, self.rule_label(rule)).inc()

    def detection(self, name: str) -> None:
        self.child(self.detections, self.name_label(name)).inc()

    def tempfail(self, cause: str) -> None:
        label = TEMPFAIL_CAUSES.get(cause, cause)
        self.child(self.tempfails, self.tempfail_label(label)).inc()

    # -- scanners --------------------------------------------------------------

    def scanner_request(self, scanner: str, seconds: float,
                        error: BaseException | None) -> None:
        name = self.scanner_label(scanner)
        self.child(self.scanner_requests, name).inc()
        self.child(self.scanner_latency, name).observe(max(0.0, seconds))
        # Both at zero from the first request, so error ratios exist; errors
        # themselves are counted by scanner_failed, where the set gives up on it.
        self.child(self.scanner_errors, name)
        timeouts = self.child(self.scanner_timeouts, name)
        if error is None:
            now = time.time()
            if now - self.answered.get(name, 0.0) >= 1.0:  # a second is fine enough
                self.answered[name] = now
                self.child(self.scanner_success, name).set(now)
        elif is_timeout(error):
            timeouts.inc()

    def scanner_failed(self, scanner: str) -> None:
        self.child(self.scanner_errors, self.scanner_label(scanner)).inc()

    # -- actions, workers --------------------------------------------------------

    def quarantine_write(self, ok: bool) -> None:
        self.child(self.quarantine, OUTCOMES[not ok]).inc()

    def notification(self, ok: bool) -> None:
        self.child(self.notifications, OUTCOMES[not ok]).inc()

    def worker_busy(self, log_id: str, queue_id: str) -> None:
        self.request_started = time.monotonic()
        self.lap_started = None
        if self.slot is None:
            self.slot = Slot(self.directory)
        self.slot.busy(log_id, queue_id)

    def worker_idle(self) -> None:
        self.request_started = self.lap_started = None
        if self.slot is not None:
            self.slot.idle()

    def worker_exit(self, cause: str) -> None:
        self.child(self.exits, self.cause_label(cause)).inc()

    def declare(self) -> None:
        """The series a dashboard or an alert divides by, present from the start
        (an absent series makes a ratio empty rather than 0)."""
        for cause in EXIT_CAUSES:
            self.child(self.exits, cause)
        for cause in TEMPFAIL_CAUSES.values():
            self.child(self.tempfails, cause)
        for kind in Unchecked.KINDS:
            self.child(self.unchecked_kinds, kind)
        for outcome in OUTCOMES:
            self.child(self.quarantine, outcome)
            self.child(self.notifications, outcome)
        self.child(self.detections, OTHER)


def _counter(name: str, documentation: str, *labels: str) -> Counter:
    return Counter(name, documentation, labels, registry=None)  # collect.py reads the files


def _histogram(name: str, documentation: str, *labels: str) -> Histogram:
    return Histogram(name, documentation, labels, buckets=LATENCY_BUCKETS, registry=None)


def is_timeout(error: BaseException) -> bool:
    """A scanner error that was a timeout: the exception, or the one it was
    raised from or during (socket timeouts, a command-line scanner's
    subprocess.TimeoutExpired)."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, TimeoutError) or type(error).__name__ == "TimeoutExpired":
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def _walk(root: Any) -> Iterable[Any]:
    todo = [root]
    while todo:
        part = todo.pop()
        yield part
        todo.extend(getattr(part, "children", ()))
