"""The one blocking loop that drives any sans-IO session over its connection.

A worker serves one connection at a time, so a plain blocking loop is
enough (an asyncio one can drive the same sessions later). What it enforces
is the same for every protocol, because it is about the worker, not the
protocol: a connection holds a worker for bounded time only,
`client_idle_timeout` before each request, `request_timeout` for a whole
request however slowly it trickles (from its first byte),
`max_connection_requests` a connection, no more than the session's
`max_request_bytes` buffered without a complete request, and a client that
does not read its replies is hung up on.

The limits are the daemon's (`ConnectionLimits.from_config`) unless the
session's protocol has its own: before each request the loop asks
`session.connection_limits()`, so SMTP waits `smtp_idle_timeout` for a
command and `smtp_data_timeout` for a whole DATA while AM.PDP keeps its
short ones, and the log line names the setting that ran out.

After each reply the handler is told (`handle_reply_sent`: notifications
go out after the client has its answer) and asked whether to go on
(`keep_going`: a retiring worker closes the connection after the reply).

The socket stays in blocking mode and every recv and send says
MSG_DONTWAIT; the loop waits in poll() only when the kernel has nothing for
it. So the usual request, whole by the time the connection is handed to a
worker, costs one recv, and the reply one send: no settimeout() (an ioctl
each time) and no poll before every call, as a socket timeout would cost.

Between requests, a session that may be ended there gives its worker up
once other connections wait for one (`others_waiting`, the handler's):
otherwise a client that sends one cheap request and then keeps silent holds
a worker for client_idle_timeout, again and again, and with as many
connections as there are workers starves every real client, the very
attack the doorman holds first requests for. The session says after how
much silence (`gives_way`, seconds; 0: never) and what it says before it
hangs up (`give_way_reply`, e.g. SMTP's 421); AM.PDP's clients reconnect
when they find their kept connection closed. Asked only after that
silence, so a client that goes on at once costs nothing.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from amavisd.protocol.session import Session


@dataclass
class ConnectionLimits:
    """How long, and for how many requests, one connection may hold a worker."""

    idle_timeout: float = 10.0  # connect or last reply -> first byte of the next request
    request_timeout: float = 30.0  # first byte of a request -> its end, however it trickles
    max_requests: int = 100  # requests answered on one connection
    max_time: float = 600.0  # the whole connection, all its requests (processing aside)
    # the settings the two timeouts come from, named when one runs out
    idle_setting: str = "client_idle_timeout"
    request_setting: str = "request_timeout"

    @classmethod
    def from_config(cls, config) -> ConnectionLimits:
        return cls(config.client_idle_timeout, config.request_timeout,
                   config.max_connection_requests, config.max_connection_time)


def serve(session: Session, limits: ConnectionLimits, first: bytes = b"") -> int:
    """Serve one connection until it ends; the number of requests answered.
    `first`: what the doorman read of the first request (one not whole at its
    first look): whole, or past max_request_bytes. The caller closes the connection."""
    answered = 0
    current = session.connection_limits(limits)
    ends = time.monotonic() + current.max_time
    if session.conn.gettimeout():  # a socket timeout would poll before every call
        session.conn.settimeout(None)
    try:
        greeting = session.greeting()
        if greeting and not _send(session, greeting, current):
            return 0
        if first:
            session.receive(first)
            if len(first) > session.max_request_bytes and not session.request_ready():
                _send(session, session.oversize(), current)
                return 0
        # a client that speaks first has usually sent its request already
        eager = not greeting
        while answered < current.max_requests and not session.closing:
            current = session.connection_limits(limits)  # for the request to come
            if not _next_request(session, current, ends, eager,
                                 _give_way(session)):
                break
            eager = False
            answered += 1
            sent = _send(session, session.answer(), session.connection_limits(limits))
            session.after_reply()
            if not sent:
                break
            session.handler.handle_reply_sent()
            if not session.handler.keep_going() or _yields_now(session):
                break
    finally:
        session.finish()
    return answered


GiveWay = tuple[float, Callable[[], bool]]  # seconds of silence, then: do others wait?


def _give_way(session: Session) -> GiveWay | None:
    """For a session that may be ended between requests (`gives_way`
    seconds, a class attribute: 0 never), the handler's question whether
    others wait for a worker; else None."""
    every = getattr(session, "gives_way", 0.0)
    others_waiting = getattr(session.handler, "others_waiting", None)
    return (every, others_waiting) if every > 0 and others_waiting is not None else None


def _yields_now(session: Session) -> bool:
    """After a reply, whether a session whose clients ask again on a new
    connection (`yields_after_reply`) gives its worker up now because others
    wait for one: a kept client that is never silent (the milter's links
    under load) would otherwise hold it for max_connection_requests
    requests (`_next_request` gives way only after a silence). Logged at
    debug: under load it may be every request."""
    if not getattr(session, "yields_after_reply", False):
        return False
    others_waiting = getattr(session.handler, "others_waiting", None)
    if others_waiting is None or not others_waiting():
        return False
    session.log.debug("%s others wait for a worker: closing the connection after the reply",
                      session.label)
    return True


def _next_request(session: Session, limits: ConnectionLimits, ends: float,
                  eager: bool = False, give_way: GiveWay | None = None) -> bool:
    """Read until a complete request waits; False when the connection should
    end: EOF, idle past the idle timeout, a request not complete within the
    request timeout (from its first byte), one too large (answered), or the
    connection past its own time (`ends`: max_time after it was accepted).
    `eager`: bytes are likely there already, so recv before any poll.
    `give_way`: while no byte of the request has come, asked after each
    silence that long: True ends the connection (others wait for a worker)."""
    if session.request_ready():
        return True
    conn = session.conn
    now = time.monotonic()
    if now >= ends:
        _hang_up(session, limits, False, whole=True)
        return False
    idle_until = min(now + limits.idle_timeout, ends)
    # Bytes of the next request already here: its clock is running.
    request_until = (min(now + limits.request_timeout, ends) if session.mid_request()
                     else None)
    received = 0
    while not session.request_ready():
        deadline = request_until if request_until is not None else idle_until
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _hang_up(session, limits, request_until is not None, whole=deadline >= ends)
            return False
        if give_way is not None and request_until is None:
            every, others_waiting = give_way
            if not eager and not _wait(conn, select.POLLIN, min(remaining, every)):
                if remaining > every and others_waiting() and not _pending(conn):
                    session.log.info("%s client idle between requests while others wait "
                                     "for a worker: closing the connection", session.label)
                    if words := getattr(session, "give_way_reply", b""):
                        _send(session, words, limits)
                    return False
                continue
        elif not eager and not _wait(conn, select.POLLIN, remaining):
            continue  # the deadline check above decides
        eager = False
        try:
            data = conn.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue  # nothing after all: wait for it
        except OSError:
            return False
        if not data:
            return False
        if request_until is None:
            request_until = min(time.monotonic() + limits.request_timeout, ends)
        received += len(data)
        session.receive(data)
        if received > session.max_request_bytes and not session.request_ready():
            reply = session.oversize()
            if reply:
                _send(session, reply, limits)
            return False
    return True


def _hang_up(session: Session, limits: ConnectionLimits, mid_request: bool,
             whole: bool = False) -> None:
    if whole:
        session.log.warning("%s connection open longer than max_connection_time (%gs): "
                            "closing it", session.label, limits.max_time)
    elif mid_request:
        session.log.warning("%s request not complete within %s (%gs): closing the "
                            "connection", session.label, limits.request_setting,
                            limits.request_timeout)
    else:
        session.log.info("%s client idle for %s (%gs): closing the connection",
                         session.label, limits.idle_setting, limits.idle_timeout)


def _send(session: Session, data: bytes, limits: ConnectionLimits) -> bool:
    """False when the reply could not be sent: the connection is over (a
    client that does not read its replies must not hold the worker)."""
    conn = session.conn
    deadline = time.monotonic() + limits.idle_timeout  # for the whole reply, as sendall's
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[conn.send(view, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                if not _wait(conn, select.POLLOUT, deadline - time.monotonic()):
                    raise TimeoutError from None
    except OSError as err:
        session.log.warning("%s client did not take its reply: %s", session.label,
                            err.strerror or type(err).__name__)
        return False
    return True


def _pending(conn: socket.socket) -> bool:
    """Whether a byte (or end-of-file, or an error) came after all, just now."""
    try:
        conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _wait(conn: socket.socket, events: int, seconds: float) -> bool:
    """Whether `conn` became ready for `events` (or hung up, or failed: the
    next call says which) within `seconds`."""
    if seconds <= 0:
        return False
    poller = select.poll()
    poller.register(conn, events)
    return bool(poller.poll(math.ceil(seconds * 1000)))


def send_last_words(session: Session, reason: str) -> None:
    """From a dying worker's signal handler: answer the request in flight, if any."""
    data = session.last_words(reason)
    if not data:
        return
    try:
        session.conn.settimeout(1.0)
        session.conn.sendall(data)
    except OSError:
        pass
