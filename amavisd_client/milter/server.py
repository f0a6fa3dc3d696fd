"""The asyncio server: MTA connections in, one state machine each, the daemon asked.

Each MTA connection is an `MtaConnection` (mta.py): bytes to the state
machine (state.py), its replies back. At end of message the AM.PDP question
runs on this loop too (daemon.py: a non-blocking socket, no thread, kept
for the next question: links.py), which
meanwhile sends a progress packet every `progress_interval` seconds, so the
MTA's content timeout never fires on a slow scan, and serves every other
connection. No verdict within
`daemon_timeout`, a daemon that is down, a bad reply, a spool failure, or a
bug of ours: the on_error action (tempfail by default) and one log line.
Never an accept by accident.

Listeners are bound before root is dropped (`bind`), so main.py can give a
Unix socket its mode and group first; the loop only accepts on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket

from amavisd_client.milter import codec
from amavisd_client.milter.daemon import FAILURES, DaemonCall
from amavisd_client.milter.links import DaemonLinks
from amavisd_client.milter.mta import READ_BUFFER, IdleSweep, MtaConnection
from amavisd_client.milter.options import Settings
from amavisd_client.milter.spool import SpoolPool, SpoolSink
from amavisd_client.milter.state import Ask, MilterSession
from amavisd_client.milter.verdicts import Policy
from amavisd_client.socket_file import SocketFileError, bind_unix
from amavisd_client.wire.address import Address

log = logging.getLogger("amavisd.milter")

PROGRESS = codec.encode(codec.Progress())


class ListenError(Exception):
    """A listener could not be set up: one line saying why."""


def bind(address: Address, mode: int = 0o660, group: str = "",
         owner: int = -1) -> socket.socket:
    """A listening socket for `address`; a Unix socket gets `mode`, `group`
    (name or number) and `owner` (uid) before anyone can connect."""
    if address.is_tcp:
        family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address.target)
        except OSError as err:
            sock.close()
            raise ListenError(f"cannot listen on {address}: {err.strerror}") from None
        sock.listen(128)
        return sock
    gid = -1
    if group:
        try:
            gid = int(group) if group.isascii() and group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenError(f"socket group: no such group {group!r}") from None
    try:  # born with `mode`; owner and group given to that inode only (socket_file)
        sock, _ = bind_unix(address.path, mode, owner, gid, backlog=128, who="milter")
    except SocketFileError as err:
        raise ListenError(str(err)) from None
    return sock


class MilterServer:
    """Serves MTA connections on bound sockets until `stop()`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.policy = Policy(settings.on_error, settings.quarantine)
        self.connections: set[MtaConnection] = set()
        self.sweep = IdleSweep(self.connections)  # closes silent MTA connections
        self.read_buffer = memoryview(bytearray(READ_BUFFER))  # every MTA read goes here
        self.spools = SpoolPool(settings.tempbase)  # answered spools, for the next message
        self.links = DaemonLinks(settings.daemon_socket)  # answered daemon connections, too
        self.servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the running loop, from start()
        self.unix_paths: list[str] = []

    async def start(self, sockets: list[socket.socket]) -> None:
        self.loop = loop = asyncio.get_running_loop()
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(lambda: MtaConnection(self), sock=sock)
                self.unix_paths.append(sock.getsockname())
            else:
                server = await loop.create_server(lambda: MtaConnection(self), sock=sock)
            self.servers.append(server)
        self.sweep.start()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, give messages in flight `grace` seconds, then close."""
        self.sweep.stop()
        for server in self.servers:
            server.close()
        for path in self.unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self.connections:
            await asyncio.wait([c.done for c in self.connections], timeout=grace)
        for connection in list(self.connections):
            connection.abort()  # its question is cancelled: the MTA applies its default
        if self.connections:
            await asyncio.wait([c.done for c in self.connections], timeout=5.0)
        # An aborted connection's question is cancelled: its socket closed, its spool removed.
        self.spools.close()
        self.links.close()
        links = self.links
        log.info("daemon connections: %d opened, %d reused, %d asked again after a reset",
                 links.opened, links.reused, links.retried)

    def open_sink(self) -> SpoolSink:
        return SpoolSink(self.settings.tempbase, pool=self.spools)

    async def ask(self, session: MilterSession, question: Ask,
                  transport: asyncio.WriteTransport) -> bytes:
        """The end-of-message packets: the daemon's verdict, or on_error. A
        progress packet goes out every progress_interval meanwhile."""
        settings = self.settings
        loop = self.loop or asyncio.get_running_loop()
        progress: asyncio.TimerHandle | None = None

        def keep_alive() -> None:
            nonlocal progress
            transport.write(PROGRESS)
            progress = loop.call_later(settings.progress_interval, keep_alive)

        progress = loop.call_later(settings.progress_interval, keep_alive)
        try:
            async with asyncio.timeout(settings.daemon_timeout):
                reply = await DaemonCall(self.links, question, loop).run()
        except TimeoutError:
            return session.fail(f"no verdict from amavisd within {settings.daemon_timeout:g}s")
        except FAILURES as err:
            return session.fail(str(err))
        except Exception as err:  # noqa: BLE001 - fail closed on anything
            log.exception("internal error asking amavisd")
            return session.fail(f"internal error: {type(err).__name__}")
        finally:
            progress.cancel()
        packets = session.answer(reply)
        log.info("%s: %s, id=%s", question.summary, reply.get("return_value") or "?",
                 reply.get("log_id") or "?")
        return packets
