"""Hostile local clients cannot starve the workers (issue 17, item 2).

A user of the socket's group (`amavisd-evil`, a separate uid) opens many
silent connections, or trickles bytes, while a real client (the daemon's
own user, through the real client code) sends real requests: its latency
must stay low, the silent connections must be closed after
`client_idle_timeout`, and the doorman must hold no more than
`max_pending_connections`. Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import socket
import statistics
import time
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message
from amavisd_client import client as amavisd_client
from amavisd_client.wire.ampdp import Decoder
from tests.integration import test_trust_boundary as boundary
from tests.integration.test_trust_boundary import AsUser, as_user, daemon_as_user

accounts = boundary.accounts  # the fixture: the daemon's user and the attacker

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")]

LATENCY_BOUND = 1.0  # seconds: a real request while the crowd waits


def timed_requests(socket_path: str, message: str, count: int) -> list[float]:
    """The real client's code, `count` times in a row: the seconds each took
    (a failed request raises: the latency of a tempfail is no latency)."""
    seconds = []
    for _ in range(count):
        started = time.monotonic()
        with contextlib.redirect_stdout(io.StringIO()):
            code = amavisd_client.main(["-s", socket_path, message])
        if code != 0:
            raise RuntimeError(f"the real client exited {code}")
        seconds.append(time.monotonic() - started)
    return seconds


def silent_crowd(socket_path: str, count: int, seconds: float) -> list[float | None]:
    """Open `count` connections, send nothing; for each, the seconds until the
    server hung up (None: still open after `seconds`)."""
    conns, opened = [], []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(socket_path)
        conns.append(sock)
        opened.append(time.monotonic())
    poller = select.poll()
    for sock in conns:
        poller.register(sock, select.POLLRDHUP)
    closed: list[float | None] = [None] * count
    index = {sock.fileno(): i for i, sock in enumerate(conns)}
    deadline = time.monotonic() + seconds
    while None in closed and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            i = index[fd]
            closed[i] = time.monotonic() - opened[i]
            poller.unregister(fd)
    for sock in conns:
        sock.close()
    return closed


def figures(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
            f"max {ordered[-1] * 1000:.1f} ms")


def logged(daemon, text: str, seconds: float = 8.0) -> bool:
    """The doorman logs one summary line every few seconds, not one a connection."""
    deadline = time.monotonic() + seconds
    while text not in daemon.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def p95(seconds: list[float]) -> float:
    return sorted(seconds)[min(len(seconds) - 1, int(0.95 * len(seconds)))]


@pytest.fixture
def message(short_tmp) -> str:
    path = short_tmp / "m.eml"
    path.write_bytes(clean_message())
    path.chmod(0o644)
    return str(path)


@pytest.mark.parametrize("crowd, cap", [(50, 256), (500, 256)])
def test_a_silent_crowd_does_not_starve_real_clients(short_tmp, clamd_nodecomp, accounts,
                                                      message, crowd, cap):
    idle = 4.0
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=2, client_idle_timeout=idle,
                            max_pending_connections=cap)
    try:
        alone = as_user(accounts["daemon"], timed_requests, daemon.socket_path, message, 20)
        attacker = AsUser(accounts["evil"], silent_crowd, daemon.socket_path, crowd,
                          idle + 6.0)
        time.sleep(1.0)  # the crowd is in
        crowded = as_user(accounts["daemon"], timed_requests, daemon.socket_path, message,
                          20)
        closed = attacker.join(60)
        print(f"\n{crowd} silent connections, cap {cap}, 2 workers: real request alone "
              f"{figures(alone)}; with the crowd {figures(crowded)}")
        assert p95(crowded) < LATENCY_BOUND, figures(crowded)
        assert None not in closed, "a silent connection was never closed"
        assert max(closed) < idle + 2.0, max(closed)
        # closed early to make room for newer ones (the real client's 20 included): the cap
        early = [c for c in closed if c < idle - 0.5]
        assert max(0, crowd - cap) <= len(early) <= max(0, crowd + 20 - cap), len(early)
        assert logged(daemon, "AM.PDP client idle for client_idle_timeout (4s): doorman closed")
        log = daemon.log_text()
        assert log.count("doorman closed") <= 6  # 10 s of closings: one line each 5 s
        if crowd > cap:
            assert f"max_pending_connections ({cap}) reached" in log
    finally:
        daemon.stop()


def trickling_crowd(socket_path: str, count: int, seconds: float) -> list[float | None]:
    """`count` connections, each sending its request one byte a second: for
    each, the seconds from its first byte until the server hung up (None:
    still open after `seconds`)."""
    request = b"request=AM.PDP\r\nsender=<" + b"a" * 100
    conns = [socket.socket(socket.AF_UNIX) for _ in range(count)]
    for sock in conns:
        sock.connect(socket_path)
    poller = select.poll()
    for sock in conns:
        poller.register(sock, select.POLLRDHUP)
    index = {sock.fileno(): i for i, sock in enumerate(conns)}
    closed: list[float | None] = [None] * count
    started = time.monotonic()
    for byte in request:
        if None not in closed or time.monotonic() - started > seconds:
            break
        for i, sock in enumerate(conns):
            if closed[i] is None:
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))
        tick = time.monotonic() + 1.0
        while (wait := tick - time.monotonic()) > 0:
            for fd, _ in poller.poll(wait * 1000):
                closed[index[fd]] = time.monotonic() - started
                poller.unregister(fd)
    for sock in conns:
        sock.close()
    return closed


def test_tricklers_never_hold_a_worker(short_tmp, clamd_nodecomp, accounts, message):
    """A request that trickles a byte a second waits in the doorman, not in a
    worker, and is hung up on request_timeout after its first byte."""
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=2, request_timeout=3.0,
                            client_idle_timeout=2.0)
    try:
        attacker = AsUser(accounts["evil"], trickling_crowd, daemon.socket_path, 20, 20.0)
        time.sleep(1.5)  # 20 tricklers (10 a worker) have begun
        waited = as_user(accounts["daemon"], timed_requests, daemon.socket_path, message, 10)
        held = attacker.join(60)
        hung = sorted(h for h in held if h is not None)
        print(f"\n20 tricklers, 2 workers: real requests {figures(waited)}; {len(hung)} "
              f"tricklers hung up on, after {hung[0] if hung else 0:.1f}-"
              f"{hung[-1] if hung else 0:.1f} s")
        assert p95(waited) < LATENCY_BOUND, figures(waited)
        assert None not in held and max(held) < 3.0 + 1.5, held
        assert logged(daemon, "not complete within request_timeout (3s)")
    finally:
        daemon.stop()


def raw_reply(socket_path: str, data: bytes) -> dict:
    """Send `data`, read one reply: its attributes and the seconds it took."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(socket_path)
        started = time.monotonic()
        sock.sendall(data)
        decoder = Decoder()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return {"seconds": time.monotonic() - started, "reply": None}
            for block in decoder.feed(chunk):
                return {"seconds": time.monotonic() - started,
                        "reply": {k: v[0] for k, v in block.as_dict().items()}}


@pytest.mark.parametrize("payload, says", [
    (b"request=AM.PDP\r\nsender=<" + b"a" * (70 * 1024) + b">\r\n\r\n",
     "protocol error: line longer than 65536 bytes"),
    (b"request=AM.PDP\r\n" + b"recipient=<a@b.example>\r\n" * 20_001 + b"\r\n",
     "protocol error: too many attributes"),
], ids=["70-KiB-line", "20001-attributes"])
def test_oversized_lines_and_attribute_counts_are_refused_clearly(short_tmp, clamd_nodecomp,
                                                                  accounts, payload, says):
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=1)
    try:
        got = as_user(accounts["evil"], raw_reply, daemon.socket_path, payload)
        print(f"\n{says}: {got}")
        assert got["reply"] is not None, got
        assert got["reply"]["return_value"] == "tempfail", got
        assert says in got["reply"].get("setreply", ""), got
        assert got["seconds"] < 5, got
    finally:
        daemon.stop()


def test_idle_workers_killed_lose_no_connection(short_tmp, clamd_nodecomp, accounts, message):
    """Connections wait in the doorman's queue, not in a worker: a worker killed
    while idle takes none with it."""
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=2)
    try:
        for _ in range(5):
            workers = daemon.wait_for_workers(2)
            os.kill(min(workers), signal.SIGKILL)
            waited = as_user(accounts["daemon"], timed_requests, daemon.socket_path,
                             message, 2)
            assert max(waited) < 3.0, waited
        assert not Path(daemon.socket_path).is_symlink()
    finally:
        daemon.stop()


def test_connections_queued_while_the_only_worker_dies_are_served_by_the_next(
        short_tmp, clamd_nodecomp, accounts, message):
    """The queue is the master's: what waits in it outlives the worker that
    would have taken it. The worker is stopped (SIGSTOP: idle, taking
    nothing) while five clients connect, then killed."""
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=1)
    try:
        (worker,) = daemon.wait_for_workers(1)
        os.kill(worker, signal.SIGSTOP)
        clients = [AsUser(accounts["daemon"], timed_requests, daemon.socket_path, message, 1)
                   for _ in range(5)]
        time.sleep(1.0)  # their requests are whole and queued: no worker took one
        os.kill(worker, signal.SIGKILL)
        waited = [client.join(30) for client in clients]  # raises if one was lost
        assert all(len(w) == 1 for w in waited)
        assert daemon.wait_for_workers(1, exclude={worker})
    finally:
        daemon.stop()
