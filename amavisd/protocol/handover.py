"""What an AM.PDP request hands the daemon, opened and checked at the trust boundary.

Any local user in the daemon's group may connect to the socket and write in
the temp base. So a request's tempdir and message file are opened beneath
the temp base through descriptors (`amavisd.beneath`: no symlink followed,
no path resolved twice), the message must be a regular file, both must
belong to the peer (SO_PEERCRED; root peers excepted), and the pipeline
reads the very descriptor that was checked. A tempdir is removed only
through the identity it was checked under, and never over TCP, where there
is no peer uid to check ownership against.

Never: use a client's path string a second time, or act on a file the
client does not own.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct

from amavisd.beneath import DIR_FLAGS, FILE_FLAGS, Base, Identity, OutsideBase, identity

log = logging.getLogger("amavisd.ampdp")

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_warned_tcp_tempdir = False  # "not removed over TCP" is logged once a process


class RequestError(Exception):
    """A request we refuse; the text goes back to the client in setreply."""


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket; None over TCP."""
    if conn.family != socket.AF_UNIX:
        return None
    try:
        _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    except OSError:
        return None
    return uid


def printable_path(path: object) -> str:
    """A client's path for a reply or a log line: escaped, bounded."""
    return repr(path)[1:-1][:300] if isinstance(path, str) else repr(path)


class HandOver:
    """One request's tempdir and message file, opened and checked; `close()` after use."""

    def __init__(self, base: Base, peer: int | None):
        self.base = base
        self.peer = peer  # None over TCP
        self.mail_fd = -1
        self.tempdir_fd = -1
        self.tempdir_id: Identity | None = None

    def open(self, tempdir: str | None, mail_file: str | None, mail_path: str) -> None:
        """`mail_file` None means the protocol's default, email.txt in `tempdir`
        (`mail_path` names it in replies). Raises RequestError."""
        if tempdir is not None:
            self.tempdir_fd = self._open(tempdir, DIR_FLAGS, "tempdir")
            st = os.fstat(self.tempdir_fd)
            self._check_owner(st, "tempdir", tempdir)
            self.tempdir_id = identity(st)
        if mail_file is not None:
            self.mail_fd = self._open(mail_file, FILE_FLAGS, "mail_file")
        else:
            try:
                self.mail_fd = os.open("email.txt", FILE_FLAGS, dir_fd=self.tempdir_fd)
            except OSError as err:
                raise RequestError(open_failure("mail_file", mail_path, err)) from None
        st = os.fstat(self.mail_fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a device, a directory
            raise RequestError(f"mail_file {printable_path(mail_path)} is not a regular file")
        self._check_owner(st, "mail_file", mail_path)

    def _open(self, path: str, flags: int, what: str) -> int:
        try:
            return self.base.open(path, flags)
        except OutsideBase as err:
            raise RequestError(f"{what} {printable_path(path)} is outside the temp base "
                               f"({err})") from None
        except OSError as err:
            raise RequestError(open_failure(what, path, err)) from None

    def _check_owner(self, st: os.stat_result, what: str, path: str) -> None:
        if self.peer in (None, 0) or st.st_uid == self.peer:
            return
        raise RequestError(f"{what} {printable_path(path)} does not belong to the client "
                           f"(uid {self.peer})")

    def close(self) -> None:
        for fd in (self.mail_fd, self.tempdir_fd):
            if fd >= 0:
                os.close(fd)
        self.mail_fd = self.tempdir_fd = -1

    def remove_tempdir(self, tempdir: str) -> None:
        """Remove the tempdir this request handed over, if it still is the one
        that was checked; never over TCP."""
        global _warned_tcp_tempdir
        if self.tempdir_id is None:
            return
        if self.peer is None:
            if not _warned_tcp_tempdir:
                _warned_tcp_tempdir = True
                log.warning("tempdir_removed_by=server over TCP: left to the client "
                            "(no peer credentials to check whose it is)")
            return
        try:
            self.base.remove(tempdir, expect=self.tempdir_id)
        except (OSError, OutsideBase) as err:
            log.warning("could not remove tempdir %s: %s", printable_path(tempdir), err)


def open_failure(what: str, path: str, err: OSError) -> str:
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        why = "a symlink or a non-directory on the way (refused)"
    else:
        why = err.strerror or type(err).__name__
    return f"cannot open {what} {printable_path(path)}: {why}"
