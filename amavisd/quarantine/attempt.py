"""One file-store attempt at a quarantine entry: all of it, or nothing.

An entry is two files (`quarantine.file`): the message, then its sidecar,
written aside and renamed. When a store fails part-way (the disk full, a
file size limit, the directory made unwritable) the mail is tempfailed and
the MTA keeps it; what the attempt made must then go too, since a message
without its sidecar is never listed nor released, only junk that a tool
walking the directory may trip on.

Everything goes through one descriptor of the directory, opened once
without following a link, so the files are made, and removed, in the
directory the attempt began in even if its path is swapped meanwhile, and
only the names this attempt made itself are removed (unlinkat never follows
a link). Removal goes newest first, and stops at the first file that will
not go, so a sidecar is never left without its message. A removal refused
because the directory lost its mode is tried again once the directory is
0700 again (`FileStore.prepare` would make it so before the next store
anyway); what still cannot go is kept in `leftovers`, which the store hands
to its next attempt. The clean-up never raises: the error the mail is
tempfailed for stays the one that broke the store.
"""

from __future__ import annotations

import logging
import os
import stat
from types import TracebackType
from typing import BinaryIO

log = logging.getLogger("amavisd.quarantine")

# O_EXCL: never overwrite; O_NOFOLLOW: never write through a planted link.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StoreAttempt:
    """The files one store made in `directory`; removed unless it succeeds.

    `leftovers` is the store's: lists of names (newest first) that earlier
    attempts could not remove. They are tried again when this one starts,
    and what this one cannot remove is added to them."""

    def __init__(self, directory: str, leftovers: list[list[str]]):
        self.directory = directory
        self.leftovers = leftovers
        self.made: list[str] = []
        self.fd = os.open(directory, _DIRECTORY)

    def __enter__(self) -> StoreAttempt:
        if self.leftovers:
            self.leftovers[:] = [left for names in self.leftovers
                                 if (left := self._remove(names))]
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> bool:
        try:
            if err is not None and self.made:
                left = self._remove(self.made[::-1])
                if left:
                    self.leftovers.append(left)
                    note = (f"left in {self.directory} until the next store: "
                            f"{', '.join(left)}")
                    log.warning("quarantine store failed (%s); %s", err, note)
                    err.add_note(note)
        finally:
            os.close(self.fd)
        return False  # the original error goes on, whatever the clean-up did

    def create(self, name: str) -> BinaryIO:
        """A new 0600 file `name`, open for writing; FileExistsError if there is one."""
        fd = os.open(name, _CREATE, 0o600, dir_fd=self.fd)
        self.made.append(name)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            return os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise

    def rename(self, old: str, new: str) -> None:
        """`old` (made here) becomes `new`, in this directory."""
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        self.made[self.made.index(old)] = new

    def _remove(self, names: list[str]) -> list[str]:
        """Unlink `names` in order; the ones from the first that would not go on."""
        for done, name in enumerate(names):
            try:
                self._unlink(name)
            except OSError as err:
                log.debug("cannot remove %s from %s: %s", name, self.directory, err)
                return names[done:]
        return []

    def _unlink(self, name: str) -> None:
        for last_try in (False, True):
            try:
                os.unlink(name, dir_fd=self.fd)
                return
            except FileNotFoundError:
                return
            except PermissionError:
                if last_try or not self._repair_mode():
                    raise

    def _repair_mode(self) -> bool:
        """Make the directory 0700 again (as `prepare` does); False when it
        was 0700 already or is not ours to change."""
        try:
            if stat.S_IMODE(os.fstat(self.fd).st_mode) == 0o700:
                return False
            os.fchmod(self.fd, 0o700)
        except OSError:
            return False
        return True
