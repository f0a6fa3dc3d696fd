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

Why a pool (`SpoolPool`): making and removing the dir and file was most of
the milter's system time (strace through Postfix: mkdir 64 µs, the create
23 µs, the close that frees the removed dir's inode on ext4, 25 calls a
message). A spool whose message got its verdict, that still holds nothing
but our file (the daemon left no work files in it: amavisd-new's parts/
would show), goes back to the pool with its descriptors, and the next
message writes the file again in place (pwrite): it is emptied when it goes
back, so no message waits in the temp base past its check. The path, dir
and file identity are verified around every request as before, and when a
spool leaves the pool (a temp-base cleaner may have removed it).
A spool whose question failed, was cancelled or timed out is removed, never
reused: the daemon may still be reading it. Idle spools are removed when
the milter stops (`close`); at most `keep` of them are held.
"""

from __future__ import annotations

import os

from amavisd_client.spool import MAIL_FILE, Spool, SpoolError

DIR_MODE = 0o700
FILE_MODE = 0o600
MEMORY = 64 * 1024  # bytes of a message held before it goes to disk
POOL_KEEP = 32  # idle spools a milter holds (2 descriptors each)


class MilterSpool(Spool):
    # Closed to the group from mkdir and open on, not narrowed after: a
    # descriptor opened in between would read every message the pool
    # later writes into this same file.
    dir_mode, file_mode = DIR_MODE, FILE_MODE


def make_spool(tempbase: str) -> MilterSpool:
    """A new private dir and file under the temp base, closed to the group."""
    return MilterSpool(tempbase)  # SpoolError: the message gets on_error


class SpoolPool:
    """Answered spools kept for the next message (see the module's docstring)."""

    def __init__(self, tempbase: str, keep: int = POOL_KEEP):
        self.tempbase = tempbase
        self.keep = keep
        self.idle: list[MilterSpool] = []

    def take(self) -> MilterSpool:
        """The latest idle spool still where we left it (one a cleaner of the
        temp base removed is dropped, not a tempfail), else a new one."""
        while self.idle:
            spool = self.idle.pop()
            try:
                spool.verify()
                # a second link to the file would hold every message written in it
                alone = os.fstat(spool.fd).st_nlink == 1
            except (SpoolError, OSError):
                alone = False
            if not alone:
                spool.remove()
                continue
            return spool  # empty: emptied by `give`, and `verify` saw size 0
        return make_spool(self.tempbase)

    def give(self, spool: MilterSpool) -> None:
        """Keep `spool` if it holds only our file and there is room, else remove it."""
        try:
            clean = (len(self.idle) < self.keep and spool.fd >= 0
                     and os.listdir(spool.dir_fd) == [MAIL_FILE])
            if clean:  # no message lies in the temp base longer than its check
                os.ftruncate(spool.fd, 0)
                spool.size = 0
        except OSError:
            clean = False
        if clean:
            self.idle.append(spool)
        else:
            spool.remove()

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for spool in idle:
            spool.remove()


class SpoolSink:
    """One message's spool: `write`, `open` (makes the file: SpoolError),
    then `verify` around the daemon's read, then `release` (answered: back
    to the pool, if any) or `discard` (idempotent)."""

    def __init__(self, tempbase: str, memory: int = MEMORY, pool: SpoolPool | None = None):
        self.tempbase = tempbase
        self.memory = memory
        self.pool = pool
        self.spool: MilterSpool | None = None
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

    def _opened(self) -> MilterSpool:
        if self.spool is None:
            raise SpoolError("the spool was not made yet")
        return self.spool

    def open(self) -> None:
        """Make the dir and file (if not yet) and write what was held."""
        if self.discarded:
            raise SpoolError("the spool was already removed")
        if self.spool is None:
            self.spool = self.pool.take() if self.pool is not None else make_spool(self.tempbase)
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
        while view:  # at our own offset: a pooled file's position is a former message's end
            try:
                written = os.pwrite(spool.fd, view, spool.size)
            except OSError as err:
                raise SpoolError(f"cannot write {spool.path}: {err.strerror}") from None
            view = view[written:]
            spool.size += written

    def verify(self) -> None:
        self._opened().verify()

    def release(self) -> None:
        """The daemon answered about this spool and is done with it: to the
        pool (which still checks it), else removed."""
        spool, self.spool = self.spool, None
        if spool is not None and self.pool is not None:
            self.discarded = True
            self.held = bytearray()
            self.pool.give(spool)
        else:
            self.spool = spool
            self.discard()

    def discard(self) -> None:
        self.discarded = True
        self.held = bytearray()
        if self.spool is not None:
            self.spool.remove()
