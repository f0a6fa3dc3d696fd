"""Faults of the scanning path, every message counted (issue 17, item 1).

A worker SIGKILLed mid-scan; clamd killed, hung (SIGSTOP: it accepts in the
kernel's backlog and never answers) and reloading its database, each in
the middle of a batch of clean, EICAR and banned mail, through AM.PDP and
through the SMTP filter (its next hop the sink). After each, the ledger
(tests/rigs/ledger.py) checks that every message has one outcome, nothing
blocked went on, nothing arrived twice, and what was tempfailed arrives
once when the MTA resends it after the fault.

Real daemon, real clamd (a private one per test where the test kills it).
The one fake is StallingClamdProxy (tests/rigs/faults.py), which holds a
scan open so that a kill lands mid-scan every time.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from contextlib import ExitStack

import pytest

from amavisd.testing.clamd import ClamdInstance
from tests.rigs.faults import Filler, StallingClamdProxy
from tests.rigs.ledger import Ledger, batch, open_gateway

pytestmark = pytest.mark.integration

INGRESSES = ["ampdp", "smtp"]
RESULTS: dict[str, str] = {}  # test id -> counts, printed with -s for the matrix


@pytest.fixture
def own_clamd(short_tmp):
    """A private real clamd this test may kill, stop or reload."""
    instance = ClamdInstance(short_tmp / "clamd", mode="nodecomp").start()
    yield instance
    if instance.pid is not None:
        os.kill(instance.pid, signal.SIGCONT)  # in case it was left stopped
    instance.stop()


def report(name: str, counts) -> None:
    RESULTS[name] = counts.row()
    print(f"\nLEDGER {name}: {counts.row()}")


@pytest.mark.parametrize("ingress", INGRESSES)
def test_worker_killed_mid_scan(short_tmp, clamd_nodecomp, ingress):
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path).start()
    with ExitStack() as stack:
        stack.callback(proxy.stop)
        gw = open_gateway(ingress, short_tmp, proxy.address, stack)
        before = gw.daemon.wait_for_workers(2)
        killed = []

        def kill_the_worker_mid_scan():
            proxy.stall = True
            victim = proxy.wait_for_connection(timeout=20)  # this worker is mid-scan
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            proxy.stall = False  # the other worker's held scan goes on

        ledger = Ledger(batch(24, f"wk-{ingress}"))
        ledger.send_all(gw.send, fault=kill_the_worker_mid_scan, fault_after=6)
        assert killed and killed[0] in before
        gw.daemon.wait_for_workers(2, exclude=set(killed), timeout=15)
        tempfailed = len(ledger.tempfailed())
        assert tempfailed >= 1  # at least the message the victim held
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == tempfailed and counts.resent == tempfailed
        assert "killed by SIGKILL" in gw.daemon.log_text()
        report(f"worker SIGKILL mid-scan [{ingress}]", counts)


@pytest.mark.parametrize("ingress", INGRESSES)
def test_clamd_killed_mid_stream(short_tmp, own_clamd, ingress):
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, own_clamd.address, stack)
        ledger = Ledger(batch(24, f"ck-{ingress}"))
        ledger.send_all(gw.send, fault=lambda: os.kill(own_clamd.pid, signal.SIGKILL),
                        fault_after=6)
        tempfailed = len(ledger.tempfailed())
        assert tempfailed >= 10, ledger.told  # with no scanner, nothing passes
        gw.check(ledger)  # nothing passed unscanned while it was down
        own_clamd.stop()
        own_clamd.start()
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.resent == tempfailed
        report(f"clamd SIGKILL mid-stream [{ingress}]", counts)


@pytest.mark.parametrize("ingress", INGRESSES)
def test_clamd_hung_mid_stream(short_tmp, own_clamd, ingress):
    """SIGSTOPped clamd: connect() succeeds (the backlog), no answer ever comes."""
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, own_clamd.address, stack, clamd_timeout=2.0)
        ledger = Ledger(batch(16, f"ch-{ingress}"))
        started = time.monotonic()
        ledger.send_all(gw.send, fault=lambda: os.kill(own_clamd.pid, signal.SIGSTOP),
                        fault_after=4)
        took = time.monotonic() - started
        tempfailed = len(ledger.tempfailed())
        assert tempfailed >= 8, ledger.told
        gw.check(ledger)
        assert took < 60, took  # bounded by clamd_timeout, not by clamd
        os.kill(own_clamd.pid, signal.SIGCONT)
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert gw.daemon.proc.poll() is None
        report(f"clamd hung (SIGSTOP) [{ingress}]", counts)


def clamd_command(path: str, command: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"z" + command + b"\0")
        return sock.recv(4096)


@pytest.mark.parametrize("ingress", INGRESSES)
def test_clamd_reloading_its_database_mid_stream(short_tmp, own_clamd, ingress):
    stop = threading.Event()
    reloads = []

    def keep_reloading():
        while True:  # back to back: a batch takes a second or two
            reloads.append(clamd_command(str(own_clamd.socket_path), b"RELOAD"))
            if stop.wait(0.05):
                return

    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, own_clamd.address, stack)
        reloader = threading.Thread(target=keep_reloading)
        ledger = Ledger(batch(60, f"cr-{ingress}"))
        try:
            ledger.send_all(gw.send, fault=reloader.start, fault_after=4)
            time.sleep(0.2)  # a reload is done or under way when the batch ends
        finally:
            stop.set()
            reloader.join(20)
        assert len(reloads) >= 2 and all(r.startswith(b"RELOADING") for r in reloads), reloads
        first = len(ledger.tempfailed())
        gw.check(ledger)
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == first
        report(f"clamd RELOAD x{len(reloads)} mid-stream [{ingress}]", counts)


@pytest.mark.parametrize("ingress", INGRESSES)
def test_clamd_temp_dir_full(short_tmp, small_tmpfs, ingress):
    """clamd's TemporaryDirectory on a tmpfs (as the README advises) fills up:
    clamd cannot write the streams we send, the mail is tempfailed, never
    passed unscanned, and arrives once when resent after room is made."""
    clamd = ClamdInstance(short_tmp / "clamd", mode="nodecomp", temp_dir=small_tmpfs).start()
    filler = Filler(small_tmpfs)
    with ExitStack() as stack:
        stack.callback(clamd.stop)
        stack.callback(lambda: filler.path.exists() and filler.empty())
        gw = open_gateway(ingress, short_tmp, clamd.address, stack)
        tempfailed, counts = full_then_room(gw, filler, f"ct-{ingress}")
        assert counts.resent == tempfailed
        report(f"clamd temp dir full [{ingress}]", counts)


def full_then_room(gw, filler: Filler, tag: str):
    """36 messages, the disk filled after the 6th: at least 10 tempfailed,
    nothing passed unchecked; resent once room is made, all go through.
    Returns (tempfailed, the final counts). (36, not 24: filling the disk
    takes a while, and a fast daemon finished 16 of 24 meanwhile.)"""
    ledger = Ledger(batch(36, tag))
    ledger.send_all(gw.send, fault=filler.fill, fault_after=6)
    tempfailed = len(ledger.tempfailed())
    assert tempfailed >= 10, ledger.told
    gw.check(ledger)
    filler.empty()
    ledger.resend(gw.send)
    return tempfailed, gw.check(ledger, allow_tempfail=False)
