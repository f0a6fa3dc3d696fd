"""The sockets workers accept on: bound once by the master, before dropping root.

The Unix socket gets its mode at bind time (umask), so it is never open to
others, not even for an instant; then owner and group are set. A live socket
of another running daemon is never unlinked from under it.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat

from amavisd.config import Config


class ListenerError(Exception):
    pass


# (st_dev, st_ino) of each socket file we bound: at shutdown we unlink a path
# only if it is still ours, not a newer daemon's socket at the same path.
_BOUND: dict[str, tuple[int, int]] = {}


def unlink_if_ours(path: str) -> None:
    try:
        st = os.lstat(path)
        if _BOUND.get(path) == (st.st_dev, st.st_ino):
            os.unlink(path)
    except OSError:
        pass


def bind_unix(path: str, mode: int, owner: str = "", group: str = "") -> socket.socket:
    if os.path.exists(path) or os.path.islink(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a dead daemon
        else:
            raise ListenerError(f"{path}: another daemon is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise ListenerError(f"cannot bind {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    st = os.lstat(path)
    _BOUND[path] = (st.st_dev, st.st_ino)
    if owner or group:
        uid = pwd.getpwnam(owner).pw_uid if owner else -1
        gid = grp.getgrnam(group).gr_gid if group else -1
        os.chown(path, uid, gid)
    sock.listen(512)
    sock.setblocking(False)
    return sock


def bind_tcp(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as err:
        sock.close()
        raise ListenerError(f"cannot bind {address}: {err.strerror}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


def bind_all(config: Config) -> list[socket.socket]:
    owner = config.socket_owner or config.user
    group = config.socket_group or config.group
    if os.geteuid() != 0:  # only root may give the socket away
        owner = ""
        group = config.socket_group if config.socket_group else ""
    socks = [bind_unix(config.socket_path, int(config.socket_mode, 8), owner, group)]
    if config.tcp_listen:
        socks.append(bind_tcp(config.tcp_listen))
    return socks


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"unix:{name}" if sock.family == socket.AF_UNIX else f"tcp:{name[0]}:{name[1]}"
