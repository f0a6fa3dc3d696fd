"""The milter's spool: the message, as it arrives, in a private file under the
daemon's temp base, for the daemon to read by path (AM.PDP mail_file).

Built on the client's `Spool` (amavisd_client/spool.py): the dir and file
are made and removed through descriptors, the temp base must be sticky if
others may write it, and `verify()` proves the path still leads to what we
wrote. The milter runs as the daemon's own user, so its spool is closed to
the daemon's group: dir 0700 and file 0600, set before a byte is written.

Writes go straight to the file as the MTA sends them: the whole message is
never in memory. Blocking file I/O on the event loop is accepted here: a
local disk write of at most one body chunk (64 KiB) at a time.
"""

from __future__ import annotations

import os

from amavisd_client.spool import Spool, SpoolError

DIR_MODE = 0o700
FILE_MODE = 0o600


class SpoolSink:
    """One message's spool: `write`, then `verify` around the daemon's read,
    then `discard` (idempotent)."""

    def __init__(self, tempbase: str):
        self.spool = Spool(tempbase)  # SpoolError: the message gets on_error
        try:
            os.fchmod(self.spool.dir_fd, DIR_MODE)
            os.fchmod(self.spool.fd, FILE_MODE)
        except OSError as err:
            self.spool.remove()
            raise SpoolError(f"cannot protect {self.spool.dir}: {err.strerror}") from None
        self.path = self.spool.path
        self.dir = self.spool.dir

    @property
    def size(self) -> int:
        return self.spool.size

    def write(self, data: bytes) -> None:
        spool = self.spool
        if spool.fd < 0:
            raise SpoolError(f"spool {self.path} was already removed")
        view = memoryview(data)
        while view:
            try:
                written = os.write(spool.fd, view)
            except OSError as err:
                raise SpoolError(f"cannot write {self.path}: {err.strerror}") from None
            view = view[written:]
            spool.size += written

    def verify(self) -> None:
        self.spool.verify()

    def discard(self) -> None:
        self.spool.remove()
