"""The doorman: accepts every connection; a worker gets one only once its request is in.

Why: a worker serves one connection at a time, so a local user of the
socket's group who opens more silent connections than there are workers
would hold every worker for `client_idle_timeout`, again and again, and
real clients would starve. The doorman, a thread of the master, owns the
listening sockets, accepts, and holds each AM.PDP connection until its
whole first request has arrived (AM.PDP clients speak first; a request ends
with an empty line). It only looks, with MSG_PEEK: it never reads, so the
worker's session sees every byte. Then it passes the connection
(SCM_RIGHTS), with the index of its listener, into one SOCK_SEQPACKET
queue that every idle worker waits on: the kernel gives each message to
exactly one worker, in order. A silent connection costs one descriptor in
the master, not a worker; it is closed after `client_idle_timeout`, and one
that trickles its request after `request_timeout` from its first byte; at
most `max_pending_connections` are held (past that, the oldest silent, then
the oldest trickling one goes). A request bigger than `PEEK_WINDOW` is passed
on as it stands (the worker's own limits apply, as before the doorman).
A trickling connection is looked at again with a growing pause (2 ms to
50 ms, FIONREAD first, MSG_PEEK only when more came): a client that sends a
byte at a time costs the master little, and a real one that writes its
request in pieces waits a few milliseconds at most.
SMTP/LMTP clients wait for our greeting, so theirs are passed at once.
Only a connection's first request is waited for here: later ones on the same
connection are the worker's (client_idle_timeout between requests,
max_connection_requests, max_connection_time bound them, as before).
The price is one more hand-over per connection (about 0.1 to 0.25 ms on a
busy 2-core machine). TCP_DEFER_ACCEPT would not do: the AM.PDP socket is a
Unix socket; nor would a lobby in each worker: a connection that speaks
while its worker is busy would wait behind that worker's message.

Why a thread of the master and not a process of its own: it does nothing
but accept, poll and pass descriptors (no parsing, no payload), it must live
exactly as long as the master (the listening sockets die with it, and the
workers see end-of-file on the queue), and it adds no process to supervise,
count or mistake for a worker. The one cost of a thread beside fork():
a worker must not inherit a held connection (closing it in the doorman
would then not hang up), so `forking()` keeps the doorman still across the
fork and `forget_in_child()` closes, in the new worker, every descriptor the
doorman held at that instant. If the thread dies of a bug, the master
starts a new one (`watch`); the connections it held are closed, their
clients retry.

What a worker is given it serves, even if it was asked to leave meanwhile:
it only takes from the queue while it is alive and idle. Connections still
in the queue belong to the queue (the master holds its reading end), so a
worker killed while idle loses nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import selectors
import socket
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from amavisd.listeners import AMPDP, Listener

log = logging.getLogger("amavisd.doorman")


def ampdp_request_complete(data: bytes) -> bool:
    """An AM.PDP block ends with an empty line (CR LF or LF); empty lines
    before the first attribute do not count (amavisd_client.wire.ampdp)."""
    body = data.lstrip(b"\r\n")
    return b"\n\n" in body or b"\n\r\n" in body


# Protocols whose clients speak first, and when their first request is whole:
# their connections wait here until then. The others are passed at once.
REQUEST_COMPLETE = {AMPDP: ampdp_request_complete}
PEEK_WINDOW = 64 * 1024  # a request this big is passed on as it stands
RECHECK_FIRST, RECHECK_MAX = 0.002, 0.05  # seconds between looks at a trickling request
ACCEPTS_PER_TURN = 64  # then the other listeners and the held connections get a look
SUMMARY_EVERY = 5.0  # seconds between log lines about closed idle connections
MAX_WAIT = 1.0  # the loop turns at least this often (stop, new settings)


@dataclass(eq=False)
class Held:
    conn: socket.socket
    index: int  # of its listener in the master's list
    deadline: float  # monotonic: closed if its request is not whole then
    accepted: float = field(default_factory=time.monotonic)
    seen: int = 0  # bytes of a partial request at the last look
    pause: float = RECHECK_FIRST  # before the next look at a partial request


class Doorman:
    def __init__(self, listeners: list[Listener], idle_timeout: float, cap: int,
                 request_timeout: float = 30.0):
        self.listeners = listeners
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.cap = cap
        # send: ours (the doorman's); queue: what every worker waits on.
        self.send, self.queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lock = threading.Lock()  # held for every change of what we hold, and over fork()
        self.silent: dict[int, Held] = {}  # by fd, oldest first: waiting for first bytes
        self.partial: dict[int, Held] = {}  # by fd, oldest first: the request is trickling
        self.looks: list[tuple[float, int, Held]] = []  # heap: when to look at a partial
        self._order = itertools.count()
        self.ready: deque[Held] = deque()  # spoke (or server speaks first): waiting for room
        self.selector: selectors.BaseSelector | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.paused = False  # listeners out of the selector while at the cap
        self.waiting_room = False  # our end of the queue in the selector: it was full
        self.closed_idle = self.closed_slow = self.closed_cap = 0
        self.passed = 0
        self._last_summary = -SUMMARY_EVERY  # the first closing is logged at once
        self._wake_r, self._wake_w = os.pipe()

    # -- the master's side -------------------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        for index, listener in enumerate(self.listeners):
            self.selector.register(listener.sock, selectors.EVENT_READ, index)
        self.paused = self.waiting_room = False
        self.thread = threading.Thread(target=self._run, name="doorman", daemon=True)
        self.thread.start()

    def configure(self, idle_timeout: float, cap: int, request_timeout: float) -> None:
        """New settings (HUP); the held connections keep their deadlines."""
        self.idle_timeout, self.cap, self.request_timeout = idle_timeout, cap, request_timeout

    def watch(self) -> None:
        """From the master's loop: a doorman thread that died of a bug is replaced."""
        if self.thread is None or self.thread.is_alive() or self.stopping:
            return
        log.error("the doorman thread died (see above): closing the %d connection(s) it "
                  "held and starting a new one", self.held)
        self._drop_all()
        self.start()

    @property
    def held(self) -> int:
        return len(self.silent) + len(self.partial) + len(self.ready)

    def stop(self) -> None:
        """Stop accepting; hang up on what we hold (never given to a worker, so
        never answered: their clients retry). The queue stays open for the
        workers still serving."""
        self.stopping = True
        if self.thread is not None:
            os.write(self._wake_w, b"x")
            self.thread.join(5.0)
        self._drop_all()

    def close(self) -> None:
        self.send.close()
        self.queue.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        """Around fork(): what `forget_in_child` closes is exactly what the
        child inherited."""
        with self.lock:
            yield

    def forget_in_child(self) -> None:
        """In a new worker: the held connections, the selector and our end of
        the queue are the master's (a copy here would keep a connection open
        after the doorman hangs up, or the queue open after the master died)."""
        for held in [*self.silent.values(), *self.partial.values(), *self.ready]:
            held.conn.close()
        self.silent, self.partial, self.ready, self.looks = {}, {}, deque(), []
        if self.selector is not None:
            self.selector.close()
        self.send.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.stopping:
                events = self.selector.select(self._timeout())
                with self.lock:
                    if self.stopping:
                        return
                    for key, _ in events:
                        if key.fileobj == self._wake_r:
                            os.read(self._wake_r, 512)
                        elif key.fileobj is self.send:
                            pass  # room in the queue: _pass_ready below
                        elif isinstance(key.data, Held):
                            self._spoke(key.data)
                        else:
                            self._accept(key.data)
                    self._look_again()
                    self._pass_ready()
                    expired = self._expire()
                    self._summarise()  # before the hang-up: a client reading the log finds it
                    for held in expired:
                        held.conn.close()
        except Exception:
            log.exception("doorman: internal error")

    def _timeout(self) -> float:
        due = [held.deadline for held in (_oldest(self.silent), _oldest(self.partial)) if held]
        if self.looks:
            due.append(self.looks[0][0])
        if not due:
            return MAX_WAIT
        return max(0.0, min(MAX_WAIT, min(due) - time.monotonic()))

    def _accept(self, index: int) -> None:
        listener = self.listeners[index]
        for _ in range(ACCEPTS_PER_TURN):
            if not self._room():
                return
            try:
                conn, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("doorman: cannot accept on %s: %s", listener.protocol,
                              err.strerror)
                    self._drop_oldest()
                    return
                raise
            conn.setblocking(False)
            now = time.monotonic()
            held = Held(conn, index, now + self.idle_timeout, now)
            if listener.protocol not in REQUEST_COMPLETE:
                self.ready.append(held)
            else:
                self._first_look(held)
            while self.held > self.cap and (self.silent or self.partial):
                self._drop_oldest()  # the oldest silent (or trickling) one makes room

    def _room(self) -> bool:
        """Whether one more connection may be taken: at the cap, only if a
        silent one can make room; with none silent, the listeners rest (the
        kernel's backlog holds new clients) until the workers take some."""
        if self.held < self.cap or self.silent or self.partial:
            self._resume()
            return True
        self._pause()
        return False

    def _pause(self) -> None:
        if not self.paused:
            for listener in self.listeners:
                self.selector.unregister(listener.sock)
            self.paused = True

    def _resume(self) -> None:
        if self.paused:
            for index, listener in enumerate(self.listeners):
                self.selector.register(listener.sock, selectors.EVENT_READ, index)
            self.paused = False

    def _first_look(self, held: Held) -> None:
        """Just accepted: the request is often here already (no turn of the
        loop lost on it); if not, wait for its first bytes in the selector."""
        verdict = self._look(held)
        if verdict == "wait":
            self.silent[held.conn.fileno()] = held
            self.selector.register(held.conn, selectors.EVENT_READ, held)
        else:
            self._settle(held, verdict)

    def _spoke(self, held: Held) -> None:
        """Readable at last: out of the selector; passed on, closed (end of file
        before a word), or watched until its request is whole."""
        verdict = self._look(held)
        if verdict == "wait":
            return
        self.silent.pop(held.conn.fileno(), None)
        self.selector.unregister(held.conn)
        self._settle(held, verdict)

    def _look(self, held: Held) -> str:
        """"ready" (a whole request, or PEEK_WINDOW of one), "partial", "gone"
        (end of file or an error before a whole request), or "wait" (nothing)."""
        try:
            data = held.conn.recv(PEEK_WINDOW, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return "wait"
        except OSError:
            return "gone"
        if not data:
            return "gone"
        complete = REQUEST_COMPLETE[self.listeners[held.index].protocol]
        if len(data) >= PEEK_WINDOW or complete(data):
            return "ready"
        held.seen = len(data)
        return "partial"

    def _settle(self, held: Held, verdict: str) -> None:
        """Out of the selector: to the workers, to the trickling, or closed."""
        if verdict == "ready":
            self.ready.append(held)
        elif verdict == "partial":
            held.deadline = time.monotonic() + self.request_timeout
            self.partial[held.conn.fileno()] = held
            self._look_later(held)
        else:
            held.conn.close()

    def _look_later(self, held: Held) -> None:
        heapq.heappush(self.looks, (time.monotonic() + held.pause, next(self._order), held))
        held.pause = min(RECHECK_MAX, held.pause * 2)

    def _look_again(self) -> None:
        """The trickling requests due for a look: FIONREAD first, so a
        connection that sent nothing new costs no copy."""
        now = time.monotonic()
        while self.looks and self.looks[0][0] <= now:
            held = heapq.heappop(self.looks)[2]
            fd = held.conn.fileno()
            if self.partial.get(fd) is not held:
                continue  # closed or passed on meanwhile
            try:
                waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                waiting = -1
            verdict = self._look(held) if waiting != held.seen else "partial"
            if verdict in ("partial", "wait"):
                self._look_later(held)
                continue
            del self.partial[fd]
            self._settle(held, verdict)

    def _unhold(self, held: Held) -> None:
        """Out of the selector (or the partial list) before its descriptor is
        closed or passed on."""
        if self.partial.pop(held.conn.fileno(), None) is None:
            self.silent.pop(held.conn.fileno(), None)
            self.selector.unregister(held.conn)

    def _pass_ready(self) -> None:
        while self.ready:
            held = self.ready[0]
            try:
                socket.send_fds(self.send, [bytes((held.index,))], [held.conn.fileno()],
                                socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self._want_room(True)
                return
            except OSError as err:  # never silently: the client sees the hang-up and retries
                log.error("doorman: cannot pass a connection to the workers: %s",
                          err.strerror)
            self.ready.popleft()
            held.conn.close()  # the queue holds it now
            self.passed += 1
        self._want_room(False)
        if self.held < self.cap:
            self._resume()

    def _want_room(self, waiting: bool) -> None:
        """Wake when the queue has room again (workers all busy meanwhile)."""
        if waiting and not self.waiting_room:
            self.selector.register(self.send, selectors.EVENT_WRITE, None)
        elif not waiting and self.waiting_room:
            self.selector.unregister(self.send)
        self.waiting_room = waiting

    def _expire(self) -> list[Held]:
        """Those past their deadline, out of the selector; the caller closes them."""
        now, expired = time.monotonic(), []
        for waiting, counter in ((self.silent, "closed_idle"), (self.partial, "closed_slow")):
            while waiting and _oldest(waiting).deadline <= now:
                held = _oldest(waiting)
                self._unhold(held)
                expired.append(held)
                setattr(self, counter, getattr(self, counter) + 1)
        return expired

    def _drop_oldest(self) -> None:
        held = _oldest(self.silent) or _oldest(self.partial)
        if held is not None:
            self._unhold(held)
            held.conn.close()
            self.closed_cap += 1

    def _summarise(self) -> None:
        """At most one line of each kind every few seconds, not one a
        connection: a flood of silent connections must not flood the log.
        (Only AM.PDP connections are held: REQUEST_COMPLETE.)"""
        now = time.monotonic()
        if now - self._last_summary < SUMMARY_EVERY or not (
                self.closed_idle or self.closed_slow or self.closed_cap):
            return
        if self.closed_idle:
            log.info("AM.PDP client idle for client_idle_timeout (%gs): doorman closed %d "
                     "connection(s)", self.idle_timeout, self.closed_idle)
        if self.closed_slow:
            log.warning("AM.PDP request not complete within request_timeout (%gs): doorman "
                        "closed %d connection(s)", self.request_timeout, self.closed_slow)
        if self.closed_cap:
            log.warning("max_pending_connections (%d) reached: doorman closed the %d oldest "
                        "waiting connection(s)", self.cap, self.closed_cap)
        self.closed_idle = self.closed_slow = self.closed_cap = 0
        self._last_summary = now

    def _drop_all(self) -> None:
        with self.lock:
            if self.selector is not None:
                self.selector.close()
                self.selector = None
            for held in [*self.silent.values(), *self.partial.values(), *self.ready]:
                held.conn.close()
            self.silent, self.partial, self.ready, self.looks = {}, {}, deque(), []


def _oldest(held: dict[int, Held]) -> Held | None:
    return next(iter(held.values()), None)
