"""The master SIGKILLed under load, then started again (issue 17, item 1).

No orphan may keep the sockets: the workers notice the master is gone
(their parent changes), finish the request in hand and leave. The restart
finds a stale pid file and a stale socket and takes both over. Every
message of the batch is counted by the ledger (tests/rigs/ledger.py): those
refused while no daemon listened are tempfails, resent after the restart,
and then arrive once. Real daemon, real clamd, AM.PDP and the SMTP filter.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.test_faults_scanner import report
from tests.rigs.daemon import DaemonInstance
from tests.rigs.faults import StallingClamdProxy
from tests.rigs.ledger import Ledger, batch, open_gateway

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever adopted it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def like(daemon: DaemonInstance, workdir: Path, **changes: object) -> DaemonInstance:
    """Another daemon with `daemon`'s settings (its config file etc. in `workdir`)."""
    other = DaemonInstance(workdir, daemon.settings["clamd"])
    other.settings = dict(daemon.settings, **changes)
    return other


@pytest.mark.parametrize("ingress", ["ampdp", "smtp"])
def test_master_sigkill_under_load_then_restart(short_tmp, clamd_nodecomp, ingress):
    pidfile = short_tmp / "amavisd.pid"
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack,
                          pidfile=str(pidfile))
        workers = gw.daemon.wait_for_workers(2)
        master = gw.daemon.pid
        assert int(pidfile.read_text()) == master
        gone_after = []

        def kill_the_master():
            os.kill(master, signal.SIGKILL)
            gw.daemon.proc.wait(5)
            started = time.monotonic()
            while any(alive(pid) for pid in workers) and time.monotonic() - started < 10:
                time.sleep(0.05)
            gone_after.append(time.monotonic() - started)

        ledger = Ledger(batch(40, f"mk-{ingress}"))
        ledger.send_all(gw.send, fault=kill_the_master, fault_after=8)
        assert not any(alive(pid) for pid in workers), "orphaned workers outlived the master"
        assert gone_after[0] < 5, gone_after
        tempfailed = len(ledger.tempfailed())
        assert tempfailed >= 10, ledger.told  # nobody listened for the rest of the batch
        gw.check(ledger)
        assert int(pidfile.read_text()) == master  # stale: the master had no time to clean up
        if ingress == "ampdp":
            assert stat.S_ISSOCK(os.stat(gw.daemon.socket_path).st_mode)  # stale socket

        again = like(gw.daemon, gw.daemon.workdir)
        stack.enter_context(again)
        assert int(pidfile.read_text()) == again.pid
        assert "already running" not in again.log_text()
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.resent == tempfailed
        report(f"master SIGKILL + restart [{ingress}] (workers gone in {gone_after[0]:.1f}s)",
               counts)


@pytest.mark.parametrize("own_socket, refusal", [
    (False, "another daemon is already listening there"),
    (True, "already running as pid"),  # another socket, the same pid file
])
def test_a_live_daemon_is_not_displaced_by_a_second_start(short_tmp, clamd_nodecomp,
                                                          own_socket, refusal):
    """The other side of a stale pid file and socket: live ones are kept."""
    pidfile = short_tmp / "amavisd.pid"
    with ExitStack() as stack:
        gw = open_gateway("ampdp", short_tmp, clamd_nodecomp.address, stack,
                          pidfile=str(pidfile))
        changes = {"socket": str(short_tmp / "second.sock")} if own_socket else {}
        second = like(gw.daemon, short_tmp / "d2", log_file=str(short_tmp / "d2.log"), **changes)
        with pytest.raises(RuntimeError):
            second.start(timeout=15)
        second.stop()
        assert second.proc.returncode != 0
        assert refusal in second.stderr_text() + second.log_text()
        assert int(pidfile.read_text()) == gw.daemon.pid
        ledger = Ledger(batch(8, "live"))
        ledger.send_all(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == 0


@pytest.mark.parametrize("ingress", ["ampdp", "smtp"])
def test_master_sigkill_while_a_worker_is_held_mid_scan(short_tmp, clamd_nodecomp, ingress):
    """The orphan in the middle of a (hung) scan must not keep the listening
    socket from the daemon started again, nor answer CLEAN for what it held."""
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path).start()
    with ExitStack() as stack:
        stack.callback(proxy.stop)
        gw = open_gateway(ingress, short_tmp, proxy.address, stack, clamd_timeout=30.0)
        workers = gw.daemon.wait_for_workers(2)
        held = []

        def kill_the_master_while_a_scan_is_held():
            proxy.stall = True
            held.append(proxy.wait_for_connection(timeout=20))
            os.kill(gw.daemon.pid, signal.SIGKILL)
            gw.daemon.proc.wait(5)
            again = like(gw.daemon, gw.daemon.workdir)
            stack.enter_context(again)  # started while the orphan still holds its scan
            held.append(alive(held[0]))
            proxy.stall = False  # the orphan's scan completes; the new workers' are not held

        ledger = Ledger(batch(12, f"mh-{ingress}"))
        ledger.send_all(gw.send, fault=kill_the_master_while_a_scan_is_held, fault_after=2,
                        concurrency=2)
        assert held[0] in workers and held[1], "the orphan had left before the restart"
        gw.check(ledger)
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
        report(f"master SIGKILL while a worker is held mid-scan, restart at once [{ingress}]",
               counts)


def test_a_worker_that_loses_the_race_for_a_connection_does_not_block_on_the_queue():
    """No daemon: the doorman's queue (SEQPACKET) with two idle workers on it.
    Both wake for one connection; the one that finds it gone must come back at
    once to touch its heartbeat. socket.recv_fds (CPython 3.11) drops its
    MSG_DONTWAIT, and the loser blocked until the next connection: aborted as
    stuck after child_timeout on a quiet server (test_faults_clock caught it)."""
    from amavisd.doorman.handout import recv_fds_nowait

    send, queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    passed, _ = socket.socketpair()
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked on an empty queue"))
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        socket.send_fds(send, [b"\x00"], [passed.fileno()])
        data, fds = recv_fds_nowait(queue, 16, 1)  # the winner
        assert data == b"\x00" and len(fds) == 1
        os.close(fds[0])
        with pytest.raises(BlockingIOError):
            recv_fds_nowait(queue, 16, 1)  # the loser: at once
        send.close()
        assert recv_fds_nowait(queue, 16, 1) == (b"", [])  # the master is gone: EOF
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for sock in (send, queue, passed):
            sock.close()
