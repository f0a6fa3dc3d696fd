"""The doorman's thread: accept, hold until the first request is whole, hand out.

The holding rules. A connection whose clients speak first (AM.PDP) is
silent until its first byte: in the poll, closed after `client_idle_timeout`.
Then it is looked at once (MSG_PEEK, up to `PEEK_WINDOW`): a whole request
goes to the workers (`handout`) as it stands, so the worker's session reads
every byte itself and the doorman holds no payload (the usual request, a
few hundred bytes, is whole at once). One that is not whole yet is read on
(`reading`) and has `request_timeout` from its first byte to end. Other
connections (SMTP, LMTP: the server speaks first) go to the workers at once.
At most `max_pending_connections` are held: past that, the oldest silent,
then the reading one idle longest goes.
The common case costs one accept, one peek and one sendmsg, in the turn the
connection arrives in when its request is already there; it makes no `Held`
and registers nothing, and with nothing held no deadline is computed to wait
for: the doorman runs under the master's GIL on every client's every connection.

Out of descriptors (EMFILE, ENFILE) or memory on accept(): a connection
that has not finished its request is closed to make room; with none, the
listeners rest out of the poll for a doubling back-off (50 ms to 1 s), since
a listener polled again at once is readable at once and the thread would
spin. Clients wait in the kernel's backlog; what is held keeps being served;
one log line every few seconds says how often, never one a connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

from amavisd.doorman.first_request import FIRST_REQUEST, FirstRequest
from amavisd.doorman.handout import Outbox, close
from amavisd.doorman.held import PARTIAL, READY, WAIT, Held, oldest, received
from amavisd.doorman.reading import READ_BUDGET, Reading
from amavisd.listeners import Listener

log = logging.getLogger("amavisd.doorman")

PEEK_WINDOW = 64 * 1024  # the first look: a whole request in it is passed on unread
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT  # accepted sockets stay blocking: one call less
ACCEPTS_PER_TURN = 64  # then the other listeners and the held connections get a look
SUMMARY_EVERY = 5.0  # seconds between log lines of each kind
MAX_WAIT = 1.0  # the loop turns at least this often (stop, new settings)
REST_FIRST, REST_MAX = 0.05, 1.0  # seconds the listeners rest when accept() lacks resources
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# accept(2): errors pending on the new connection (TCP), "treat them like EAGAIN".
ACCEPT_RETRY = (errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT,
                errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                errno.ENETUNREACH, errno.EPERM)


class Doorman:
    def __init__(self, listeners: list[Listener], idle_timeout: float, cap: int,
                 request_timeout: float = 30.0, read_budget: int = READ_BUDGET):
        self.listeners = listeners
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.cap = cap
        self.outbox = Outbox()
        self.queue = self.outbox.queue  # what every worker waits on
        self.reading = Reading(self.outbox, read_budget)
        self.lock = threading.Lock()  # held for every change of what we hold, and over fork()
        self.silent: dict[int, Held] = {}  # by fd, oldest first: waiting for first bytes
        self.peeked = bytearray(PEEK_WINDOW)  # one buffer for every first look
        # What accept() needs of each listener, looked up once (socket.socket's
        # `family` and `type` make an enum a call).
        self.doors = [(listener.sock, int(listener.sock.family), int(listener.sock.type),
                       listener.sock.proto, FIRST_REQUEST.get(listener.protocol))
                      for listener in listeners]
        self.poll: select.epoll | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.listening = False  # the listeners in the poll: not at the cap, not resting
        self.rest_until = 0.0  # monotonic: the listeners rest until then
        self.rest = REST_FIRST  # the next rest, doubling while accept() keeps failing
        self.closed_idle = self.closed_slow = self.closed_cap = self.accept_failures = 0
        self.last_error = ""  # of accept(), for the summary
        self._last_summary = -SUMMARY_EVERY  # the first line is logged at once
        self._wake_r, self._wake_w = os.pipe()

    # -- the master's side -------------------------------------------------------------

    def start(self) -> None:
        self.stopping = False
        self.poll = select.epoll()
        self.outbox.poll = self.poll
        self.poll.register(self._wake_r, select.EPOLLIN)
        self.listening = self.outbox.waiting_room = False
        self._listen(True)
        self.thread = threading.Thread(target=self._run, name="doorman", daemon=True)
        self.thread.start()

    def configure(self, idle_timeout: float, cap: int, request_timeout: float) -> None:
        """New settings (HUP); the held connections keep their deadlines. A
        lower cap holds at once: the accept path trims only when it holds one
        more (a connection passed at once leaves the count as it was)."""
        with self.lock:
            self.idle_timeout, self.cap, self.request_timeout = idle_timeout, cap, request_timeout
            while self.held > self.cap and self._drop_oldest():
                pass

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
        return len(self.silent) + len(self.reading.held) + len(self.outbox.ready)

    @property
    def queued(self) -> int:
        return self.outbox.queued

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
        return self.outbox.hang_up_queued()

    def close(self) -> None:
        self.outbox.close()
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
        """In a new worker: the held connections, their spills, the poll and
        our end of the queue are the master's (a copy here would keep a
        connection open after the doorman hangs up, or the queue open after
        the master died)."""
        for held in self._forget_held():
            close(held)
        if self.poll is not None:
            self.poll.close()
        self.outbox.send.close()
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
                    # One clock reading a turn: deadlines set from it are at
                    # most a turn early, never late.
                    now = time.monotonic()
                    for fd, _ in events:
                        if fd in by_fd:
                            self._accept(by_fd[fd], now)
                        elif (held := self.silent.get(fd)) is not None:
                            self._spoke(held, now)
                        elif fd == wake:
                            os.read(wake, 512)
                        # the outbox's end: room in the queue again, pass_ready below
                    for held, verdict in self.reading.due(now):
                        self._settle(held, verdict)
                    if self.outbox.ready:
                        self.outbox.pass_ready()
                    self._listen(self._room() and now >= self.rest_until)
                    expired = self._expire(now)
                    self._summarise(now)  # before the hang-up: a client reading the log finds it
                    for held in expired:
                        close(held)
        except Exception:
            log.exception("doorman: internal error")

    def _timeout(self) -> float:
        """Until the next deadline, read, retry or end of a rest; MAX_WAIT at most."""
        if not (self.silent or self.reading.held or self.outbox.ready or self.rest_until):
            return MAX_WAIT  # nothing held, no rest: the usual turn
        due = [self.reading.next_deadline(), self.reading.next_look(), self.outbox.next_try()]
        if self.silent:
            due.append(oldest(self.silent).deadline)
        if not self.listening and self.rest_until:
            due.append(self.rest_until)
        due = [when for when in due if when is not None]
        if not due:
            return MAX_WAIT
        return max(0.0, min(MAX_WAIT, min(due) - time.monotonic()))

    def _accept(self, index: int, now: float) -> None:
        """The fast path: accepted, the request is here already, the queue has
        room: one peek and one sendmsg, nothing polled, nothing kept. A
        connection passed or closed at once leaves the room as it was."""
        sock, family, kind, proto, first = self.doors[index]  # first None: passed at once
        room = self._room()
        for _ in range(ACCEPTS_PER_TURN):
            if not room:
                return
            try:
                # socket.accept() minus its Python wrapper (an enum call for
                # `family` and `type`); the new socket stays blocking as there.
                fd, _ = sock._accept()
                try:  # its OSError is handled as accept()'s, as socket.accept's was
                    conn = socket.SocketType(family, kind, proto, fd)
                except OSError:
                    raise  # the object's own (it had the descriptor, and closed it)
                except BaseException:
                    os.close(fd)  # MemoryError before the object took it: never left open
                    raise
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
            verdict = self._look(conn, first) if first else READY
            if verdict is READY:
                if not self.outbox.ready and self.outbox.hand(conn, index):
                    continue  # in the queue (or closed on an error it counts)
                self.outbox.wait(Held(conn, index, now + self.request_timeout, first))
            elif verdict is WAIT:
                self.silent[fd] = Held(conn, index, now + self.idle_timeout, first)
                self.poll.register(fd, select.EPOLLIN)
            elif verdict is PARTIAL:  # read on: request_timeout from its first byte
                self._settle(Held(conn, index, now + self.request_timeout, first), verdict)
            else:  # GONE: end of file, or an error, before a whole request
                conn.close()
                continue
            while self.held > self.cap and self._drop_oldest():
                pass  # the oldest that has not finished its request makes room
            room = self._room()

    def _out_of_resources(self, err: OSError) -> None:
        """accept() failed for want of descriptors or memory. A connection of
        ours that has not finished its request makes room; with none, the
        listeners rest (out of the poll, a doubling back-off): polled at once,
        they would be readable at once, and the thread would spin."""
        self.accept_failures += 1
        self.last_error = err.strerror or str(err)
        if self._drop_oldest():
            return
        self.rest_until = time.monotonic() + self.rest
        self.rest = min(REST_MAX, self.rest * 2)
        self._listen(False)

    def _room(self) -> bool:
        """Whether one more connection may be taken: at the cap, only if one
        not yet whole can make room; with none, the listeners rest (the
        kernel's backlog holds new clients) until the workers take some."""
        return self.held < self.cap or bool(self.silent or self.reading.held)

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

    def _spoke(self, held: Held, now: float) -> None:
        """Readable at last: out of the poll; passed on, closed (end of file
        before a word), read on, or watched until its request is whole."""
        verdict = self._look(held.conn, held.first)
        if verdict is WAIT:
            return
        del self.silent[held.conn.fileno()]
        self.poll.unregister(held.conn)
        held.deadline = now + self.request_timeout  # from its first byte
        self._settle(held, verdict)

    def _look(self, conn: socket.socket, first: FirstRequest) -> str:
        """The first look: READY (a whole request), PARTIAL (not yet), GONE
        (end of file or an error before a whole request), or WAIT (nothing yet)."""
        size = received(conn, self.peeked, PEEK_WINDOW, PEEK)
        if isinstance(size, str):
            return size
        return READY if first.complete(self.peeked, size) else PARTIAL

    def _settle(self, held: Held, verdict: str) -> None:
        """Out of the poll: to the workers, read on, or closed."""
        if verdict is READY:
            self.outbox.add(held)
        elif verdict is PARTIAL:
            self._settle(held, self.reading.begin(held))
        elif verdict is not WAIT:  # GONE, DROPPED (counted by `reading`); WAIT: being read
            close(held)

    def _unhold(self, held: Held) -> None:
        """Out of the poll (or the reading) before it is closed."""
        if self.silent.pop(held.conn.fileno(), None) is not None:
            self.poll.unregister(held.conn)
        else:
            self.reading.release(held)

    def _expire(self, now: float) -> list[Held]:
        """Those past their deadline, out of the poll; the caller closes them."""
        expired = []
        while self.silent and (held := oldest(self.silent)).deadline <= now:
            self._unhold(held)
            expired.append(held)
        self.closed_idle += len(expired)
        late = self.reading.expired(now)
        self.closed_slow += len(late)
        return expired + late

    def _drop_oldest(self) -> bool:
        """Close the oldest silent, else the reading one idle longest: False
        if there is none (the rest are whole)."""
        held = oldest(self.silent) or oldest(self.reading.held)
        if held is None:
            return False
        self._unhold(held)
        close(held)
        self.closed_cap += 1
        return True

    def _summarise(self, now: float) -> None:
        """At most one line of each kind every few seconds, not one a
        connection: a flood must not flood the log.
        (Only AM.PDP connections are held: FIRST_REQUEST.)"""
        outbox, read = self.outbox, self.reading
        if now - self._last_summary < SUMMARY_EVERY or not (
                self.closed_idle or self.closed_slow or self.closed_cap
                or self.accept_failures or outbox.closed_unpassed or read.closed_budget
                or read.spill_failures):
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
        if read.closed_budget:
            log.warning("doorman read budget (%.3g MiB) spent on unfinished requests: closed "
                        "%d connection(s), those idle longest (their clients retry)",
                        read.budget / 2**20, read.closed_budget)
        if read.spill_failures:
            log.error("doorman: cannot keep the bytes of %d big request(s) (%s): closed, "
                      "their clients retry", read.spill_failures, read.spill_error)
        if self.accept_failures:
            log.error("doorman: cannot accept (%s) %d time(s); the listeners rest up to "
                      "%gs at a time, clients wait in the backlog", self.last_error,
                      self.accept_failures, REST_MAX)
        if outbox.closed_unpassed:
            log.error("doorman: cannot pass %d connection(s) to the workers (%s): closed, "
                      "their clients retry", outbox.closed_unpassed, outbox.last_error)
        self.closed_idle = self.closed_slow = self.closed_cap = self.accept_failures = 0
        outbox.closed_unpassed = read.closed_budget = read.spill_failures = 0
        self._last_summary = now

    def _forget_held(self) -> list[Held]:
        """Everything we hold, forgotten (the caller closes it)."""
        held = [*self.silent.values(), *self.reading.forget(),
                *self.outbox.forget_ready()]
        self.silent = {}
        return held

    def _drop_all(self) -> None:
        with self.lock:
            if self.poll is not None:
                self.poll.close()
                self.poll = None
            for held in self._forget_held():
                close(held)
