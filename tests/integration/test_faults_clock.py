"""A wall-clock jump under a running daemon, every message counted (issue 17).

The daemon's deadlines run on time.monotonic, which no jump moves; what
reads the wall clock is the log, the quarantine's dates and the worker
heartbeat (the mtime of a file, which `utime` sets from the wall clock).
The jump is real to the daemon: libfaketime (Debian's `faketime`) is
preloaded into it with FAKETIME_TIMESTAMP_FILE, so time(), gettimeofday,
clock_gettime(CLOCK_REALTIME) and the mtimes utime writes all move when the
test rewrites the file, and CLOCK_MONOTONIC does not
(FAKETIME_DONT_FAKE_MONOTONIC), as with settimeofday or an NTP step.

One shim, named: libfaketime 0.9.10 fails clock_nanosleep with EINVAL when
monotonic is not faked, so the launcher makes time.sleep a select().

- Forward two days, then back one, mid-stream: no worker is taken for
  stuck, every message ends once, the log and the quarantine carry the
  jumped dates.
- Back one day, then a scan that hangs: the stuck worker is still aborted
  after child_timeout (a heartbeat aged by the wall clock would wait a day),
  and no other worker is.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.test_faults_scanner import report
from tests.rigs.faults import StallingClamdProxy
from tests.rigs.ledger import Ledger, batch, open_gateway

pytestmark = pytest.mark.integration

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
LAUNCHER = """\
import select, sys, time
time.sleep = lambda seconds: select.select([], [], [], max(0.0, seconds))  # libfaketime bug
from amavisd.cli import main
sys.exit(main())
"""


@pytest.fixture
def jump(short_tmp, monkeypatch):
    """jump("+2d"): move the wall clock of daemons started in this test."""
    if not os.path.exists(LIBFAKETIME):
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    rc = short_tmp / "faketime.rc"
    rc.write_text("+0\n")
    for name, value in {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(rc),
                        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                        "NO_FAKE_STAT": "1"}.items():
        monkeypatch.setenv(name, value)

    def to(offset: str) -> None:
        rc.write_text(offset + "\n")
    return to


def day(offset_days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() + offset_days * 86400))


@pytest.mark.parametrize("ingress", ["ampdp", "smtp"])
def test_wall_clock_jumps_mid_stream(short_tmp, clamd_nodecomp, jump, ingress):
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack,
                          python_args=["-c", LAUNCHER], child_timeout=5.0)
        os.environ.pop("LD_PRELOAD")  # the daemon has it; this test's own children not
        workers = gw.daemon.wait_for_workers(2)
        ledger = Ledger(batch(40, f"clk-{ingress}"))
        ledger.send_all(gw.send, mails=ledger.mails[:20], fault=lambda: jump("+2d"),
                        fault_after=4)
        time.sleep(2.5)  # the master looks at the heartbeats meanwhile
        ledger.send_all(gw.send, mails=ledger.mails[20:], fault=lambda: jump("-1d"),
                        fault_after=4)
        time.sleep(2.5)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == 0, ledger.told
        log = gw.daemon.log_text()
        assert "stuck for more than child_timeout" not in log, log[-3000:]
        assert gw.daemon.worker_pids() == workers
        assert day(2) in log and day(-1) in log  # the jump reached the daemon
        dates = {json.loads(p.read_text())["date"][:10]
                 for p in Path(gw.quarantine).glob("*.json")}
        assert day(2) in dates, dates
        report(f"wall clock +2d then -1d mid-stream [{ingress}]", counts)


# The test found a worker bug: the worker that lost the race for the one
# connection blocked on the doorman's queue (socket.recv_fds dropped its
# MSG_DONTWAIT), its heartbeat still, and was aborted as stuck too, at times
# while serving the resend (amavisd.doorman.handout.recv_fds_nowait).
STUCK_CHILD_TIMEOUT = 3.0


def test_a_stuck_worker_is_caught_after_the_clock_went_back(short_tmp, clamd_nodecomp, jump):
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path,
                               stall=True).start()
    with ExitStack() as stack:
        stack.callback(proxy.stop)
        gw = open_gateway("ampdp", short_tmp, proxy.address, stack,
                          python_args=["-c", LAUNCHER], child_timeout=STUCK_CHILD_TIMEOUT,
                          clamd_timeout=60.0)
        os.environ.pop("LD_PRELOAD")
        gw.daemon.wait_for_workers(2)
        time.sleep(1.5)  # booted
        jump("-1d")
        ledger = Ledger(batch(1, "back"))
        started = time.monotonic()
        ledger.send_all(gw.send)
        took = time.monotonic() - started
        stuck = proxy.wait_for_connection(timeout=1)  # the worker that held the scan
        proxy.stall = False
        assert ledger.final(ledger.mails[0].mid) == "tempfail"
        # child_timeout, at most a turn of the master's loop, the abort: not a day
        assert took < STUCK_CHILD_TIMEOUT + 12, took
        aborted = re.findall(r"worker (\d+) stuck for more than child_timeout",
                             gw.daemon.log_text())
        assert aborted == [str(stuck)], gw.daemon.log_text()[-6000:]  # that one, no other
        gw.daemon.wait_for_workers(2, exclude={stuck}, timeout=15)  # its replacement
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        report(f"wall clock -1d, then a hung scan (aborted after {took:.1f}s)", counts)


def test_a_slow_scan_across_a_forward_jump_is_not_taken_for_stuck(short_tmp, clamd_nodecomp,
                                                                  jump):
    """A scan of 3 s, child_timeout 5 s, the clock two days on meanwhile: answered."""
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path).start()
    with ExitStack() as stack:
        stack.callback(proxy.stop)
        gw = open_gateway("ampdp", short_tmp, proxy.address, stack,
                          python_args=["-c", LAUNCHER], child_timeout=5.0)
        os.environ.pop("LD_PRELOAD")
        workers = gw.daemon.wait_for_workers(2)

        def jump_while_a_scan_is_held():
            proxy.stall = True
            proxy.wait_for_connection(timeout=20)
            jump("+2d")
            time.sleep(3.0)  # the master looks at the held worker's heartbeat meanwhile
            proxy.stall = False

        ledger = Ledger(batch(8, "fwd"))
        ledger.send_all(gw.send, fault=jump_while_a_scan_is_held, fault_after=2)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == 0, ledger.told
        assert "stuck for more than child_timeout" not in gw.daemon.log_text()
        assert gw.daemon.worker_pids() == workers
        report("wall clock +2d during a 3 s scan (child_timeout 5 s)", counts)


def test_the_heartbeat_ages_on_the_monotonic_clock_whatever_the_mtime_says():
    """No daemon: touches stamped a day back and two days on are touches all the same."""
    from amavisd.heartbeat import Heartbeat

    beat = Heartbeat()
    try:
        time.sleep(0.3)
        assert 0.3 <= beat.age() < 2
        fd = beat._fd  # a touch as a worker with a jumped clock makes it
        for offset in (-86400, 2 * 86400):
            os.utime(fd, (time.time() + offset,) * 2)
            assert beat.age() < 0.1
            time.sleep(0.2)
            assert 0.2 <= beat.age() < 2
    finally:
        beat.close()
