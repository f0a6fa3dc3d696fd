"""The hand-out: a connection, and what the doorman read of it, into the workers' queue.

Why a module: it is the one place that knows what a hand-out is, at both
ends: the doorman puts (`Outbox`), a worker takes (`take`). A hand-out is
one SOCK_SEQPACKET message: one byte, the index of the connection's
listener, and SCM_RIGHTS with the connection and, for a first request read
past the peek window, a memfd with the bytes read (`Spill`): the worker's
session starts from them. One byte a message, so FIONREAD of the queue
counts the messages in it, and the doorman knows which of its spills the
workers took (the queue is in order): until then their bytes stay in its
budget.

The queue never blocks the doorman (its lock is held over fork()): a
hand-out that does not fit waits in `ready`, in order, and goes when the
queue has room (EPOLLOUT) or, when the kernel lacks memory or in-flight
descriptor room (ENOBUFS, ETOOMANYREFS), after a short rest.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass

from amavisd.doorman.held import Held

log = logging.getLogger("amavisd.doorman")

RETRY_AFTER = 0.05  # seconds before a hand-out the kernel had no room for is tried again
# send failing for want of kernel memory or in-flight descriptor room
# (ETOOMANYREFS: in flight past RLIMIT_NOFILE): the connection is kept, retried later.
PASS_LATER = (errno.ENOBUFS, errno.ENOMEM, errno.ETOOMANYREFS)


class Spill:
    """The bytes of one first request the doorman read, in a memfd: in
    memory, never on disk, passed with the connection (SCM_RIGHTS) so no
    copy goes through the queue, whatever its size. OSError (EMFILE,
    ENOMEM): none was made."""

    __slots__ = ("fd", "size")

    def __init__(self, data: bytes | bytearray) -> None:
        self.fd = os.memfd_create("amavisd-first-request", os.MFD_CLOEXEC)
        self.size = len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_spill(fd: int) -> bytes:
    """All of a spill (from its start: the doorman's writes moved the offset
    we share with it)."""
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise OSError(errno.EIO, "the spill is shorter than its size")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


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


def waiting(queue: socket.socket | None) -> int:
    """Hand-outs in the queue not yet taken by a worker (one byte each:
    FIONREAD of a SEQPACKET socket counts them all); 0 if it cannot be told."""
    if queue is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(queue, termios.FIONREAD, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0


MAX_FDS = 2  # the connection, and its spill if the doorman read some of it
# SCM_RIGHTS payloads and message bodies, made once: a hand-out is the
# doorman's per-connection path.
ONE_FD, TWO_FDS = struct.Struct("i"), struct.Struct("ii")
INDEX = tuple(bytes((index,)) for index in range(256))  # a listener's index, one byte


@dataclass
class Handout:
    """What a worker takes: the connection's descriptor, its listener's index
    (-1: none came) and the bytes of its first request the doorman read
    (b"": none, the socket has them all)."""

    fd: int
    index: int
    first: bytes = b""

    def connection(self, like: socket.socket | None = None) -> socket.socket:
        """The connection; `like`: its listener, whose family and type are
        its own (socket() then need not ask the kernel)."""
        if like is None:
            conn = socket.socket(fileno=self.fd)
        else:
            conn = socket.socket(like.family, like.type, like.proto, fileno=self.fd)
        conn.set_inheritable(False)  # recvmsg gives it without close-on-exec
        return conn


def take(queue: socket.socket) -> Handout | None:
    """One hand-out, for a worker; None if another worker was quicker, or if
    the spill cannot be read (logged; the connection is closed: its client
    sees end-of-file before any reply and retries, never a request cut
    short). EOFError: the master (the queue's other end) is gone.
    MSG_DONTWAIT, not O_NONBLOCK: the queue's file flags are shared with the
    master and every other worker."""
    try:
        data, fds = recv_fds_nowait(queue, 16, MAX_FDS)
    except (BlockingIOError, InterruptedError):
        return None
    if not fds:
        if not data:
            raise EOFError
        return None
    first = b""
    try:
        if len(fds) > 1:
            first = read_spill(fds[1])
    except OSError as err:
        log.error("worker %d: cannot read the request the doorman passed (%s): "
                  "connection closed, its client retries", os.getpid(), err)
        os.close(fds[0])
        return None
    finally:
        for fd in fds[1:]:
            os.close(fd)
    return Handout(fds[0], data[0] if data else -1, first)


class Outbox:
    """The doorman's end of the queue, and the hand-outs waiting for room in it."""

    def __init__(self) -> None:
        # send: ours (the doorman's); queue: what every worker waits on.
        self.send, self.queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.poll: select.epoll | None = None  # the doorman's: EPOLLOUT while the queue is full
        self.ready: deque[Held] = deque()  # whole requests waiting for room, in order
        self.pass_after = 0.0  # monotonic: the kernel lacked room, rest until then
        self.waiting_room = False  # our end in the poll: the queue was full
        self.passed = 0  # messages sent, ever
        self.closed_unpassed = 0  # since the last summary
        self.last_error = ""
        self.in_queue: deque[tuple[int, int]] = deque()  # (message number, bytes) of spills
        self.spilled = 0  # bytes of the spills in `ready` and in the queue

    @property
    def queued(self) -> int:
        """Connections in the queue, passed and not yet taken by a worker."""
        return waiting(self.queue)

    def spilled_now(self) -> int:
        """Bytes of spills still ours to answer for: waiting in `ready`, or in
        the queue and not yet taken (those taken are the workers' now)."""
        if self.in_queue:
            taken = self.passed - self.queued
            while self.in_queue and self.in_queue[0][0] <= taken:
                self.spilled -= self.in_queue.popleft()[1]
        return self.spilled

    def add(self, held: Held) -> None:
        """Whole: passed now if nothing waits before it and the queue has
        room, else kept in order."""
        if held.spill is not None:
            self.spilled += held.spill.size
        if self.ready or not self.hand(held.conn, held.index, held.spill):
            self.ready.append(held)

    def wait(self, held: Held) -> None:
        """Whole, tried and no room in the queue yet: kept, in order."""
        self.ready.append(held)

    def pass_ready(self) -> None:
        if time.monotonic() < self.pass_after:
            return
        while self.ready:
            held = self.ready[0]
            if not self.hand(held.conn, held.index, held.spill):
                return
            self.ready.popleft()
        self._want_room(False)

    def hand(self, conn: socket.socket, index: int, spill: Spill | None = None) -> bool:
        """Into the queue (it holds the connection then) or closed on an error
        that waiting would not cure: True, and our copies are closed. False:
        no room now (the queue is full, or the kernel lacks memory or
        in-flight room): keep it, retry. The doorman's fast path calls this
        with a connection it never held (`Held`): nothing waits before it."""
        if spill is None:
            rights = ONE_FD.pack(conn.fileno())
        else:
            rights = TWO_FDS.pack(conn.fileno(), spill.fd)
        try:  # not socket.send_fds: CPython 3.11's drops its flags, and a full queue blocked
            self.send.sendmsg([INDEX[index]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                              socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._want_room(True)
            return False
        except OSError as err:
            self.last_error = err.strerror or str(err)
            if err.errno in PASS_LATER:
                self.pass_after = time.monotonic() + RETRY_AFTER
                return False
            self.closed_unpassed += 1  # never silently: logged; the client sees end of file
            if spill is not None:  # its bytes leave the budget
                self.spilled -= spill.size
        else:
            self.passed += 1
            if spill is not None:
                self.in_queue.append((self.passed, spill.size))
        conn.close()
        if spill is not None:
            spill.close()
        return True

    def forget(self, held: Held) -> None:
        """A held whole request that will not be passed: its bytes leave the budget."""
        if held.spill is not None:
            self.spilled -= held.spill.size

    def next_try(self) -> float | None:
        """When `ready` is to be tried again (None: when the queue has room)."""
        return self.pass_after if self.ready and not self.waiting_room else None

    def _want_room(self, waiting: bool) -> None:
        """Wake when the queue has room again (workers all busy meanwhile)."""
        if waiting and not self.waiting_room:
            self.poll.register(self.send, select.EPOLLOUT)
        elif not waiting and self.waiting_room:
            self.poll.unregister(self.send)
        self.waiting_room = waiting

    def forget_ready(self) -> list[Held]:
        """What waits for room, forgotten (a stop, a dead thread, a fork): the
        caller closes it."""
        ready = list(self.ready)
        for held in ready:
            self.forget(held)
        self.ready.clear()
        return ready

    def hang_up_queued(self) -> int:
        """Once the workers were told to leave (they take nothing more): close
        the connections still in the queue at once, so their clients tempfail
        now rather than after graceful_timeout. How many there were."""
        count = 0
        while True:
            try:
                _, fds = recv_fds_nowait(self.queue, 16, MAX_FDS)
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


def close(held: Held) -> None:
    """Our copies of a held connection and of its spill."""
    held.conn.close()
    if held.spill is not None:
        held.spill.close()
