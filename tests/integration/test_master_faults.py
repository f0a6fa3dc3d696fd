"""The master stays up through faults of the moment (issue 10, item 12).

- USR1 when the log file cannot be reopened (its dir made unwritable after
  logrotate moved the file): logged to the old file, survived by the master
  and the workers, and the daemon still scans.
- A worker that fails to boot after the daemon has served (temp base removed
  at run time) is respawned with a doubling back-off, not a reason to halt;
  a boot failure at start still halts (exit 78, test_daemon).
- Any other exception in the master: logged, sockets closed and the socket
  file removed, workers stopped, exit 70 (EX_SOFTWARE), no orphans.

Real daemon and clamd throughout. The two faults a real part cannot produce
on demand (a boot failure the worker cannot repair, a bug in the master) come
from the named fault launcher below, which wraps the real methods.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import time
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs.daemon import DaemonInstance

pytestmark = pytest.mark.integration

# Fault launcher: the real `amavisd` with two switches, each a file whose
# existence turns the fault on: FLAG.boot makes Worker.boot raise BootError,
# FLAG.master makes the master's loop raise (a stand-in for a bug).
_FAULTS = """\
import os, sys
from amavisd import master, worker
FLAG = {flag!r}
boot = worker.Worker.boot
def boot_fails_while_flagged(self):
    if os.path.exists(FLAG + ".boot"):
        raise worker.BootError("injected boot failure (test fault)")
    boot(self)
worker.Worker.boot = boot_fails_while_flagged
murder = master.Arbiter.murder_workers
def master_bug_while_flagged(self):
    if os.path.exists(FLAG + ".master"):
        raise RuntimeError("injected master bug (test fault)")
    murder(self)
master.Arbiter.murder_workers = master_bug_while_flagged
from amavisd.cli import main
sys.exit(main())
"""


def fault_argv(flag: Path) -> list[str]:
    return ["-c", _FAULTS.format(flag=str(flag))]


def scan(daemon: DaemonInstance, data: bytes, name: str) -> str | None:
    """One AM.PDP request for a message the daemon's user can read; the return_value."""
    from tests.integration.test_daemon import ampdp

    job = Path(daemon.tempbase) / name
    job.mkdir()
    (job / "email.txt").write_bytes(data)
    job.chmod(0o755)
    (job / "email.txt").chmod(0o644)
    reply = ampdp(daemon.socket_path, [("request", "AM.PDP"), ("mail_file", str(job / "email.txt")),
                                       ("tempdir", str(job)), ("recipient", "<b@example.test>")])
    return None if reply is None else reply.get("return_value")


def wait_until(predicate, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_usr1_with_an_unwritable_log_dir_is_survived(short_tmp, clamd_nodecomp):
    nobody = pwd.getpwnam("nobody")
    logdir = short_tmp / "d" / "log"
    logdir.mkdir(parents=True)
    os.chown(logdir, nobody.pw_uid, nobody.pw_gid)  # like /var/log/amavis
    log = logdir / "amavisd.log"
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, user="nobody",
                            group="nogroup", log_file=str(log), virus_destiny="reject")
    with daemon:
        workers = daemon.wait_for_workers(2)
        info = log.stat()
        assert oct(info.st_mode & 0o777) == "0o640"
        assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        log.rename(logdir / "amavisd.log.1")  # logrotate...
        logdir.chmod(0o555)  # ...and a dir the daemon can no longer write
        try:
            daemon.signal(signal.SIGUSR1)
            rotated = logdir / "amavisd.log.1"
            # the master and both workers say so, in the file they still have
            assert wait_until(lambda: rotated.read_text().count("cannot reopen log file") >= 3,
                              10), rotated.read_text()[-2000:]
            time.sleep(0.5)
            assert daemon.proc.poll() is None, daemon.stderr_text()[-2000:]
            assert daemon.worker_pids() == workers
            assert scan(daemon, eicar_message(), "after-usr1") == "reject"
            assert scan(daemon, clean_message(), "after-usr1-clean") == "continue"
            assert not log.exists()
        finally:
            logdir.chmod(0o755)
        daemon.signal(signal.SIGUSR1)  # the dir is fixed: the next USR1 makes a new file
        assert wait_until(lambda: log.exists() and "USR1: logs reopened" in log.read_text(), 10)
        assert oct(log.stat().st_mode & 0o777) == "0o640"
        assert daemon.proc.poll() is None


def test_temp_base_removed_at_run_time_does_not_halt_the_master(short_tmp, clamd_nodecomp):
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2,
                        virus_destiny="reject") as daemon:
        workers = daemon.wait_for_workers(2)
        assert scan(daemon, clean_message(), "served") == "continue"
        time.sleep(1.5)  # the workers' heartbeats move: they have booted
        shutil.rmtree(daemon.tempbase)
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(4)
        assert daemon.proc.poll() is None, daemon.stderr_text()[-2000:]
        # still answered (tempfail at worst: the temp base is gone)
        from tests.integration.test_daemon import ampdp

        reply = ampdp(daemon.socket_path, [("request", "AM.PDP"),
                                           ("mail_file", daemon.tempbase + "/x/email.txt")])
        assert reply is not None and reply.get("return_value") in ("tempfail", "continue")
        spawned = daemon.log_text().count(" spawned (generation")
        assert spawned <= 2 + 4, daemon.log_text()[-3000:]  # back-off, no storm


def test_boot_failures_after_serving_are_respawned_with_back_off(short_tmp, clamd_nodecomp):
    flag = short_tmp / "fault"
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2,
                        python_args=fault_argv(flag), virus_destiny="reject") as daemon:
        workers = daemon.wait_for_workers(2)
        assert scan(daemon, eicar_message(), "served") == "reject"
        time.sleep(1.5)  # the workers' heartbeats move: they have booted
        Path(f"{flag}.boot").touch()
        os.kill(sorted(workers)[0], signal.SIGKILL)
        time.sleep(6)
        assert daemon.proc.poll() is None, daemon.stderr_text()[-2000:]
        text = daemon.log_text()
        failures = text.count("injected boot failure")
        assert 2 <= failures <= 5, text[-3000:]  # 1 s, 2 s, 4 s apart: not a storm
        assert "respawning in 1s" in text and "respawning in 2s" in text
        assert scan(daemon, eicar_message(), "meanwhile") == "reject"  # the other worker
        Path(f"{flag}.boot").unlink()
        daemon.wait_for_workers(2, timeout=20)  # fixed: the next respawn boots
        assert daemon.proc.poll() is None


def test_a_boot_failure_at_start_still_halts(short_tmp, clamd_nodecomp):
    flag = short_tmp / "fault"
    Path(f"{flag}.boot").touch()
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2,
                            python_args=fault_argv(flag))
    try:
        daemon.start(timeout=15)
    except RuntimeError as err:
        assert "exited with 78" in str(err)
    try:
        assert daemon.proc.wait(15) == 78
        assert "not respawning" in daemon.log_text()
    finally:
        daemon.stop()


def test_a_bug_in_the_master_stops_everything_with_exit_70(short_tmp, clamd_nodecomp):
    flag = short_tmp / "fault"
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2,
                            python_args=fault_argv(flag))
    with daemon:
        workers = daemon.wait_for_workers(2)
        socket_path = daemon.socket_path
        Path(f"{flag}.master").touch()
        assert daemon.proc.wait(20) == 70
    text = daemon.log_text()
    assert "internal error; stopping" in text and "injected master bug" in text
    assert not os.path.exists(socket_path)  # new clients fail fast; the MTA retries
    for pid in workers:  # stopped and reaped, not orphaned
        assert not Path(f"/proc/{pid}").exists(), pid
