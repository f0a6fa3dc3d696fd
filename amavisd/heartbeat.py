"""Worker heartbeat: the mtime of an unlinked temp file shared with the master.

The master creates the file before forking and keeps the descriptor; the
worker touches it while idle and at the start of every request; the master
`fstat`s it to find workers stuck past `child_timeout`. No pipes, no locks,
nothing a stuck worker could block.
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

    def notify(self) -> None:
        os.utime(self._fd)

    def last_update(self) -> float:
        return os.fstat(self._fd).st_mtime

    def age(self) -> float:
        return time.time() - self.last_update()

    def close(self) -> None:
        self._file.close()
