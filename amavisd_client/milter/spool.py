"""The milter's spool: the message, as it arrives, for the daemon to read by
path (AM.PDP mail_file), in a private file under the daemon's temp base.

Built on the client's `Spool` (amavisd_client/spool.py): the dir and file
are made and removed through descriptors, the temp base must be sticky if
others may write it, and `verify()` proves the path still leads to what we
wrote. The milter runs as the daemon's own user, so its spool is closed to
the daemon's group: dir 0700 and file 0600, set before a byte is written.

Why a sink starts in memory: an MTA sends a header a packet, and a write a
header was most of the spool's system calls. So the first `MEMORY` bytes
stay in memory and go to the file in one write when the daemon is asked
(`open()`, daemon.py), or as soon as a message outgrows `MEMORY` (then
every further chunk, at most 64 KiB, goes straight to the file: the whole
message is never in memory). A message the MTA aborts never touches the
disk. Memory held is bounded: `MEMORY` a connection, MAX_CONNECTIONS of them.
Blocking file I/O on the event loop is accepted: a few local system calls a
message, no more than one chunk written at a time.
"""

from __future__ import annotations

import os

from amavisd_client.spool import Spool, SpoolError

DIR_MODE = 0o700
FILE_MODE = 0o600
MEMORY = 64 * 1024  # bytes of a message held before it goes to disk


class SpoolSink:
    """One message's spool: `write`, `open` (makes the file: SpoolError),
    then `verify` around the daemon's read, then `discard` (idempotent)."""

    def __init__(self, tempbase: str, memory: int = MEMORY):
        self.tempbase = tempbase
        self.memory = memory
        self.spool: Spool | None = None
        self.held = bytearray()  # what came before the spool was made
        self.discarded = False

    @property
    def path(self) -> str:
        return self._opened().path

    @property
    def dir(self) -> str:
        return self._opened().dir

    @property
    def size(self) -> int:
        return self.spool.size if self.spool is not None else len(self.held)

    def _opened(self) -> Spool:
        if self.spool is None:
            raise SpoolError("the spool was not made yet")
        return self.spool

    def open(self) -> None:
        """Make the dir and file (if not yet) and write what was held."""
        if self.discarded:
            raise SpoolError("the spool was already removed")
        if self.spool is None:
            spool = Spool(self.tempbase)  # SpoolError: the message gets on_error
            try:
                os.fchmod(spool.dir_fd, DIR_MODE)
                os.fchmod(spool.fd, FILE_MODE)
            except OSError as err:
                spool.remove()
                raise SpoolError(f"cannot protect {spool.dir}: {err.strerror}") from None
            self.spool = spool
        if self.held:
            held, self.held = self.held, bytearray()
            self._write(held)

    def write(self, data: bytes) -> None:
        if self.spool is None and len(self.held) + len(data) <= self.memory:
            if self.discarded:
                raise SpoolError("the spool was already removed")
            self.held += data
            return
        self.open()
        self._write(data)

    def _write(self, data: bytes | bytearray) -> None:
        spool = self._opened()
        if spool.fd < 0:
            raise SpoolError(f"spool {spool.path} was already removed")
        view = memoryview(data)
        while view:
            try:
                written = os.write(spool.fd, view)
            except OSError as err:
                raise SpoolError(f"cannot write {spool.path}: {err.strerror}") from None
            view = view[written:]
            spool.size += written

    def verify(self) -> None:
        self._opened().verify()

    def discard(self) -> None:
        self.discarded = True
        self.held = bytearray()
        if self.spool is not None:
            self.spool.remove()
