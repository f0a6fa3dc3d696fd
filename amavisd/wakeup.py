"""The self-pipe that turns a signal into a readable fd, for select() loops.

`signal.set_wakeup_fd` makes the C-level handler write a byte, so the Python
handlers themselves only set state, and a loop blocked in select() on the
read end wakes at once. Used by the master and by every worker.
"""

from __future__ import annotations

import os
import signal


def open_pipe() -> tuple[int, int]:
    """Create the pipe and register its write end; returns (read_fd, write_fd)."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(write_fd)
    return read_fd, write_fd


def drain(read_fd: int) -> None:
    try:
        while os.read(read_fd, 4096):
            pass
    except BlockingIOError:
        pass
