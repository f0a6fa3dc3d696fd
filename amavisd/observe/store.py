"""The metrics dir: where every process of the daemon keeps its counts.

prometheus_client's multiprocess mode gives each process its own files
(`counter_<pid>.db`, `histogram_<pid>.db`, ...), and a scrape reads them
all. Workers are recycled (max_requests), so left alone the dir would grow
by a few files a worker and each scrape would read thousands of them. So
when the master reaps a worker it folds the worker's files into one archive
per kind (`counter_archive.db`, ...) and removes them: the archive holds
the same label sets whatever the number of dead workers, and a scrape
reads the archive plus the files of the living.

Folding and scraping both run in the master (its loop and its HTTP thread)
under one lock, so a scrape never sees a worker's counts twice or not at
all. The archive is written beside and renamed over the old one.

At start the dir is made ours alone (0700, the daemon's user) and emptied
of a previous run's files: counts start at zero with the master, as
Prometheus expects of a restarted process. Only our own file names are
removed, never a tree: a metrics_dir set to a wrong path loses nothing.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from amavisd.observe.slots import remove_slot

log = logging.getLogger("amavisd.observe")

DIR_MODE = 0o700
# What we fold: counters and histograms add up, the max gauges (a scanner's
# last success) keep the latest. Live gauges go with their process.
FOLDED = ("counter", "histogram", "gauge_max")
OUR_FILES = re.compile(r"[a-z]+(_[a-z]+)?_(\d+|archive)\.(db|tmp)|worker-\d+\.slot")


class MetricsDirError(Exception):
    """The metrics dir cannot be made ours: metrics are off, mail goes on."""


def prepare(directory: str, owner: tuple[int, int] | None = None) -> None:
    """Make `directory` (0700, given to `owner` when we are root) and remove
    the files a previous run left there."""
    try:
        os.mkdir(directory, DIR_MODE)
    except FileExistsError:
        pass
    except OSError as err:
        raise MetricsDirError(f"metrics dir {directory}: {err.strerror}") from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise MetricsDirError(f"metrics dir {directory}: {err.strerror} "
                              "(a symlink is not followed)") from None
    try:
        st = os.fstat(fd)
        allowed = {0, os.geteuid()} | ({owner[0]} if owner else set())
        if st.st_uid not in allowed:
            raise MetricsDirError(f"metrics dir {directory} belongs to uid {st.st_uid}, "
                                  "not to us")
        for name in os.listdir(fd):
            if OUR_FILES.fullmatch(name):
                os.unlink(name, dir_fd=fd)
        os.fchmod(fd, DIR_MODE)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
    except OSError as err:
        raise MetricsDirError(f"metrics dir {directory}: {err}") from None
    finally:
        os.close(fd)
    if stat.S_IMODE(os.stat(directory).st_mode) != DIR_MODE:
        raise MetricsDirError(f"metrics dir {directory}: cannot make it 0700")


class Store:
    """The dir of one running daemon, as the master reads and folds it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.lock = threading.Lock()  # folding vs scraping, both in the master
        self.folded = 0  # workers folded since start

    def files(self) -> list[str]:
        return glob.glob(os.path.join(self.directory, "*.db"))

    def merged(self) -> list[Metric]:
        """Every process's counts, added up (histogram buckets cumulated).
        The caller holds `lock`."""
        return merge(self.files(), accumulate=True)

    def fold(self, pid: int, shrink: Callable[[Iterable[Metric]], None] | None = None) -> None:
        """Fold a reaped worker's files into the archive, then remove them
        with its live gauges and its slot. `shrink` may bound the archive's
        label sets (virus names, collect.py) before it is written."""
        with self.lock:
            for prefix in FOLDED:
                dead = os.path.join(self.directory, f"{prefix}_{pid}.db")
                if not os.path.exists(dead):
                    continue
                archive = os.path.join(self.directory, f"{prefix}_archive.db")
                sources = [archive, dead] if os.path.exists(archive) else [dead]
                metrics = merge(sources, accumulate=False)
                if shrink is not None:
                    shrink(metrics)
                temporary = os.path.join(self.directory, f"{prefix}_archive.tmp")
                write(temporary, metrics)
                os.replace(temporary, archive)
                os.unlink(dead)
            mark_process_dead(pid, self.directory)
            remove_slot(self.directory, pid)
            self.folded += 1


def merge(files: list[str], accumulate: bool) -> list[Metric]:
    """prometheus_client's merge, sparing a file caught empty: a process that
    has just created its file has not yet written its header."""
    try:
        return list(MultiProcessCollector.merge(files, accumulate=accumulate))
    except (struct.error, RuntimeError, ValueError, FileNotFoundError):
        readable = [path for path in files if _readable(path)]
        return list(MultiProcessCollector.merge(readable, accumulate=accumulate))


def _readable(path: str) -> bool:
    try:
        list(MmapedDict.read_all_values_from_file(path))
    except (struct.error, RuntimeError, ValueError, OSError) as err:
        log.debug("metrics: skipping %s this time: %s", path, err)
        return False
    return True


def write(path: str, metrics: Iterable[Metric]) -> None:
    """Metrics as merged without accumulation, in the files' own format."""
    try:
        os.unlink(path)  # a previous fold that died half-way
    except FileNotFoundError:
        pass
    values = MmapedDict(path)
    try:
        for metric in metrics:
            for sample in metric.samples:
                key = mmap_key(metric.name, sample.name, list(sample.labels),
                               list(sample.labels.values()), metric.documentation)
                values.write_value(key, sample.value, sample.timestamp or 0.0)
    finally:
        values.close()
