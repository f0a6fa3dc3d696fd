"""The sockets workers accept on: bound once by the master, before dropping root.

Each `Listener` carries the tag of the protocol its clients speak (a key of
`protocol.registry.PROTOCOLS`); the worker picks the session class by it.
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
from dataclasses import dataclass

from amavisd.config import Config
from amavisd_client.wire.address import AddressError, parse_host_port

AMPDP = "ampdp"  # the tag of the AM.PDP listeners (protocol.registry)


class ListenerError(Exception):
    pass


@dataclass(frozen=True)
class Listener:
    """A bound, listening socket and the protocol its clients speak."""

    sock: socket.socket
    protocol: str  # a tag in protocol.registry.PROTOCOLS

    def fileno(self) -> int:  # select() and python-daemon's files_preserve take us as is
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()

    @property
    def unix_path(self) -> str | None:
        """The socket file to remove at shutdown; None for TCP."""
        return self.sock.getsockname() if self.sock.family == socket.AF_UNIX else None


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
    """`host:port` or `[v6]:port` (the spelling of `tcp_listen`)."""
    try:
        host, port = parse_host_port(address)
    except AddressError as err:
        raise ListenerError(str(err)) from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ListenerError(f"cannot bind {address}: {err.strerror}") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock


def bind_all(config: Config) -> list[Listener]:
    """Every listener the configuration asks for, each tagged with its protocol."""
    owner = config.socket_owner or config.user
    group = config.socket_group or config.group
    if os.geteuid() != 0:  # only root may give the socket away
        owner = ""
        group = config.socket_group if config.socket_group else ""
    listeners = [Listener(bind_unix(config.socket_path, int(config.socket_mode, 8), owner,
                                   group), AMPDP)]
    if config.tcp_listen:
        listeners.append(Listener(bind_tcp(config.tcp_listen), AMPDP))
    return listeners


def describe(listener: Listener | socket.socket) -> str:
    sock = listener.sock if isinstance(listener, Listener) else listener
    name = sock.getsockname()
    return f"unix:{name}" if sock.family == socket.AF_UNIX else f"tcp:{name[0]}:{name[1]}"
