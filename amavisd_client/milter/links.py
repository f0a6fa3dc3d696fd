"""The milter's AM.PDP connections to the daemon, kept between questions.

Why: a new connection a message made the daemon's master accept it, look at
it and hand it over, and a worker set a session up for one request; on one
kept connection the daemon spends ~0.35 ms a message less (0.85 -> 0.50 ms,
tests' daemon, alternating batches; through Postfix 1.76 -> 1.43 ms at c=4,
1.77 -> 1.33 at c=1). So an answered connection goes back to
a small LIFO pool (at most `keep` idle, each closed after `idle` seconds
unused and when the milter stops) and carries the next question.

A kept connection holds one of the daemon's workers. The daemon gives an
idle one away when others wait for a worker (after 0.1 s of silence), but
a busy milter is never silent: a question of ours on a new connection could
wait in the daemon's queue while our kept connections take every worker in
turn. So while any question on a new connection has waited `STARVING`
seconds unanswered, answered connections are closed, not kept: their
workers take the waiting ones, as without a pool.

Before reuse a connection is looked at (one non-blocking MSG_PEEK): an end
of file or an error means the worker gave it away or retired; it is closed
and the next one (or a new one) is taken. Anything readable is a reply we
never asked for: closed too. Never an error for the message.
"""

from __future__ import annotations

import asyncio
import socket
import time

from amavisd_client.connection import ClientError
from amavisd_client.wire.address import Address

KEEP = 8  # idle connections at most
IDLE = 3.0  # seconds an idle connection is kept
STARVING = 0.1  # seconds a question on a new connection waits before we stop keeping
BACKLOG_RETRY = 0.01  # seconds between connects while the daemon's backlog is full


class Link:
    """One connection: `carried` once it brought a whole reply (a kept one)."""

    __slots__ = ("sock", "carried", "since")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.carried = False
        self.since = 0.0  # monotonic: when it went idle, or its question started

    def close(self) -> None:
        self.sock.close()


class DaemonLinks:
    """Connections to the daemon at `address`: `take` one, then `give` it
    back after a whole reply with nothing unread after it, else `drop` it."""

    def __init__(self, address: Address, keep: int = KEEP, idle: float = IDLE):
        self.address = address
        self.keep = keep
        self.idle_for = idle
        self.idle: list[Link] = []  # LIFO: the latest is the likeliest still served
        self.fresh: set[Link] = set()  # new connections with a question on them
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False  # the milter stopped: nothing is kept any more
        self.opened = self.reused = self.retried = 0  # counters, for tests and the bench

    async def take(self, new: bool = False) -> Link:
        """A live kept connection, or a new one (`new`: always a new one)."""
        while self.idle and not new:
            link = self.idle.pop()
            if self._alive(link):
                self.reused += 1
                return link
            link.close()
        link = Link(await self._connect())
        link.since = time.monotonic()
        self.opened += 1
        self.fresh.add(link)
        return link

    def give(self, link: Link) -> None:
        """`link` carried a whole reply and nothing after it: keep it if there
        is room and no question of ours may be waiting for its worker."""
        self.fresh.discard(link)
        link.carried = True
        now = time.monotonic()
        if self.closed or len(self.idle) >= self.keep or self._starving(now):
            link.close()
            return
        link.since = now
        self.idle.append(link)
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().call_later(self.idle_for, self._sweep)

    def drop(self, link: Link) -> None:
        self.fresh.discard(link)
        link.close()

    def close(self) -> None:
        """The milter stops: every idle connection closed (in-use ones are
        closed by their questions, cancelled by then)."""
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        idle, self.idle = self.idle, []
        for link in idle:
            link.close()

    def _starving(self, now: float) -> bool:
        return any(now - link.since >= STARVING for link in self.fresh)

    def _sweep(self) -> None:
        self.sweeper = None
        limit = time.monotonic() - self.idle_for
        stale = [link for link in self.idle if link.since <= limit]
        self.idle = [link for link in self.idle if link.since > limit]
        for link in stale:
            link.close()
        if self.idle:
            wait = self.idle[0].since + self.idle_for - time.monotonic()
            self.sweeper = asyncio.get_running_loop().call_later(max(wait, 0.01), self._sweep)

    @staticmethod
    def _alive(link: Link) -> bool:
        """Nothing to read and no error: still ours (the socket is non-blocking)."""
        try:
            link.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # end of file, or bytes we never asked for

    async def _connect(self) -> socket.socket:
        where = self.address
        family = (socket.AF_INET6 if where.is_ipv6 else socket.AF_INET) if where.is_tcp \
            else socket.AF_UNIX
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as err:
                raise ClientError(f"cannot connect to amavisd at {where}: {err}") from None
            try:
                sock.setblocking(False)
                if family != socket.AF_UNIX:
                    await loop.sock_connect(sock, where.target)
                    return sock
                sock.connect(where.target)  # a Unix socket connects at once, or:
                return sock
            except BlockingIOError:  # EAGAIN, its backlog is full: try again shortly
                sock.close()  # (a blocking client failed here; the caller's timeout bounds us)
            except (OSError, ValueError) as err:
                sock.close()
                raise ClientError(f"cannot connect to amavisd at {where}: {err}") from None
            except BaseException:
                sock.close()
                raise
            await asyncio.sleep(BACKLOG_RETRY)
