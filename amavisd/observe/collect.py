"""What a scrape of the master returns: every process's counts merged, the
virus names cut to the top N, and what only the master knows.

Virus names: each worker keeps up to a few hundred names apart, so the
files may hold many. The export keeps `TOP_NAMES` series, the names with
the most detections, and counts the rest as `other`. Counters must never go
down, and a name's earlier detections were already shown as `other`, so a
name that joins the top starts from what it adds after it joined (its
baseline is its count at the previous scrape); one that falls out (another
has half again as many) has its count go back to `other`. So `other` and
every name's series only grow, and the sum is every detection.

The master's own view: build info, start time, and its workers by state
(busy and idle from the workers' slots, starting and stopping from the
master's states), for saturation panels and `/healthz`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from amavisd import __version__
from amavisd.observe.labels import OTHER
from amavisd.observe.slots import read_slot
from amavisd.observe.store import Store

DETECTIONS = "amavisd_detections"
LAST_SUCCESS = "amavisd_scanner_last_success_timestamp_seconds"
TOP_NAMES = 20  # virus-name series exported
ARCHIVE_NAMES = 1000  # virus names the archive keeps apart (the rest: other)
CHALLENGE = 1.5  # a name replaces the weakest of the top with this many times its count
WORKER_STATES = ("busy", "idle", "starting", "stopping")


class TopNames:
    """The virus names exported under their own name (see the module doc)."""

    def __init__(self, size: int = TOP_NAMES):
        self.size = size
        self.baselines: dict[str, float] = {}  # exported names -> count when they joined
        self.previous: dict[str, float] = {}  # every name's count at the previous scrape

    def export(self, metric: Metric) -> Metric:
        raw: dict[str, float] = {}
        for sample in metric.samples:
            name = sample.labels.get("name", OTHER)
            raw[name] = raw.get(name, 0.0) + sample.value
        self._admit(raw)
        exported = {name: max(0.0, raw.get(name, 0.0) - base)
                    for name, base in self.baselines.items()}
        other = sum(raw.values()) - sum(exported.values())
        self.previous = raw
        out = Metric(metric.name, metric.documentation, metric.type)
        for name, value in sorted(exported.items()):
            out.add_sample(metric.name + "_total", {"name": name}, value)
        out.add_sample(metric.name + "_total", {"name": OTHER}, max(0.0, other))
        return out

    def _admit(self, raw: dict[str, float]) -> None:
        challengers = sorted(((value, name) for name, value in raw.items()
                              if name != OTHER and name not in self.baselines), reverse=True)
        for value, name in challengers:
            if len(self.baselines) >= self.size:
                weakest = min(self.baselines, key=lambda n: (raw.get(n, 0.0), n))
                if value <= CHALLENGE * raw.get(weakest, 0.0):
                    break  # sorted: no later challenger does better
                del self.baselines[weakest]
            self.baselines[name] = self.previous.get(name, 0.0)

    def shrink(self, metrics: Iterable[Metric]) -> None:
        """Bound the archive's names (store.fold): the exported ones and the
        most frequent stay, the rest are added to `other`."""
        for metric in metrics:
            if metric.name != DETECTIONS:
                continue
            counts: dict[str, float] = {}
            for sample in metric.samples:
                name = sample.labels.get("name", OTHER)
                counts[name] = counts.get(name, 0.0) + sample.value
            if len(counts) <= ARCHIVE_NAMES:
                return
            ranked = sorted(counts, key=lambda n: (n not in self.baselines, -counts[n], n))
            kept = {n for n in ranked[:ARCHIVE_NAMES - 1] if n != OTHER}
            other = sum(v for n, v in counts.items() if n not in kept)
            metric.samples = [Sample(metric.name + "_total", {"name": n}, counts[n])
                              for n in sorted(kept)]
            metric.samples.append(Sample(metric.name + "_total", {"name": OTHER}, other))


class Scrape:
    """The collector of the master's registry (prometheus_client calls
    `collect()`), and the numbers `/status` and `/healthz` read."""

    def __init__(self, store: Store, master: Any = None):
        self.store = store
        self.master = master  # the Arbiter: .workers, .config (None in tests)
        self.top = TopNames()
        self.started = time.time()
        self.probed: dict[str, float] = {}  # scanner -> the master's last good probe

    def collect(self) -> Iterator[Metric]:
        yield from self.merged()
        yield from self.master_view()

    def merged(self) -> list[Metric]:
        with self.store.lock:
            metrics = self.store.merged()
            out = [self.top.export(m) if m.name == DETECTIONS else m for m in metrics]
        if self.probed:
            self._add_probes(out)
        return out

    def _add_probes(self, metrics: list[Metric]) -> None:
        """The master's own probes (health.py) count as answers too."""
        metric = next((m for m in metrics if m.name == LAST_SUCCESS), None)
        if metric is None:
            metric = GaugeMetricFamily(LAST_SUCCESS, "When a scanner last answered (Unix "
                                       "time).", labels=["scanner"])
            metrics.append(metric)
        seen = {}
        for index, sample in enumerate(metric.samples):
            seen[sample.labels.get("scanner")] = index
        for scanner, when in self.probed.items():
            index = seen.get(scanner)
            if index is None:
                metric.add_sample(LAST_SUCCESS, {"scanner": scanner}, when)
            elif metric.samples[index].value < when:
                metric.samples[index] = metric.samples[index]._replace(value=when)

    def workers(self) -> list[dict[str, Any]]:
        """The master's workers with what their slots say, oldest first."""
        if self.master is None:
            return []
        now = time.time()
        found = []
        for worker in sorted(list(self.master.workers.values()), key=lambda w: w.age):
            slot = read_slot(self.store.directory, worker.pid) or {}
            state = worker.state.value
            if state == "serving":
                activity = "busy" if slot.get("busy") else "idle"
            elif state == "booting":
                activity = "starting"
            elif state == "aborting":
                activity = "busy"  # stuck on its message, being killed
            else:
                activity = "stopping"
            entry = {"pid": worker.pid, "state": activity, "master_state": state,
                     "generation": worker.generation, "number": worker.age,
                     "age_seconds": round(max(0.0, now - worker.born), 1),
                     "requests": int(slot.get("requests", 0)), "message": None}
            if slot.get("busy") and activity == "busy":
                entry["message"] = {"log_id": slot.get("log_id", ""),
                                    "queue_id": slot.get("queue_id", ""),
                                    "seconds": round(max(0.0, now - slot.get("since", now)), 1)}
            found.append(entry)
        return found

    def master_view(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("amavisd_build_info", "amavisd's version (value 1).",
                                 labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        yield GaugeMetricFamily("amavisd_start_time_seconds", "When the master started "
                                "(Unix time).", value=self.started)
        if self.master is None:
            return
        states = dict.fromkeys(WORKER_STATES, 0)
        for worker in self.workers():
            states[worker["state"]] += 1
        workers = GaugeMetricFamily("amavisd_workers", "Worker processes, by state.",
                                    labels=["state"])
        for state, count in states.items():
            workers.add_metric([state], count)
        yield workers
        yield GaugeMetricFamily("amavisd_workers_configured", "Workers the master keeps.",
                                value=self.master.config.workers)
        doorman = getattr(self.master, "doorman", None)
        if doorman is not None:
            yield GaugeMetricFamily("amavisd_pending_connections", "Connections the doorman "
                                    "holds until their first request is whole.",
                                    value=doorman.held)
            yield GaugeMetricFamily("amavisd_queued_connections", "Connections whose first "
                                    "request is whole, waiting in the queue for an idle worker.",
                                    value=doorman.queued)
        yield CounterMetricFamily("amavisd_workers_folded", "Dead workers whose counts were "
                                  "folded into the archive since start.",
                                  value=self.store.folded)
