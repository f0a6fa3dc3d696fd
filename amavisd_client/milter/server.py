"""The asyncio server: MTA connections in, one state machine each, the daemon asked in threads.

Each MTA connection runs `serve_connection`: read, feed the state machine
(state.py), write what it says. At end of message the AM.PDP question runs
in a thread (daemon.py) while this loop sends a progress packet every
`progress_interval` seconds, so the MTA's content timeout never fires on a
slow scan, and serves every other connection. No verdict within
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
from concurrent.futures import ThreadPoolExecutor

from amavisd_client.milter import codec
from amavisd_client.milter.daemon import FAILURES, DaemonCall
from amavisd_client.milter.options import Settings
from amavisd_client.milter.spool import SpoolSink
from amavisd_client.milter.state import Ask, Close, MilterSession, Send
from amavisd_client.milter.verdicts import Policy
from amavisd_client.socket_file import SocketFileError, bind_unix
from amavisd_client.wire.address import Address

log = logging.getLogger("amavisd.milter")

READ_SIZE = 65536 + 5  # one full body packet a read
IDLE_TIMEOUT = 3600.0  # an MTA connection silent this long is closed (SMTP's own are 300 s)
MAX_CONNECTIONS = 1000  # more at once are closed at once: the MTA applies its default action
DAEMON_THREADS = 64  # questions to the daemon in flight; it has fewer workers anyway
PROGRESS = codec.encode(codec.Progress())


async def drain(writer: asyncio.StreamWriter) -> None:
    """Wait until the MTA has read what we wrote, but not for ever: a peer
    that sends and never reads would otherwise hold its connection (one of
    MAX_CONNECTIONS) past every timeout. TimeoutError ends the connection."""
    await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)


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
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
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
        self.executor = ThreadPoolExecutor(DAEMON_THREADS, thread_name_prefix="amavisd-ask")
        self.connections: set[asyncio.Task] = set()
        self.calls: set[DaemonCall] = set()  # questions to the daemon in flight
        self.servers: list[asyncio.AbstractServer] = []
        self.unix_paths: list[str] = []

    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            if sock.family == socket.AF_UNIX:
                server = await asyncio.start_unix_server(self._accept, sock=sock)
                self.unix_paths.append(sock.getsockname())
            else:
                server = await asyncio.start_server(self._accept, sock=sock)
            self.servers.append(server)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, give messages in flight `grace` seconds, then close."""
        for server in self.servers:
            server.close()
        for path in self.unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self.connections:
            await asyncio.wait(self.connections, timeout=grace)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(self.connections, timeout=5.0)
        for call in list(self.calls):  # questions of cancelled connections: end them now
            call.abort()
        # Every call ends promptly once aborted, and removes its spool itself.
        await asyncio.to_thread(self.executor.shutdown, True)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("more than %d MTA connections: closing a new one", MAX_CONNECTIONS)
            writer.close()
            return
        self.connections.add(task)
        try:
            await self.serve_connection(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): the connection is closed, the MTA applies its default action
        finally:
            self.connections.discard(task)

    def _open_sink(self) -> SpoolSink:
        return SpoolSink(self.settings.tempbase)

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        session = MilterSession(self._open_sink, self.policy, self.settings.policy_bank)
        try:
            data = b""
            while not session.closed:
                events = session.feed(data)
                while events:
                    event = events.pop(0)
                    if isinstance(event, Send):
                        writer.write(event.data)
                    elif isinstance(event, Ask):
                        writer.write(await self.ask(session, event, writer))
                        events.extend(session.feed(b""))  # commands held back meanwhile
                    elif isinstance(event, Close) and event.reason:
                        log.warning("closing an MTA connection: %s", event.reason)
                await drain(writer)
                if session.closed:
                    break
                data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                if not data:
                    break
        except (ConnectionError, TimeoutError):
            pass
        except Exception:  # a bug of ours: this connection ends, the MTA applies its default
            log.exception("internal error on an MTA connection")
        finally:
            session.close()
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # replies nobody reads: close() would wait for ever
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5.0)

    def _call_ended(self, call: DaemonCall, future: asyncio.Future) -> None:
        self.calls.discard(call)
        if not future.cancelled():
            future.exception()  # retrieved: a call given up on may still fail later

    async def ask(self, session: MilterSession, question: Ask,
                  writer: asyncio.StreamWriter) -> bytes:
        """The end-of-message packets: the daemon's verdict, or on_error."""
        settings = self.settings
        call = DaemonCall(settings.daemon_socket, settings.daemon_timeout, question)
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self.executor, call.run)
        except RuntimeError as err:  # the executor is shutting down
            question.sink.discard()
            return session.fail(f"cannot ask amavisd: {err}")
        self.calls.add(call)
        future.add_done_callback(lambda done: self._call_ended(call, done))
        deadline = loop.time() + settings.daemon_timeout
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    call.abort()
                    return session.fail(f"no verdict from amavisd within "
                                        f"{settings.daemon_timeout:g}s")
                done, _ = await asyncio.wait({future}, timeout=min(settings.progress_interval,
                                                                   left))
                if done:
                    break
                writer.write(PROGRESS)
                await drain(writer)
        except BaseException:
            call.abort()  # the MTA went away, or we are stopping
            raise
        try:
            reply = future.result()
        except FAILURES as err:
            return session.fail(str(err))
        except Exception as err:  # noqa: BLE001 - fail closed on anything
            log.exception("internal error asking amavisd")
            return session.fail(f"internal error: {type(err).__name__}")
        packets = session.answer(reply)
        log.info("%s: %s, id=%s", question.summary, reply.get("return_value") or "?",
                 reply.get("log_id") or "?")
        return packets
