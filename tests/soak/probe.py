# SPDX-License-Identifier: MIT
"""What the soak measures of the daemon's processes and directories, read from /proc.

PSS (proportional set size, smaps_rollup) is the memory a worker really
costs: pages shared with the master after fork count a fraction each. Open
descriptors are the entries of /proc/PID/fd. Both are read of the workers
alive at the moment (workers recycle, so "the same worker" at start and end
does not exist) and of the master.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Snapshot", "snapshot", "leftovers", "zombies", "stat_state", "survivors"]


def _rollup(pid: int) -> dict[str, int]:
    """Rss and Pss of a process in kB ({} once it is gone)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                found[name] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return found


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def stat_state(pid: int) -> str:
    """The one-letter state of a process ("" once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rsplit(")", 1)[1].split()[0]


@dataclass
class Snapshot:
    workers: int
    worker_pss_kb: tuple[int, int, int]  # min, median, max
    worker_fds: tuple[int, int, int]
    master_rss_kb: int
    master_pss_kb: int
    master_fds: int

    def row(self) -> list[str]:
        return [str(self.workers), "/".join(f"{v / 1024:.1f}" for v in self.worker_pss_kb),
                "/".join(str(v) for v in self.worker_fds), f"{self.master_rss_kb / 1024:.1f}",
                f"{self.master_pss_kb / 1024:.1f}", str(self.master_fds)]


def _spread(values: list[int]) -> tuple[int, int, int]:
    if not values:
        return (0, 0, 0)
    return (min(values), int(statistics.median(values)), max(values))


def snapshot(master: int, workers: set[int]) -> Snapshot:
    pss, fds = [], []
    for pid in sorted(workers):
        rollup, count = _rollup(pid), _fds(pid)
        if rollup and count is not None:  # a worker may leave between listing and reading
            pss.append(rollup["Pss"])
            fds.append(count)
    own = _rollup(master)
    return Snapshot(len(pss), _spread(pss), _spread(fds), own.get("Rss", 0),
                    own.get("Pss", 0), _fds(master) or 0)


def leftovers(*bases: str) -> list[str]:
    """Everything under the daemon's work and temp bases (the bases themselves kept)."""
    found = []
    for base in bases:
        for root, dirs, files in os.walk(base):
            found += [os.path.join(root, name) for name in dirs + files]
    return sorted(found)


def zombies(children: Callable[[], set[int]], settle: float = 3.0) -> list[int]:
    """Children still zombies after `settle` seconds (a worker killed a moment
    ago is one until the master reaps it)."""
    deadline = time.monotonic() + settle
    while True:
        found = [pid for pid in children() if stat_state(pid) == "Z"]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def survivors(marker: str, master: int) -> list[int]:
    """Processes still running whose command line names `marker` (our config
    file: forked workers keep the master's), or the master itself."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (marker in argv or int(entry) == master) and stat_state(int(entry)) not in ("", "Z"):
            found.append(int(entry))
    return found
