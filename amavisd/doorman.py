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

Out of descriptors (EMFILE, ENFILE) or memory on accept(): a connection
that has not spoken yet is closed to make room; with none, the listeners
rest out of the poll for a doubling back-off (50 ms to 1 s), since a
listener polled again at once is readable at once and the thread would
spin. Clients wait in the kernel's backlog; what is held keeps being served;
one log line every few seconds says how often. A hand-out that fails for
want of kernel room (ENOBUFS, ETOOMANYREFS) keeps the connection and retries.
On a stop, the master hangs up at once on connections still in the queue
(`hang_up_queued`, once the workers were told to take nothing more).
The common case costs one accept, one peek and one send_fds, in the turn
the connection arrives in when its request is already there.

What a worker is given it serves, even if it was asked to leave meanwhile:
it only takes from the queue while it is alive and idle. Connections still
in the queue belong to the queue (the master holds its reading end), so a
worker killed while idle loses nothing.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from amavisd.listeners import AMPDP, Listener

log = logging.getLogger("amavisd.doorman")


def ampdp_request_complete(data: bytes | bytearray, end: int | None = None) -> bool:
    """An AM.PDP block ends with an empty line (CR LF or LF); empty lines
    before the first attribute do not count (amavisd_client.wire.ampdp).
    `end`: only data[:end] counts (the doorman peeks into one reused buffer)."""
    end = len(data) if end is None else end
    start = 0
    while start < end and data[start] in b"\r\n":
        start += 1
    return data.find(b"\n\n", start, end) >= 0 or data.find(b"\n\r\n", start, end) >= 0


# Protocols whose clients speak first, and when their first request is whole:
# their connections wait here until then. The others are passed at once.
REQUEST_COMPLETE = {AMPDP: ampdp_request_complete}
PEEK_WINDOW = 64 * 1024  # a request this big is passed on as it stands
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT  # accepted sockets stay blocking: one call less
RECHECK_FIRST, RECHECK_MAX = 0.002, 0.05  # seconds between looks at a trickling request
ACCEPTS_PER_TURN = 64  # then the other listeners and the held connections get a look
SUMMARY_EVERY = 5.0  # seconds between log lines of each kind
MAX_WAIT = 1.0  # the loop turns at least this often (stop, new settings)
REST_FIRST, REST_MAX = 0.05, 1.0  # seconds the listeners rest when accept() lacks resources
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# send_fds() failing for want of kernel memory or in-flight descriptor room
# (ETOOMANYREFS: in flight past RLIMIT_NOFILE): the connection is kept, retried later.
PASS_LATER = (errno.ENOBUFS, errno.ENOMEM, errno.ETOOMANYREFS)
# accept(2): errors pending on the new connection (TCP), "treat them like EAGAIN".
ACCEPT_RETRY = (errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                errno.ENETUNREACH, errno.EPERM)
READY, PARTIAL, GONE, WAIT = "ready", "partial", "gone", "wait"


@dataclass(eq=False, slots=True)
class Held:
    conn: socket.socket
    index: int  # of its listener in the master's list
    deadline: float  # monotonic: closed if its request is not whole then
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
        self.poll: select.epoll | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.listening = False  # the listeners in the poll: not at the cap, not resting
        self.waiting_room = False  # our end of the queue in the poll: it was full
        self.rest_until = self.pass_after = 0.0  # monotonic: listeners / hand-out resting
        self.rest = REST_FIRST  # the next rest, doubling while accept() keeps failing
        self.peeked = bytearray(PEEK_WINDOW)  # one buffer for every look
        self.peeked_size = 0  # of the last look
        self.closed_idle = self.closed_slow = self.closed_cap = 0
        self.closed_unpassed = self.accept_failures = 0
        self.last_error = ""  # of the failures counted above, for the summary
        self.passed = 0
        self._last_summary = -SUMMARY_EVERY  # the first line is logged at once
        self._wake_r, self._wake_w = os.pipe()

    # -- the master's side -------------------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        self.poll = select.epoll()
        self.poll.register(self._wake_r, select.EPOLLIN)
        self.listening = self.waiting_room = False
        self._listen(True)
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

    @property
    def queued(self) -> int:
        """Connections in the queue, passed and not yet taken by a worker
        (one byte a hand-out: FIONREAD of a SEQPACKET socket counts them all)."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.queue, termios.FIONREAD, b"\0" * 4))[0]
        except (OSError, ValueError):
            return 0

    def stop(self) -> None:
        """Stop accepting; hang up on what we hold (never given to a worker, so
        never answered: their clients retry). The queue stays open for the
        workers still serving."""
        self.stopping = True
        if self.thread is not None:
            os.write(self._wake_w, b"x")
            self.thread.join(5.0)
        self._drop_all()

    def hang_up_queued(self) -> int:
        """Once the workers were told to leave (they take nothing more): close
        the connections still in the queue at once, so their clients tempfail
        now rather than after graceful_timeout. How many there were."""
        count = 0
        while True:
            try:
                _, fds = recv_fds_nowait(self.queue, 16, 1)
            except OSError:  # BlockingIOError: empty
                break
            if not fds:
                break
            for fd in fds:
                os.close(fd)
            count += 1
        if count:
            log.warning("stopping: hung up on %d connection(s) no worker took "
                        "(their clients retry)", count)
        return count

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
        """In a new worker: the held connections, the poll and our end of the
        queue are the master's (a copy here would keep a connection open after
        the doorman hangs up, or the queue open after the master died)."""
        for held in [*self.silent.values(), *self.partial.values(), *self.ready]:
            held.conn.close()
        self.silent, self.partial, self.ready, self.looks = {}, {}, deque(), []
        if self.poll is not None:
            self.poll.close()
        self.send.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        by_fd = {listener.sock.fileno(): index for index, listener in enumerate(self.listeners)}
        wake = self._wake_r
        try:
            while not self.stopping:
                events = self.poll.poll(self._timeout())
                with self.lock:
                    if self.stopping:
                        return
                    for fd, _ in events:
                        if fd in by_fd:
                            self._accept(by_fd[fd])
                        elif (held := self.silent.get(fd)) is not None:
                            self._spoke(held)
                        elif fd == wake:
                            os.read(wake, 512)
                        # send: room in the queue again, _pass_ready below
                    if self.looks:
                        self._look_again()
                    if self.ready:
                        self._pass_ready()
                    self._listen(self._room() and time.monotonic() >= self.rest_until)
                    expired = self._expire() if self.silent or self.partial else ()
                    self._summarise()  # before the hang-up: a client reading the log finds it
                    for held in expired:
                        held.conn.close()
        except Exception:
            log.exception("doorman: internal error")

    def _timeout(self) -> float:
        due = [held.deadline for held in (_oldest(self.silent), _oldest(self.partial)) if held]
        if self.looks:
            due.append(self.looks[0][0])
        if not self.listening and self.rest_until:
            due.append(self.rest_until)
        if self.ready and not self.waiting_room:
            due.append(self.pass_after)
        if not due:
            return MAX_WAIT
        return max(0.0, min(MAX_WAIT, min(due) - time.monotonic()))

    def _accept(self, index: int) -> None:
        """The fast path: accepted, the request is here already, the queue has
        room: one peek and one send_fds, nothing held, nothing polled."""
        sock = self.listeners[index].sock
        complete = REQUEST_COMPLETE.get(self.listeners[index].protocol)
        for _ in range(ACCEPTS_PER_TURN):
            if not self._room():
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in ACCEPT_RETRY:
                    continue  # that connection's own error (accept(2)): the next one
                if err.errno not in OUT_OF_RESOURCES:
                    raise
                self._out_of_resources(err)
                return
            self.rest = REST_FIRST
            verdict = self._look(conn, complete) if complete else READY
            if verdict is READY and not self.ready and self._hand(conn, index):
                continue
            held = Held(conn, index, time.monotonic() + self.idle_timeout,
                        self.peeked_size if verdict is PARTIAL else 0)
            if verdict is WAIT:
                self.silent[conn.fileno()] = held
                self.poll.register(conn, select.EPOLLIN)
            else:
                self._settle(held, verdict)
            while self.held > self.cap and (self.silent or self.partial):
                self._drop_oldest()  # the oldest silent (or trickling) one makes room

    def _out_of_resources(self, err: OSError) -> None:
        """accept() failed for want of descriptors or memory. A connection of
        ours that has not spoken makes room; with none, the listeners rest
        (out of the poll, a doubling back-off): polled at once, they would
        be readable at once, and the thread would spin."""
        self.accept_failures += 1
        self.last_error = err.strerror or str(err)
        if self.silent or self.partial:
            self._drop_oldest()
            return
        self.rest_until = time.monotonic() + self.rest
        self.rest = min(REST_MAX, self.rest * 2)
        self._listen(False)

    def _room(self) -> bool:
        """Whether one more connection may be taken: at the cap, only if a
        silent one can make room; with none silent, the listeners rest (the
        kernel's backlog holds new clients) until the workers take some."""
        return self.held < self.cap or bool(self.silent or self.partial)

    def _listen(self, on: bool) -> None:
        if on == self.listening:
            return
        for listener in self.listeners:
            if on:
                self.poll.register(listener.sock, select.EPOLLIN)
            else:
                self.poll.unregister(listener.sock)
        self.listening = on
        if on:
            self.rest_until = 0.0

    def _spoke(self, held: Held) -> None:
        """Readable at last: out of the poll; passed on, closed (end of file
        before a word), or watched until its request is whole."""
        verdict = self._look(held.conn, REQUEST_COMPLETE[self.listeners[held.index].protocol],
                             held)
        if verdict is WAIT:
            return
        del self.silent[held.conn.fileno()]
        self.poll.unregister(held.conn)
        self._settle(held, verdict)

    def _look(self, conn: socket.socket, complete, held: Held | None = None) -> str:
        """READY (a whole request, or PEEK_WINDOW of one), PARTIAL, GONE (end
        of file or an error before a whole request), or WAIT (nothing yet)."""
        try:
            size = conn.recv_into(self.peeked, PEEK_WINDOW, PEEK)
        except (BlockingIOError, InterruptedError):
            return WAIT
        except OSError:
            return GONE
        if not size:
            return GONE
        self.peeked_size = size
        if size >= PEEK_WINDOW or complete(self.peeked, size):
            return READY
        if held is not None:
            held.seen = size
        return PARTIAL

    def _settle(self, held: Held, verdict: str) -> None:
        """Out of the poll: to the workers, to the trickling, or closed."""
        if verdict is READY:
            self.ready.append(held)
        elif verdict is PARTIAL:
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
            verdict = PARTIAL
            if waiting != held.seen:
                verdict = self._look(held.conn,
                                     REQUEST_COMPLETE[self.listeners[held.index].protocol], held)
            if verdict in (PARTIAL, WAIT):
                self._look_later(held)
                continue
            del self.partial[fd]
            self._settle(held, verdict)

    def _unhold(self, held: Held) -> None:
        """Out of the poll (or the partial list) before its descriptor is
        closed or passed on."""
        if self.partial.pop(held.conn.fileno(), None) is None:
            self.silent.pop(held.conn.fileno(), None)
            self.poll.unregister(held.conn)

    def _hand(self, conn: socket.socket, index: int) -> bool:
        """Into the queue (it holds the connection then) or closed on an error
        that waiting would not cure: True. False: no room now (the queue is
        full, or the kernel lacks memory or in-flight room): keep it, retry."""
        try:  # not socket.send_fds: CPython 3.11's drops its flags, and a full queue blocked
            self.send.sendmsg([bytes((index,))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   struct.pack("i", conn.fileno()))],
                              socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._want_room(True)
            return False
        except OSError as err:
            self.last_error = err.strerror or str(err)
            if err.errno in PASS_LATER:
                self.pass_after = time.monotonic() + REST_FIRST
                return False
            self.closed_unpassed += 1  # never silently: logged; the client sees end of file
        else:
            self.passed += 1
        conn.close()
        return True

    def _pass_ready(self) -> None:
        if time.monotonic() < self.pass_after:
            return
        while self.ready:
            held = self.ready[0]
            if not self._hand(held.conn, held.index):
                return
            self.ready.popleft()
        self._want_room(False)

    def _want_room(self, waiting: bool) -> None:
        """Wake when the queue has room again (workers all busy meanwhile)."""
        if waiting and not self.waiting_room:
            self.poll.register(self.send, select.EPOLLOUT)
        elif not waiting and self.waiting_room:
            self.poll.unregister(self.send)
        self.waiting_room = waiting

    def _expire(self) -> list[Held]:
        """Those past their deadline, out of the poll; the caller closes them."""
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
        connection: a flood must not flood the log.
        (Only AM.PDP connections are held: REQUEST_COMPLETE.)"""
        now = time.monotonic()
        if now - self._last_summary < SUMMARY_EVERY or not (
                self.closed_idle or self.closed_slow or self.closed_cap
                or self.accept_failures or self.closed_unpassed):
            return
        if self.closed_idle:
            log.info("AM.PDP client idle for client_idle_timeout (%gs): doorman closed %d "
                     "connection(s)", self.idle_timeout, self.closed_idle)
        if self.closed_slow:
            log.warning("AM.PDP request not complete within request_timeout (%gs): doorman "
                        "closed %d connection(s)", self.request_timeout, self.closed_slow)
        if self.closed_cap:
            log.warning("max_pending_connections (%d) reached, or descriptors ran out: "
                        "doorman closed the %d oldest waiting connection(s)",
                        self.cap, self.closed_cap)
        if self.accept_failures:
            log.error("doorman: cannot accept (%s) %d time(s); the listeners rest up to "
                      "%gs at a time, clients wait in the backlog", self.last_error,
                      self.accept_failures, REST_MAX)
        if self.closed_unpassed:
            log.error("doorman: cannot pass %d connection(s) to the workers (%s): closed, "
                      "their clients retry", self.closed_unpassed, self.last_error)
        self.closed_idle = self.closed_slow = self.closed_cap = 0
        self.accept_failures = self.closed_unpassed = 0
        self._last_summary = now

    def _drop_all(self) -> None:
        with self.lock:
            if self.poll is not None:
                self.poll.close()
                self.poll = None
            for held in [*self.silent.values(), *self.partial.values(), *self.ready]:
                held.conn.close()
            self.silent, self.partial, self.ready, self.looks = {}, {}, deque(), []


def _oldest(held: dict[int, Held]) -> Held | None:
    return next(iter(held.values()), None)


def recv_fds_nowait(sock: socket.socket, size: int, maxfds: int) -> tuple[bytes, list[int]]:
    """socket.recv_fds with MSG_DONTWAIT, which socket.recv_fds (CPython 3.11)
    accepts and never passes on to recvmsg: a worker that lost the race for a
    connection then blocked on the queue, its heartbeat still, until the next
    connection came, and was aborted as stuck after child_timeout (deaf to
    TERM meanwhile). BlockingIOError when the queue is empty."""
    fds = array.array("i")
    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_LEN(maxfds * fds.itemsize),
                                         socket.MSG_DONTWAIT)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)
