"""The one seam for instrumentation: the daemon calls these verbs and knows
nothing of Prometheus.

Off by default (`amavisd scan`, the unit tests, a daemon whose
`metrics_listen` is empty): every verb returns at once. `setup(config)`
turns it on in the master, before anything imports prometheus_client (it
chooses its storage at import): PROMETHEUS_MULTIPROC_DIR points at the
metrics dir, so the master and each worker it forks count into their own
mmap'd files there, and the master's `/metrics` merges them
(`amavisd.observe`). The metrics themselves, their names and label bounds,
are in `observe/instruments.py`.

A verb must never cost a message: it never raises (a failure is logged,
once a process) and never takes a label straight from input (file
names, types and virus names are bounded there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("amavisd.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"

_enabled = False
_instruments: Any = None  # observe.instruments.Instruments, once enabled
_failed: set[str] = set()  # verbs that raised here: logged once


def metrics_dir(config: Any) -> str:
    """Where the processes keep their counts (<workdir>/metrics by default)."""
    return config["metrics_dir"] or os.path.join(config["workdir"], "metrics")


def setup(config: Any) -> bool:
    """Turn the verbs on for this process and those it forks, when
    `metrics_listen` is set. Called by the master before the preload, so the
    library is imported (with the multiprocess storage) while we are root.
    Returns whether metrics are on."""
    global _enabled, _instruments
    if not config["metrics_listen"]:
        return False
    os.environ[ENV] = metrics_dir(config)
    from prometheus_client import values

    if not values.ValueClass._multiprocess:  # imported too early: choose again, now
        values.ValueClass = values.get_value_class()
    from amavisd.observe import instruments

    _instruments = instruments.Instruments()
    _enabled = True
    return True


def disable() -> None:
    """Back to no-ops (tests; a daemon that could not make its metrics dir)."""
    global _enabled, _instruments
    _enabled, _instruments = False, None
    os.environ.pop(ENV, None)


def enabled() -> bool:
    return _enabled


def _call(verb: str, *args: Any) -> None:
    if not _enabled:
        return
    try:
        getattr(_instruments, verb)(*args)
    except Exception as err:  # counting must never cost a message
        if not _failed:
            log.exception("metrics: %s failed (further failures of this process are "
                          "logged at debug level)", verb)
        elif verb not in _failed:
            log.debug("metrics: %s failed: %s", verb, err)
        _failed.add(verb)


os.register_at_fork(after_in_child=_failed.clear)  # a worker says it once for itself


# -- messages ---------------------------------------------------------------------


def connected(ingress: str) -> None:
    """A connection on a listener of this protocol ("ampdp", "smtp", ...):
    the ingress label of the messages that follow in this process."""
    _call("connected", ingress)


def message(ingress: str, verdict: str, destiny: str, size: int, seconds: float) -> None:
    """One message answered: its verdict, destiny, bytes and time end to end."""
    _call("message", ingress, verdict, destiny, size, seconds)


def finished(result: Any) -> None:
    """One message answered, from its `verdict.Result`: `message()` under the
    connection's ingress, plus its parts' types, kinds of UNCHECKED, banned
    rules, virus names and tempfail cause. The one call an ingress needs."""
    _call("finished", result)


def lap(stage: str) -> None:
    """The stage just done (spool, decode, scan, act) took the time since
    the previous lap, or since the request began (`worker_busy`)."""
    _call("lap", stage)


def stage(name: str, seconds: float) -> None:
    _call("stage", name, seconds)


def parts_decoded(types: Iterable[str]) -> None:
    """Parts of a message by the type detected from their content."""
    _call("parts_decoded", types)


def unchecked(kind: str) -> None:
    _call("unchecked", kind)


def banned_hit(rule: str) -> None:
    _call("banned_hit", rule)


def detection(name: str) -> None:
    """A virus name found (the export keeps the top names, the rest as other)."""
    _call("detection", name)


def tempfail(cause: str) -> None:
    """A tempfail, by its class of failure (amavisd.failures' reply texts)."""
    _call("tempfail", cause)


# -- scanners ---------------------------------------------------------------------


def scanner_request(scanner: str, seconds: float, error: BaseException | None = None) -> None:
    """One request to a scanner and how long it took; `error` when it failed
    (a timeout is told from the exception it came from). Errors themselves
    are counted by `scanner_failed`, where the scanner set gives up on it."""
    _call("scanner_request", scanner, seconds, error)


def scanner_failed(scanner: str) -> None:
    _call("scanner_failed", scanner)


# -- actions ----------------------------------------------------------------------


def quarantine_write(ok: bool) -> None:
    _call("quarantine_write", ok)


def notification(ok: bool) -> None:
    _call("notification", ok)


# -- workers ----------------------------------------------------------------------


def worker_busy(log_id: str, queue_id: str = "") -> None:
    """This worker took a request (its slot on the status board says so)."""
    _call("worker_busy", log_id, queue_id)


def worker_idle() -> None:
    _call("worker_idle")


def worker_exit(cause: str) -> None:
    """The master reaped a worker: max_requests, child_timeout, crash, reload,
    stop, killed or boot_error."""
    _call("worker_exit", cause)


def declare() -> None:
    """The master, at start: the series dashboards and alerts divide by,
    present at zero before anything happened."""
    _call("declare")
