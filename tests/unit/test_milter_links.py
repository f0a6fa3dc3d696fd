"""The milter keeps its AM.PDP connections to the daemon (links.py).

Against the real daemon where it can show it (reuse, a worker giving way or
retiring between messages); the faults the daemon cannot produce on demand
(a reset with our request unread, an end of file after reading it) come
from `KeepingFault`, a named fake daemon that keeps connections and follows
a script of what to do with each request.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time

import pytest

from amavisd_client.milter.links import STARVING, DaemonLinks
from amavisd_client.wire.address import Address
from amavisd_client.wire.ampdp import Decoder
from tests.rigs.daemon import DaemonInstance
from tests.unit.test_milter_server import (
    clean_reply,
    final,
    message,
    mta_session,
    run_server,
    settings,
)
from tests.unit.test_milter_server import tempbase as milter_tempbase

tempbase = milter_tempbase  # the fixture, under its name

ACCEPT = [("c", b"")]
TEMPFAIL = [("y", b"451 4.3.0 Virus scanner unavailable, try again later\0")]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class KeepingFault:
    """A fake AM.PDP daemon (named fault) that keeps its connections: the
    n-th request over all connections gets `script[n]`: "answer", "reset"
    (close with the request unread: the client sees a reset), "eof" (read
    it, close), "silent"; "answer" once the script is done."""

    def __init__(self, path, script: list[str]):
        self.script = list(script)
        self.requests = 0  # requests read or seen
        self.mail_files: list[str] = []  # of the requests read
        self.connections = 0
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self.threads.append(threading.Thread(target=self._serve, args=(conn,), daemon=True))
            self.threads[-1].start()

    def _next(self) -> str:
        with self.lock:
            self.requests += 1
            return self.script.pop(0) if self.script else "answer"

    def _serve(self, conn):
        with conn:
            while not self.stop.is_set():
                if not select.select([conn], [], [], 0.1)[0]:
                    continue
                if not conn.recv(1, socket.MSG_PEEK):
                    return  # the client closed it
                what = self._next()
                if what == "reset":
                    time.sleep(0.05)  # the whole request in our buffer, unread
                    return
                decoder, blocks = Decoder(), []
                while not blocks:
                    data = conn.recv(65536)
                    if not data:
                        return
                    blocks = decoder.feed(data)
                self.mail_files.append(blocks[0].get("mail_file"))
                if what == "eof":
                    return
                if what == "silent":
                    self.stop.wait(30)
                    return
                conn.sendall(clean_reply(blocks[0]))

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(2)
        self.sock.close()


def messages_one_by_one(config, count: int, pause: float = 0.0):
    """`count` messages, each on its own MTA connection after the last
    verdict; returns ([final replies], the server's links)."""
    async def scenario(server):
        got = []
        for _ in range(count):
            got.append(final(await mta_session(config.listen.path, message())))
            await asyncio.sleep(pause)
        return got, server.links, [s.path for s in server.spools.idle]
    return run_server(config, scenario)


# -- the real daemon ---------------------------------------------------------------


@pytest.fixture
def real_daemon(short_tmp, clamd_nodecomp, request):
    settings_ = getattr(request, "param", {})
    instance = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                              **settings_).start()
    instance.wait_for_workers(1)
    yield instance
    instance.stop()


def real_config(short_tmp, daemon: DaemonInstance):
    from pathlib import Path
    return settings(short_tmp, Path(daemon.tempbase),
                    daemon_socket=Address("unix", path=daemon.socket_path))


def test_one_connection_carries_several_messages(short_tmp, real_daemon):
    replies, links, spools = messages_one_by_one(real_config(short_tmp, real_daemon), 4)
    assert replies == [ACCEPT] * 4
    assert (links.opened, links.reused, links.retried) == (1, 3, 0)
    assert len(spools) == 1  # one spool served all four
    assert links.idle == []  # closed when the milter stopped


@pytest.mark.parametrize("real_daemon", [{"max_requests": 2, "max_requests_jitter": 0}],
                         indirect=True)
def test_a_retiring_worker_between_messages_costs_nothing(short_tmp, real_daemon):
    replies, links, _ = messages_one_by_one(real_config(short_tmp, real_daemon), 5)
    assert replies == [ACCEPT] * 5
    assert links.opened >= 3  # the worker left after 2 requests, twice


def test_a_worker_giving_way_between_messages_costs_nothing(short_tmp, real_daemon):
    """One worker: a second client waits, so after 0.1 s of silence the
    worker closes our kept connection; the next message gets its verdict."""
    config = real_config(short_tmp, real_daemon)

    async def scenario(server):
        first = final(await mta_session(config.listen.path, message()))
        other = socket.socket(socket.AF_UNIX)
        other.connect(real_daemon.socket_path)  # queued: our kept connection has the worker
        other.sendall(b"request=AM.PDP\r\n\r\n")  # whole: it waits for a worker
        await asyncio.sleep(0.5)
        given_away = server.links.idle[0].sock
        r, _, _ = select.select([given_away], [], [], 0)
        second = final(await mta_session(config.listen.path, message()))
        other.close()
        return first, second, bool(r), server.links.opened

    first, second, readable, opened = run_server(config, scenario)
    assert first == second == ACCEPT
    assert readable and opened == 2  # found closed before use, replaced


def test_a_busy_stream_on_a_kept_connection_does_not_starve_a_new_one(short_tmp,
                                                                      real_daemon):
    """One worker. Stream A sends message after message on its kept
    connection (never silent 0.1 s, so the daemon never gives way); B's
    question waits on a new connection. Once it has waited STARVING, A's
    connection is closed after its reply and the worker takes B's."""
    config = real_config(short_tmp, real_daemon)
    done: list[str] = []

    async def stream(name: str, count: int):
        for _ in range(count):
            assert final(await mta_session(config.listen.path, message())) == ACCEPT
        done.append(name)

    async def scenario(server):
        await stream("warm", 1)
        a = asyncio.create_task(stream("A", 60))
        await asyncio.sleep(0.05)
        await stream("B", 1)
        await a
        return server.links.opened

    opened = run_server(config, scenario)
    assert done == ["warm", "B", "A"] and opened >= 2


# -- faults the daemon cannot make on demand -----------------------------------------


def test_a_reset_before_the_reply_on_a_kept_connection_is_asked_again_once(short_tmp,
                                                                           tempbase):
    fault = KeepingFault(short_tmp / "daemon.sock", ["answer", "reset"])
    try:
        replies, links, spools = messages_one_by_one(settings(short_tmp, tempbase), 2)
    finally:
        fault.close()
    assert replies == [ACCEPT, ACCEPT]
    assert links.retried == 1 and fault.requests == 3 and fault.connections == 2
    assert os.listdir(tempbase) == []


def test_a_reset_of_a_new_connection_is_not_asked_again(short_tmp, tempbase):
    fault = KeepingFault(short_tmp / "daemon.sock", ["reset"])
    try:
        replies, links, _ = messages_one_by_one(settings(short_tmp, tempbase), 1)
    finally:
        fault.close()
    assert replies == [TEMPFAIL] and links.retried == 0 and fault.requests == 1


def test_an_end_of_file_after_the_request_is_a_tempfail_never_asked_again(short_tmp,
                                                                          tempbase):
    """A worker that read the request and died on it: asking again could
    kill the next worker too."""
    fault = KeepingFault(short_tmp / "daemon.sock", ["answer", "eof"])
    try:
        replies, links, spools = messages_one_by_one(settings(short_tmp, tempbase), 3)
    finally:
        fault.close()
    assert replies == [ACCEPT, TEMPFAIL, ACCEPT]
    assert links.retried == 0 and fault.requests == 3
    first, failed, third = fault.mail_files
    assert first == failed != third  # the answered spool served again, then was removed
    assert spools == [third] and not os.path.exists(failed)


def test_a_timeout_on_a_kept_connection_is_not_asked_again(short_tmp, tempbase):
    fault = KeepingFault(short_tmp / "daemon.sock", ["answer", "silent"])
    try:
        replies, links, _ = messages_one_by_one(
            settings(short_tmp, tempbase, daemon_timeout=0.5), 2)
    finally:
        fault.close()
    assert replies[0] == ACCEPT and replies[1] != ACCEPT
    assert links.retried == 0 and fault.requests == 2 and fault.connections == 1


def test_a_daemon_that_closes_after_each_reply_still_answers_all(short_tmp, tempbase):
    from tests.unit.test_milter_server import FaultDaemon
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply)
    try:
        replies, links, _ = messages_one_by_one(settings(short_tmp, tempbase), 3, pause=0.05)
    finally:
        daemon.close()
    assert replies == [ACCEPT] * 3
    assert links.reused == 0 and links.opened == 3 and len(daemon.requests) == 3


def test_no_descriptor_is_left_behind(short_tmp, tempbase):
    before = open_fds()
    fault = KeepingFault(short_tmp / "daemon.sock",
                         ["answer", "reset", "answer", "answer", "eof"])
    try:
        replies, links, _ = messages_one_by_one(settings(short_tmp, tempbase), 5)
    finally:
        fault.close()
    assert replies == [ACCEPT, ACCEPT, ACCEPT, TEMPFAIL, ACCEPT]
    assert open_fds() == before


# -- the pool itself ---------------------------------------------------------------


def test_idle_connections_are_closed_after_the_idle_time_and_at_most_keep_kept(short_tmp):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(short_tmp / "l.sock"))
    listener.listen(16)

    async def main():
        links = DaemonLinks(Address("unix", path=str(short_tmp / "l.sock")), keep=2,
                            idle=0.2)
        taken = [await links.take() for _ in range(3)]
        for link in taken:
            links.fresh.discard(link)  # answered at once: nobody starving
            links.give(link)
        kept = len(links.idle)
        await asyncio.sleep(0.4)
        return kept, links.idle, [link.sock.fileno() for link in taken]

    before = open_fds()
    kept, idle, fds = asyncio.run(main())
    listener.close()
    assert kept == 2 and idle == [] and fds == [-1, -1, -1]
    assert open_fds() == before - 1


def test_answered_connections_are_not_kept_while_a_new_one_waits(short_tmp):
    """A question waiting STARVING seconds on a new connection may wait for
    the worker one of our kept connections holds: then nothing is kept."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(short_tmp / "l.sock"))
    listener.listen(16)

    async def main():
        links = DaemonLinks(Address("unix", path=str(short_tmp / "l.sock")))
        answered, waiting = await links.take(), await links.take()
        await asyncio.sleep(STARVING + 0.02)
        links.give(answered)
        closed = answered.sock.fileno() == -1
        links.drop(waiting)
        third = await links.take()
        links.give(third)  # nobody waits now
        kept = links.idle == [third]
        links.close()
        return closed, kept

    assert asyncio.run(main()) == (True, True)
    listener.close()
