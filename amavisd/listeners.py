"""The sockets workers accept on: bound once by the master, before dropping root.

Each `Listener` carries the tag of the protocol its clients speak (a key of
`protocol.registry.PROTOCOLS`); the worker picks the session class by it:
"ampdp" for the AM.PDP socket and `tcp_listen`, "smtp"/"lmtp" for each
entry of `smtp_listen` (spelled as `actions.methods.parse_listen` reads it).
An SMTP listener on an address that is not loopback is refused unless
`smtp_listen_remote` says so: a content filter open to the network would
hand mail on, unscanned senders included, to the re-injection port.
The Unix socket gets its mode at bind time (umask), so it is never open to
others, not even for an instant; then owner and group are set on the file we
bound, never by path (`amavisd_client.socket_file`, shared with the milter:
the directory may belong to the user we drop to). A live socket of another
running daemon is never unlinked from under it.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
from dataclasses import dataclass

from amavisd.actions.methods import ListenSpec, parse_listen
from amavisd.config import Config
from amavisd_client import socket_file
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


# The identity (socket_file.identity) of each socket file we bound: at
# shutdown we unlink a path only if it is still ours, not a newer daemon's
# socket at the same path.
_BOUND: dict[str, tuple[int, ...]] = {}


def unlink_if_ours(path: str) -> None:
    socket_file.remove_if_ours(path, _BOUND.get(path))


def bind_unix(path: str, mode: int, owner: str = "", group: str = "") -> socket.socket:
    """The AM.PDP (or an SMTP) Unix socket: mode at birth, then owner and
    group on the very file bound, never through the path again, which the
    user we drop to may have swapped for a link meanwhile (the directory is
    often theirs: amavisd_client.socket_file says how)."""
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else -1
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError as err:
        raise ListenerError(f"socket owner/group: no such user or group {err.args[0]}"
                            ) from None
    try:
        sock, identity = socket_file.bind_unix(path, mode, uid, gid, who="daemon")
    except socket_file.SocketFileError as err:
        raise ListenerError(str(err)) from None
    _BOUND[path] = identity
    sock.setblocking(False)
    return sock


def bind_tcp(address: str) -> socket.socket:
    """`host:port` or `[v6]:port` (the spelling of `tcp_listen`)."""
    try:
        host, port = parse_host_port(address)
    except AddressError as err:
        raise ListenerError(str(err)) from None
    return _bind_inet(host, port, address)


def _bind_inet(host: str, port: int, address: str) -> socket.socket:
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
    try:
        for entry in config.smtp_listen:
            listeners.append(bind_smtp(entry, config, owner, group))
    except (ListenerError, OSError):
        for listener in listeners:  # a daemon that cannot start holds no socket
            path = listener.unix_path
            listener.close()
            if path:
                unlink_if_ours(path)
        raise
    return listeners


def bind_smtp(entry: str, config: Config, owner: str = "", group: str = "") -> Listener:
    """One `smtp_listen` entry: TCP (loopback unless smtp_listen_remote), or a
    Unix socket with the AM.PDP socket's mode, owner and group."""
    try:
        spec: ListenSpec = parse_listen(entry)
    except ValueError as err:
        raise ListenerError(f"smtp_listen: {err}") from None
    if spec.path:
        return Listener(bind_unix(spec.path, int(config.socket_mode, 8), owner, group),
                        spec.protocol)
    if not spec.loopback and not config.smtp_listen_remote:
        raise ListenerError(f"smtp_listen {entry!r} is not a loopback address; set "
                            "smtp_listen_remote = true (and smtp_allow) to listen there")
    return Listener(_bind_inet(spec.host, spec.port, entry), spec.protocol)


def describe(listener: Listener | socket.socket) -> str:
    sock = listener.sock if isinstance(listener, Listener) else listener
    name = sock.getsockname()
    where = f"unix:{name}" if sock.family == socket.AF_UNIX else f"tcp:{name[0]}:{name[1]}"
    if isinstance(listener, Listener) and listener.protocol != AMPDP:
        return f"{listener.protocol}:{where}"
    return where
