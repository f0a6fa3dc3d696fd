"""Worker heartbeat: the mtime of an unlinked temp file shared with the master.

The master creates the file before forking and keeps the descriptor; the
worker touches it while idle and at the start of every request; the master
`fstat`s it to find workers stuck past `child_timeout`. No pipes, no locks,
nothing a stuck worker could block.

The mtime comes from the wall clock, which can jump (settimeofday, an NTP
step). So the master never subtracts it from the time of day: a touch is
any change of the mtime, and the age is monotonic time since the master
last saw one. A jump forward must not make a busy worker look stuck, nor a
jump back hide a stuck one for as long as the clock went back.
"""

from __future__ import annotations

import os
import tempfile
import time


class Heartbeat:
    def __init__(self, directory: str | None = None):
        # Default: $TMPDIR, not the temp base, so a bad temp base is caught by
        # the workers' boot check rather than crashing the master.
        self._file = tempfile.TemporaryFile(dir=directory)
        self._fd = self._file.fileno()
        self.notify()
        self._seen = os.fstat(self._fd).st_mtime_ns  # the master's view: last mtime seen
        self._seen_at = time.monotonic()  # and when it was first seen

    def notify(self) -> None:
        """The worker's touch."""
        os.utime(self._fd)

    def last_update(self) -> float:
        """The mtime (wall clock): compare it only for equality, never subtract."""
        return os.fstat(self._fd).st_mtime

    def age(self) -> float:
        """Seconds (monotonic) since the master first saw the current mtime;
        the master polls it often, so at most one poll late."""
        stamp = os.fstat(self._fd).st_mtime_ns
        now = time.monotonic()
        if stamp != self._seen:
            self._seen, self._seen_at = stamp, now
        return now - self._seen_at

    def close(self) -> None:
        self._file.close()
