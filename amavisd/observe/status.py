"""`amavisd status`: what the running daemon is doing, from the daemon itself.

The master builds the report (`report()`, served as JSON at `/status` on
metrics_listen): its uptime, each worker (pid, state, age, requests served,
the message it is on and for how long), messages by verdict, tempfails by
cause, and each scanner's requests, errors and last answer. The command
fetches it over HTTP (`fetch()`) and prints it (`render()`), or passes the
JSON through with --json. Nothing is guessed from files.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from typing import Any

from amavisd import __version__
from amavisd.observe.collect import LAST_SUCCESS, Scrape
from amavisd.observe.health import Health
from amavisd_client.wire.address import AddressError, parse_host_port


class StatusError(Exception):
    """The daemon could not be asked (not running, metrics_listen off)."""


def report(scrape: Scrape, health: Health) -> dict[str, Any]:
    healthy, why = health.check()
    metrics = {m.name: m for m in scrape.merged()}
    config = health.current_config()
    now = time.time()
    scanners = []
    names = (list(config["primary_scanners"]) + list(config["backup_scanners"])
             if config is not None else [])
    answers = {s.labels.get("scanner"): s.value
               for s in getattr(metrics.get(LAST_SUCCESS), "samples", [])}
    for name in dict.fromkeys(names):
        last = answers.get(name)
        scanners.append({
            "name": name,
            "role": "primary" if name in config["primary_scanners"] else "backup",
            "requests": _count(metrics, "amavisd_scanner_requests", scanner=name),
            "errors": _count(metrics, "amavisd_scanner_errors", scanner=name),
            "timeouts": _count(metrics, "amavisd_scanner_timeouts", scanner=name),
            "last_answer_seconds_ago": round(now - last, 1) if last else None,
        })
    return {
        "version": __version__,
        "master_pid": os.getpid(),
        "uptime_seconds": round(now - scrape.started, 1),
        "healthy": healthy,
        "health": why,
        "workers_configured": config["workers"] if config is not None else None,
        "workers": scrape.workers(),
        "messages": _by(metrics, "amavisd_messages", "verdict"),
        "destinies": _by(metrics, "amavisd_messages", "destiny"),
        "tempfails": _by(metrics, "amavisd_tempfails", "cause", skip_zero=True),
        "worker_exits": _by(metrics, "amavisd_worker_exits", "cause", skip_zero=True),
        "scanners": scanners,
    }


def _samples(metrics: dict[str, Any], name: str):
    metric = metrics.get(name)
    return [s for s in metric.samples if s.name == name + "_total"] if metric else []


def _count(metrics: dict[str, Any], name: str, **labels: str) -> int:
    return int(sum(s.value for s in _samples(metrics, name)
                   if all(s.labels.get(k) == v for k, v in labels.items())))


def _by(metrics: dict[str, Any], name: str, label: str, skip_zero: bool = False
        ) -> dict[str, int]:
    totals: dict[str, int] = {}
    for sample in _samples(metrics, name):
        key = sample.labels.get(label, "")
        totals[key] = totals.get(key, 0) + int(sample.value)
    return {k: v for k, v in sorted(totals.items()) if v or not skip_zero}


# -- the command's side ------------------------------------------------------------


def fetch(address: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET /status from the master listening on host:port (no proxy)."""
    try:
        host, port = parse_host_port(address)
    except AddressError as err:
        raise StatusError(f"metrics_listen: {err}") from None
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/status", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(4 * 1024 * 1024)
    except OSError as err:
        raise StatusError(f"cannot reach the daemon at {address}: {err} "
                          "(is it running, with this metrics_listen?)") from None
    finally:
        connection.close()
    if response.status != 200:
        raise StatusError(f"{address}/status answered {response.status} {response.reason}")
    try:
        return json.loads(body)
    except ValueError:
        raise StatusError(f"{address}/status did not answer JSON") from None


def render(status: dict[str, Any]) -> str:
    """The report for people: a header, one line a worker, totals, scanners."""
    lines = [f"amavisd {status['version']}, master {status['master_pid']}, up "
             f"{duration(status['uptime_seconds'])}: "
             f"{'healthy' if status['healthy'] else 'UNHEALTHY'} ({status['health']})",
             f"workers: {len(status['workers'])} running, "
             f"{status['workers_configured']} configured",
             f"  {'PID':>7}  {'STATE':8}  {'AGE':>8}  {'REQUESTS':>8}  MESSAGE"]
    for worker in status["workers"]:
        message = worker.get("message")
        on = "-"
        if message:
            on = f"{message['log_id']} for {duration(message['seconds'])}"
            if message.get("queue_id"):
                on += f" (Queue-ID {message['queue_id']})"
        lines.append(f"  {worker['pid']:>7}  {worker['state']:8}  "
                     f"{duration(worker['age_seconds']):>8}  {worker['requests']:>8}  {on}")
    lines.append("messages: " + (", ".join(f"{k} {v}" for k, v in status["messages"].items())
                                 or "none yet"))
    if status["tempfails"]:
        lines.append("tempfails: " + ", ".join(f"{k} {v}"
                                               for k, v in status["tempfails"].items()))
    for scanner in status["scanners"]:
        ago = scanner["last_answer_seconds_ago"]
        last = f"answered {duration(ago)} ago" if ago is not None else "no answer yet"
        lines.append(f"scanner {scanner['name']} ({scanner['role']}): {last}; "
                     f"{scanner['requests']} requests, {scanner['errors']} errors, "
                     f"{scanner['timeouts']} timeouts")
    return "\n".join(lines) + "\n"


def duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"
