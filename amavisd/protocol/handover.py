"""What an AM.PDP request hands the daemon, opened and checked at the trust boundary.

Any local user in the daemon's group may connect to the socket and write in
the temp base. So a request's tempdir and message file are opened beneath
the temp base through descriptors (`amavisd.beneath`: no symlink followed,
no path resolved twice), the message must be a regular file, both must
belong to the peer (SO_PEERCRED; root peers excepted), and the pipeline
reads the very descriptor that was checked. A tempdir is removed only
through the identity it was checked under, and never over TCP.

Over TCP (`tcp_listen`, loopback only) there is no SO_PEERCRED, and any
local user may connect, group or not. The kernel still knows who owns the
client's end of a loopback connection (/proc/net/tcp, as identd reads it),
so the same ownership check applies; where that uid cannot be found, a
request is checked against no one, and the daemon will not forward mail on
the client's behalf (delivery_care_of=server): it would deliver a file of
anyone's to recipients the client names.

Never: use a client's path string a second time, or act on a file the
client does not own.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import struct

from amavisd import failures
from amavisd.beneath import (
    DIR_FLAGS,
    FILE_FLAGS,
    Base,
    Identity,
    OutsideBase,
    components,
    identity,
)

log = logging.getLogger("amavisd.ampdp")

DEFAULT_MAIL_FILE = "email.txt"  # the protocol's mail file in a tempdir
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_warned_tcp_tempdir = False  # "not removed over TCP" is logged once a process


class RequestError(Exception):
    """A request we refuse. `public` goes back to the client in setreply
    ("request refused: mail_file is not a regular file", or "message file
    unreadable"): never a path, uid or errno, since the MTA may repeat it to
    the sender. `str()` is the detail, for the log line."""

    def __init__(self, public: str, detail: str | None = None):
        super().__init__(detail or public)
        self.public = public


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end: SO_PEERCRED on a Unix
    socket, the owner of the client's socket over loopback TCP; None when
    it cannot be known."""
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        return loopback_owner(conn)
    if conn.family != socket.AF_UNIX:
        return None
    try:
        _, uid, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    except OSError:
        return None
    return uid


_PROC_TCP = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}
_NOT_A_PEER = {"06", "0A"}  # TIME_WAIT (shown with uid 0), LISTEN


def loopback_owner(conn: socket.socket, tables: dict[int, str] = _PROC_TCP) -> int | None:
    """The uid owning the other end of loopback TCP connection `conn`: the
    entry of /proc/net/tcp(6) whose local end is our peer and whose remote
    end is us (a 4-tuple no other socket can hold while ours is open).
    None for a peer that is not on this host, or not found, or no longer
    held by a process: a client that closed its end at once leaves an
    orphan, shown with uid 0 and inode 0, which must not pass for root."""
    try:
        ours, theirs = conn.getsockname(), conn.getpeername()
        if not ipaddress.ip_address(theirs[0].partition("%")[0]).is_loopback:
            return None
        local, remote = _proc_key(conn.family, theirs), _proc_key(conn.family, ours)
        with open(tables[conn.family], encoding="ascii", errors="replace") as table:
            next(table, None)  # the column titles
            for line in table:
                fields = line.split()
                if len(fields) > 9 and fields[1] == local and fields[2] == remote:
                    alive = fields[3] not in _NOT_A_PEER and fields[9] != "0"  # inode
                    return int(fields[7]) if alive and fields[7].isdigit() else None
    except (OSError, ValueError, KeyError):
        return None
    return None


def _proc_key(family: int, address: tuple) -> str:
    """An (address, port) as /proc/net/tcp(6) prints it: the address as
    32-bit words in host byte order, the port, in upper-case hex."""
    packed = socket.inet_pton(family, address[0].partition("%")[0])
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{address[1]:04X}"


def printable_path(path: object) -> str:
    """A client's path for a reply or a log line: escaped, bounded."""
    return repr(path)[1:-1][:300] if isinstance(path, str) else repr(path)


class HandOver:
    """One request's tempdir and message file, opened and checked; `close()` after use."""

    def __init__(self, base: Base, peer: int | None, over_tcp: bool = False):
        self.base = base
        self.peer = peer  # None: unknown (over TCP, not found): nobody to check against
        self.over_tcp = over_tcp
        self.mail_fd = -1
        self.tempdir_fd = -1
        self.tempdir_id: Identity | None = None

    def open(self, tempdir: str | None, mail_file: str | None, mail_path: str) -> None:
        """`mail_file` None means the protocol's default, email.txt in `tempdir`
        (`mail_path` names it in replies). Raises RequestError."""
        if tempdir is not None:
            self.tempdir_fd, st = self._open(tempdir, DIR_FLAGS, "tempdir")
            self._check_owner(st, "tempdir", tempdir)
            self.tempdir_id = identity(st)
        if mail_file is not None:
            self.mail_fd, st = self._open(mail_file, FILE_FLAGS, "mail_file",
                                          self._below_tempdir(tempdir, mail_file))
        else:
            try:
                self.mail_fd = os.open(DEFAULT_MAIL_FILE, FILE_FLAGS, dir_fd=self.tempdir_fd)
                st = os.fstat(self.mail_fd)
            except OSError as err:
                raise open_failure("mail_file", mail_path, err) from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a device, a directory
            raise RequestError(failures.refused("mail_file is not a regular file"),
                               f"mail_file {printable_path(mail_path)} is not a regular file")
        self._check_owner(st, "mail_file", mail_path)

    def _below_tempdir(self, tempdir: str | None, mail_file: str) -> list[str] | None:
        """The names of `mail_file` below the tempdir just opened, when it
        lies inside it (the usual request names both): it is then opened in
        the directory that was checked, not through the tempdir's name again."""
        if tempdir is None or self.tempdir_fd < 0:
            return None
        try:
            return components(mail_file, tempdir)
        except OutsideBase:
            return None

    def _open(self, path: str, flags: int, what: str,
              below_tempdir: list[str] | None = None) -> tuple[int, os.stat_result]:
        try:
            if below_tempdir:
                return self.base.open_names(below_tempdir, flags, self.tempdir_fd)
            return self.base.open_stat(path, flags)
        except OutsideBase as err:
            raise RequestError(failures.refused(f"{what} is outside the temp base"),
                               f"{what} {printable_path(path)} is outside the temp base "
                               f"({err})") from None
        except OSError as err:
            raise open_failure(what, path, err) from None

    def _check_owner(self, st: os.stat_result, what: str, path: str) -> None:
        if self.peer in (None, 0) or st.st_uid == self.peer:
            return
        raise RequestError(failures.refused(f"{what} does not belong to the client"),
                           f"{what} {printable_path(path)} does not belong to the client "
                           f"(uid {self.peer})")

    def close(self) -> None:
        for fd in (self.mail_fd, self.tempdir_fd):
            if fd >= 0:
                os.close(fd)
        self.mail_fd = self.tempdir_fd = -1

    def remove_tempdir(self, tempdir: str) -> None:
        """Remove the tempdir this request handed over: emptied through the
        descriptor that was checked, its name removed only while it still is
        that directory; never over TCP."""
        global _warned_tcp_tempdir
        if self.tempdir_id is None:
            return
        if self.over_tcp or self.peer is None:
            if not _warned_tcp_tempdir:
                _warned_tcp_tempdir = True
                log.warning("tempdir_removed_by=server over TCP: left to the client "
                            "(no peer credentials to check whose it is)")
            return
        try:
            self.base.remove_opened(tempdir, self.tempdir_fd, self.tempdir_id,
                                    first=DEFAULT_MAIL_FILE)
        except (OSError, OutsideBase) as err:
            log.warning("could not remove tempdir %s: %s", printable_path(tempdir), err)


def open_failure(what: str, path: str, err: OSError) -> RequestError:
    """A tempdir or mail_file we could not open. The reply says which, and a
    symlink on the way is a refusal; any other reason (missing, no
    permission) is the message file being unreadable, as amavisd-new's
    "File ... inaccessible" says, without the path or errno."""
    if err.errno in (errno.ELOOP, errno.ENOTDIR):
        why = "a symlink or a non-directory on the way (refused)"
        public = failures.refused(f"{what}: a symlink or a non-directory on the way")
    else:
        why = err.strerror or type(err).__name__
        public = (failures.MESSAGE_UNREADABLE if what == "mail_file"
                  else failures.refused(f"{what} cannot be opened"))
    return RequestError(public, f"cannot open {what} {printable_path(path)}: {why}")
