"""A listening Unix socket made by root in a directory another user owns.

The daemon (amavisd.listeners) and amavisd-milter (milter.server) both bind
their socket as root, before dropping to their own user, often in that
user's own directory (/var/lib/amavis belongs to amavis). That user can
change what stands at the path at any time, so after bind() nothing is
ever done to the path again: a chmod or chown by path between bind() and
the drop would follow a link the user put there and hand root's file
(/etc/shadow) to it, root's escalation at the next restart.

So: the socket is born with its mode (umask), closed to others until it
has its owner; then the name is opened itself (O_PATH, O_NOFOLLOW) and
that inode, checked to be a socket root made just now (ours, one link), is
the only thing changed, through /proc/self/fd. Anything else at the path
(a symlink, a hard link to another file, someone else's socket) is
refused, and left where it is. Without /proc an owner or mode that bind()
could not give is refused too, never set by path.

Standard library only: amavisd-milter ships beside the client.
"""

from __future__ import annotations

import os
import socket
import stat

__all__ = ["SocketFileError", "bind_unix", "clear_stale", "identity", "remove_if_ours"]

BACKLOG = 512


class SocketFileError(Exception):
    """The socket could not be made or given away: one line saying why."""


def bind_unix(path: str, mode: int, owner: int = -1, group: int = -1,
              backlog: int = BACKLOG, who: str = "process",
              ) -> tuple[socket.socket, tuple[int, ...]]:
    """A listening socket at `path` with `mode`, `owner` and `group` (-1: as
    made), and the `identity` of its file, so the caller removes it at exit
    only if it is still ours (`remove_if_ours`). A stale socket is replaced; a live one
    (of another `who`), or anything else at the path, is refused."""
    clear_stale(path, who)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode | 0o007)  # born closed to others: no chmod through the path
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise SocketFileError(f"cannot bind {path}: {err.strerror}") from None
    finally:
        os.umask(old)
    try:
        made = give(path, mode, owner, group)
        sock.listen(backlog)
    except (OSError, SocketFileError) as err:
        sock.close()
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise SocketFileError(f"cannot set owner/mode of {path}: {reason}") from None
    return sock, made


def identity(info: os.stat_result) -> tuple[int, ...]:
    """What tells our socket file from a later one at the same path: device
    and inode, and the change time (an inode number freed by an unlink is
    soon given to the next file made there, a newer daemon's socket)."""
    return info.st_dev, info.st_ino, info.st_ctime_ns


def remove_if_ours(path: str, made: tuple[int, ...] | None) -> None:
    """Unlink `path` if it is still the socket file `made` names; never a
    newer process's socket at the same path."""
    try:
        if made is not None and identity(os.lstat(path)) == made:
            os.unlink(path)
    except OSError:
        pass


def give(path: str, mode: int, owner: int = -1, group: int = -1) -> tuple[int, ...]:
    """Mode, owner and group for the socket just bound at `path`, on that
    very inode; its `identity` once given. Raises SocketFileError when what
    stands at the path is not the socket we made."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if (not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid()
                or info.st_nlink != 1):
            raise SocketFileError("the socket was replaced as it was made")
        inode = f"/proc/self/fd/{fd}"
        if not os.path.exists(inode):
            if owner >= 0 or group >= 0 or stat.S_IMODE(info.st_mode) != mode:
                raise SocketFileError("no /proc: the socket's owner and mode cannot be set "
                                      "safely")
            return identity(info)
        # chmod while the socket is still root's: once it is amavis's, root
        # needs CAP_FOWNER, which init/amavisd-milter.service does not grant.
        os.chmod(inode, mode)
        if owner >= 0 or group >= 0:
            os.chown(inode, owner, group)
        return identity(os.fstat(fd))
    finally:
        os.close(fd)


def clear_stale(path: str, who: str = "process") -> None:
    """Remove a socket left by a process that died; refuse to replace
    anything else, or a socket someone still listens on (one whose backlog
    is full does not answer in time: it is live too)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketFileError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale (unlink never follows a link)
        return
    except FileNotFoundError:
        return  # gone meanwhile
    except TimeoutError:
        pass  # listening, busy
    except OSError as err:
        raise SocketFileError(f"{path}: cannot tell whether it is in use: "
                              f"{err.strerror}") from None
    finally:
        probe.close()
    raise SocketFileError(f"{path}: another {who} is already listening there")
