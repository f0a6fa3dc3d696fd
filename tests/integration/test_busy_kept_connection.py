"""Kept AM.PDP connections (found by a hostile review), in a real
daemon: a worker serving a kept connection gives it up only after 0.1 s
of silence between requests, so a client that is never silent (the
milter's kept links under load, LIFO: the latest is reused at once) holds
the worker for max_connection_requests requests while new connections (any
other AM.PDP client, the SMTP port's) wait in the doorman's queue; before
the milter kept its connections each message queued behind the others."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from amavisd_client.wire.ampdp import Decoder
from tests.integration.test_doorman_attacks import CLEAN, block, request, spool
from tests.rigs.daemon import DaemonInstance

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(short_tmp, clamd_nodecomp):
    instance = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                              max_requests=0, max_connection_requests=100)
    instance.start()
    instance.wait_for_workers(1)
    yield instance
    instance.stop()


class BusyKeptClient(threading.Thread):
    """One kept connection that asks again as soon as it has its answer."""

    def __init__(self, daemon: DaemonInstance, count: int):
        super().__init__(daemon=True)
        self.jobs = [spool(daemon, f"busy-{n}") for n in range(count)]
        self.path = daemon.socket_path
        self.answered: list[float] = []  # monotonic, one a reply
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(self.path)
            for job in self.jobs:
                if self.stop.is_set():
                    return
                try:
                    sock.sendall(block(job))
                    decoder, replies = Decoder(), []
                    while not replies:
                        data = sock.recv(65536)
                        if not data:
                            return  # the worker gave it up: a milter reconnects
                        replies = decoder.feed(data)
                except OSError:
                    return
                self.answered.append(time.monotonic())


def test_a_busy_kept_connection_does_not_keep_others_waiting(daemon):
    busy = BusyKeptClient(daemon, 150)
    other = spool(daemon, "other")
    busy.start()
    try:
        while len(busy.answered) < 3:  # the worker is the busy client's now
            time.sleep(0.01)
        asked = time.monotonic()
        assert request(daemon.socket_path, other) == CLEAN
        waited = time.monotonic() - asked
        meanwhile = sum(1 for t in busy.answered if t > asked)
    finally:
        busy.stop.set()
        busy.join(30)
    print(f"\nanother client waited {waited:.3f} s while a kept connection "
          f"got {meanwhile} answers")
    assert meanwhile <= 2, (meanwhile, waited)
