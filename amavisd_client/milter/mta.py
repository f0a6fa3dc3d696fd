"""One MTA connection as an asyncio Protocol: bytes in, the state machine, bytes out.

Why a Protocol and not asyncio streams: a stream reader costs a future per
read and, under a timeout, a task or a timer per read; an MTA sends a
message in six or more separate writes (one a SMTP stage), so that was most
of the loop's work a message. Here the bytes go straight from the transport
to `MilterSession.feed` and its replies straight back to `transport.write`.

Flow control instead of awaits: while the daemon is asked (`MilterServer.ask`
in a task) the session takes no command; bytes that arrive meanwhile (an MTA
waits for the verdict, so rarely) are kept, one read at most, and reading is
paused until the verdict, so the rest waits in the kernel, not in us (paused
only then: a pause and a resume are two epoll_ctl calls a message); when
the MTA stops reading our replies (`pause_writing`), we stop reading its
commands. One timer for all connections (`IdleSweep`), not one a connection
(a timer made and cancelled a message, Postfix connecting once a message),
closes a connection that has been silent (or would not read) for
IDLE_TIMEOUT: it looks every SWEEP seconds (a quarter of a shorter
IDLE_TIMEOUT), so such a connection is closed within IDLE_TIMEOUT + SWEEP.

Never: accept on doubt (the server's `ask` and the state machine fail
closed), or let an exception escape into asyncio (it is logged and the
connection aborted: the MTA applies its default action).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from amavisd_client.milter.state import Ask, Close, Event, MilterSession, Send

if TYPE_CHECKING:
    from amavisd_client.milter.server import MilterServer

log = logging.getLogger("amavisd.milter")

IDLE_TIMEOUT = 3600.0  # an MTA connection silent this long is closed (SMTP's own are 300 s)
SWEEP = 60.0  # seconds between looks for idle connections
MAX_CONNECTIONS = 1000  # more at once are closed at once: the MTA applies its default action


READ_BUFFER = 256 * 1024  # bytes a read takes at most, into the server's one buffer


class MtaConnection(asyncio.BufferedProtocol):
    """The transport reads into the server's buffer (`get_buffer`), shared by
    every connection: asyncio fills it and calls `buffer_updated` at once, and
    the codec copies what it keeps. A fresh 256 KiB bytes a read cost three
    system calls (mmap, mremap, munmap: above glibc's mmap threshold)."""

    def __init__(self, server: MilterServer):
        self.server = server
        self.loop = server.loop or asyncio.get_running_loop()
        self.done: asyncio.Future = self.loop.create_future()
        self.session = MilterSession(server.open_sink, server.policy,
                                     server.settings.policy_bank)
        self.transport: asyncio.Transport | None = None
        self.asking: asyncio.Task | None = None  # the question to the daemon in flight
        self.writing_paused = False
        self.last = self.loop.time()  # when the MTA last sent bytes

    # -- asyncio's side -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.server.connections) >= MAX_CONNECTIONS:
            log.warning("more than %d MTA connections: closing a new one",
                        MAX_CONNECTIONS)
            transport.close()
            return
        self.server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.last = self.loop.time()
        if self.asking is not None:  # the session keeps these; the rest waits in the kernel
            self._reading(False)
        self._guarded(self._handle, self.session.feed(self.server.read_buffer[:nbytes]))

    def eof_received(self) -> bool:
        return False  # the MTA is done: close our side too

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._reading(False)

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()  # a half-spooled message is dropped
        if self.asking is not None:
            self.asking.cancel()  # ask() aborts the daemon call; the call removes its spool
        self.server.connections.discard(self)
        if not self.done.done():
            self.done.set_result(None)

    # -- ours -----------------------------------------------------------------------------

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _reading(self, on: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if on and self.asking is None and not self.writing_paused:
            transport.resume_reading()
        elif not on:
            transport.pause_reading()

    def _guarded(self, step, *args) -> None:
        try:
            step(*args)
        except Exception:  # a bug of ours: this connection ends, the MTA applies its default
            log.exception("internal error on an MTA connection")
            self.abort()

    def _handle(self, events: list[Event]) -> None:
        transport = self.transport
        assert transport is not None
        for n, event in enumerate(events):
            if isinstance(event, Send):
                transport.write(event.data)
            elif isinstance(event, Ask):  # the machine stops at an Ask: rest is empty
                self.asking = self.loop.create_task(self._ask(event, events[n + 1:]))
                return
            elif isinstance(event, Close) and event.reason:
                log.warning("closing an MTA connection: %s", event.reason)
        if self.session.closed:
            self.close()

    async def _ask(self, question: Ask, rest: list[Event]) -> None:
        transport = self.transport
        assert transport is not None
        try:
            packets = await self.server.ask(self.session, question, transport)
        except asyncio.CancelledError:
            return  # the connection is gone, or we are stopping
        except Exception:  # noqa: BLE001 - a bug of ours
            log.exception("internal error on an MTA connection")
            self.abort()
            return
        self.asking = None
        self.last = self.loop.time()
        if transport.is_closing():
            return
        transport.write(packets)
        self._guarded(self._handle, rest + self.session.feed(b""))  # held back meanwhile
        self._reading(True)

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # replies nobody reads: close() would wait for ever
        else:
            transport.close()

    def idle_since(self, now: float) -> float:
        """Seconds the MTA has been silent (0 while the daemon is asked:
        daemon_timeout bounds that)."""
        return 0.0 if self.asking is not None else now - self.last


class IdleSweep:
    """Closes the server's connections silent for `idle` seconds (default
    IDLE_TIMEOUT), looking every SWEEP seconds from `start()` to `stop()`."""

    def __init__(self, connections: set[MtaConnection], idle: float | None = None):
        self.connections = connections
        self.idle = IDLE_TIMEOUT if idle is None else idle
        self.every = min(SWEEP, self.idle / 4)
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.every, self._sweep)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.every, self._sweep)  # first: whatever happens below
        now = loop.time()
        for connection in [c for c in self.connections if c.idle_since(now) >= self.idle]:
            try:
                connection.close()
            except Exception:  # one connection's failure must not keep the others open
                log.exception("closing an idle MTA connection")
