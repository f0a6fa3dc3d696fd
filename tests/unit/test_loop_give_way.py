"""Between requests a worker gives a silent client up only when others wait (H6 review).

The loop, over a real socket pair, with a handler whose queue is told:
a protocol that may be ended between requests (AM.PDP) closes a silent
connection soon after others start waiting, never while nobody waits,
never one whose next request is coming, and never an SMTP-like session.
"""

from __future__ import annotations

import logging
import socket
import time

from amavisd.protocol.loop import ConnectionLimits, serve
from amavisd.protocol.session import Session


class Lines(Session):
    """A request is a line; the reply is "ok"."""

    log = logging.getLogger("test")
    gives_way = 0.1

    def __init__(self, conn, handler):
        super().__init__(conn, handler)
        self.buffer = b""

    def receive(self, data):
        self.buffer += data

    def request_ready(self):
        return b"\n" in self.buffer

    def mid_request(self):
        return bool(self.buffer)

    def answer(self):
        _, _, self.buffer = self.buffer.partition(b"\n")
        return b"ok\n"


class Kept(Lines):
    gives_way = 0.0  # a session that must never be dropped between requests


class Handler:
    def __init__(self, waiting: bool):
        self.waiting = waiting
        self.asked = 0

    def others_waiting(self) -> bool:
        self.asked += 1
        return self.waiting

    def handle_reply_sent(self):
        pass

    def keep_going(self):
        return True


def served(session_class, waiting: bool, then: bytes = b"", idle: float = 1.5):
    """One request, then `then` a moment later; (requests answered, seconds)."""
    server, client = socket.socketpair()
    client.sendall(b"one\n")
    handler = Handler(waiting)
    with server, client:
        if then:
            client.sendall(then)
        started = time.monotonic()
        answered = serve(session_class(server, handler), ConnectionLimits(idle, idle, 1000, 60))
        return answered, time.monotonic() - started, handler.asked


def test_a_silent_client_gives_way_once_others_wait():
    answered, seconds, asked = served(Lines, waiting=True)
    assert answered == 1 and seconds < 0.3, seconds
    assert asked == 1


def test_nobody_waiting_the_client_keeps_its_idle_timeout():
    answered, seconds, asked = served(Lines, waiting=False)
    assert answered == 1 and 1.4 < seconds < 2.5, seconds
    assert asked >= 10  # asked all along: others may come to wait meanwhile


def test_a_next_request_already_coming_is_served_though_others_wait():
    answered, seconds, _ = served(Lines, waiting=True, then=b"two\nthr")
    assert answered == 2  # "thr" then stays silent mid-request: request_timeout, not given up
    assert seconds > 1.4, seconds


def test_a_session_that_must_not_be_dropped_keeps_its_idle_timeout():
    answered, seconds, asked = served(Kept, waiting=True)
    assert answered == 1 and seconds > 1.4 and asked == 0, seconds


class Greeted(Lines):
    """A protocol whose server speaks first and says why it hangs up (SMTP's 421)."""

    give_way_reply = b"421 4.3.2 busy, try again\r\n"

    def greeting(self):
        return b"220 ready\r\n"


def test_a_client_silent_after_the_greeting_gives_way_with_the_protocols_words():
    server, client = socket.socketpair()
    handler = Handler(waiting=True)
    with server, client:
        started = time.monotonic()
        assert serve(Greeted(server, handler), ConnectionLimits(2, 2, 1000, 60)) == 0
        seconds = time.monotonic() - started
        server.shutdown(socket.SHUT_WR)
        client.settimeout(2)
        said = b""
        while chunk := client.recv(100):
            said += chunk
    assert said == b"220 ready\r\n421 4.3.2 busy, try again\r\n"
    assert seconds < 0.3, seconds
