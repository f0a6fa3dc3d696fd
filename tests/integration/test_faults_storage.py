"""Storage faults mid-stream, every message counted (issue 17, item 1).

The disk fills up under the work base (where mail is spooled and decoded)
and under the quarantine; the quarantine goes read-only (a remount: root
ignores chmod 000) or, under a daemon that dropped root, mode 000; the work
base is removed again and again while mail flows. Each time the mail that
could not be spooled, checked or kept is tempfailed, never passed and never
discarded unkept, and arrives once when resent after the fault. Real
daemon, real clamd, a real 1 MiB tmpfs (conftest `small_tmpfs`), AM.PDP and
the SMTP filter; counted by the ledger.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.test_faults_scanner import full_then_room, report
from tests.rigs.faults import Filler
from tests.rigs.ledger import Ledger, batch, open_gateway
from tests.rigs.mailboxes import ensure_user
from tests.rigs.mta_cases import DAEMON_USER, wait_for

pytestmark = pytest.mark.integration

INGRESSES = ["ampdp", "smtp"]


def remount(path: str, mode: str) -> None:
    """remount,ro fails (EBUSY, exit 32) while a file there is open for writing,
    as a quarantine file is while it is stored: tried again until it takes."""
    deadline = time.monotonic() + 10
    while True:
        done = subprocess.run(["mount", "-o", f"remount,{mode}", path], capture_output=True)
        if not done.returncode or time.monotonic() > deadline:
            done.check_returncode()
            return
        time.sleep(0.01)


@pytest.mark.parametrize("ingress", INGRESSES)
def test_disk_full_while_spooling(short_tmp, clamd_nodecomp, small_tmpfs, ingress):
    """The SMTP filter spools every message to the work base; AM.PDP reads the
    MTA's file and spills decoded parts there (max_memory tiny: every part)."""
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack,
                          work_base=small_tmpfs, max_memory=8)
        filler = Filler(small_tmpfs)
        stack.callback(lambda: filler.path.exists() and filler.empty())
        _, counts = full_then_room(gw, filler, f"fs-{ingress}")
        assert gw.daemon.proc.poll() is None
        report(f"disk full while spooling [{ingress}]", counts)


def full(path: str, stack: ExitStack) -> tuple[Callable[[], None], Callable[[], None]]:
    filler = Filler(path)
    stack.callback(lambda: filler.path.exists() and filler.empty())
    return filler.fill, filler.empty


def read_only(path: str, stack: ExitStack) -> tuple[Callable[[], None], Callable[[], None]]:
    stack.callback(lambda: subprocess.run(["mount", "-o", "remount,rw", path]))
    return lambda: remount(path, "ro"), lambda: remount(path, "rw")


@pytest.mark.parametrize("ingress", INGRESSES)
@pytest.mark.parametrize("fault", [full, read_only], ids=["full", "read-only"])
def test_quarantine_cannot_take_mail(short_tmp, clamd_nodecomp, small_tmpfs, ingress, fault):
    """Blocked mail that cannot be kept is tempfailed, never dropped unkept;
    clean mail, which needs no room there, goes on."""
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack,
                          quarantine_dir=small_tmpfs)
        breaks, fix = fault(small_tmpfs, stack)
        ledger = Ledger(batch(24, f"q{fault.__name__}-{ingress}"))
        ledger.send_all(gw.send, fault=breaks, fault_after=6)
        tempfailed = ledger.tempfailed()
        assert sum(m.blocked for m in tempfailed) >= 5, ledger.told
        assert not any(m.kind == "clean" for m in tempfailed)
        gw.check(ledger)
        assert "quarantine" in gw.daemon.log_text()
        fix()
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        report(f"quarantine {fault.__name__.replace('_', '-')} [{ingress}]", counts)


def worker_uids(daemon) -> set[str]:
    """The real, effective, saved and fs uids of the daemon's workers (/proc)."""
    uids = set()
    for pid in daemon.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                uids.update(line.split()[1:])
    return uids


@pytest.mark.parametrize("owner, ingress", [("root", "ampdp"), ("root", "smtp"),
                                            ("daemon", "ampdp")])
def test_quarantine_chmod_000_under_a_daemon_that_dropped_root(short_tmp, clamd_nodecomp,
                                                               owner, ingress):
    """chmod 000 on the quarantine, the daemon running as an unprivileged user
    (root ignores modes, hence the remount above). Its own dir the daemon makes
    0700 again before it stores (FileQuarantine.prepare): every blocked message
    kept (one caught mid-store may tempfail). Chowned to root as well, it cannot: infected and
    banned mail is tempfailed, never passed nor discarded unkept, clean mail
    goes on, and once the dir is given back the resent mail is kept."""
    user = ensure_user(DAEMON_USER, DAEMON_USER)
    short_tmp.chmod(0o755)  # the daemon's user walks to its workdir
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack,
                          user=DAEMON_USER, group=DAEMON_USER)
        gw.daemon.wait_for_workers(2)
        assert worker_uids(gw.daemon) == {str(user.pw_uid)}
        quarantine = Path(gw.quarantine)
        assert quarantine.stat().st_uid == user.pw_uid

        def take_away() -> None:
            if owner == "root":
                os.chown(quarantine, 0, 0)
            quarantine.chmod(0)

        def give_back() -> None:
            os.chown(quarantine, user.pw_uid, user.pw_gid)
            quarantine.chmod(0o700)

        stack.callback(give_back)
        ledger = Ledger(batch(24, f"q000{owner}-{ingress}"))
        ledger.send_all(gw.send, fault=take_away, fault_after=6)
        tempfailed = ledger.tempfailed()
        gw.check(ledger)  # nothing blocked passed, nothing discarded unkept
        if owner == "daemon":
            # repaired before the next store; a store already past its repair when
            # the mode went is tempfailed (kept on resend below): at most one a worker
            assert len(tempfailed) <= 2 and not any(m.kind == "clean" for m in tempfailed)
            assert quarantine.stat().st_mode & 0o777 == 0o700
        else:
            assert sum(m.blocked for m in tempfailed) >= 5, ledger.told
            assert not any(m.kind == "clean" for m in tempfailed)
            assert "quarantine" in gw.daemon.log_text()
        give_back()
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.resent == len(tempfailed)
        report(f"quarantine chmod 000, owned by {owner}, daemon as {DAEMON_USER} "
               f"[{ingress}]", counts)


class WorkBaseRemover:
    """Removes the work base every few ms while mail flows; a removal that
    took a message's own dir (amavisd-<pid>-*: its spilled parts) with it is
    a hit, the fault landing mid-message. Counting hits, not removals, keeps
    the test meaningful on a loaded machine, where a batch may end before a
    timer-driven remover got going."""

    def __init__(self, work_base: str, every: float = 0.004):
        self.work_base, self.every = work_base, every
        self.removals = self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                held = any(n.startswith("amavisd-") for n in os.listdir(self.work_base))
            except OSError:
                held = False  # removed already, not yet re-created
            shutil.rmtree(self.work_base, ignore_errors=True)
            self.removals += 1
            self.hits += held

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(10)


WORK_BASE_HITS = 20  # removals mid-message the test insists on
WORK_BASE_ROUNDS = 6  # batches of 20 at most to get them


@pytest.mark.parametrize("ingress", INGRESSES)
def test_work_base_removed_again_and_again(short_tmp, clamd_nodecomp, ingress):
    """max_memory 8: every part spills to the message's dir in the work base,
    through either ingress, so each message needs the work base throughout.
    Batches of 20 are sent until the remover has taken a message's dir with it
    WORK_BASE_HITS times; every message is counted (a removal must never make
    infected or banned mail pass, nor lose one), then the tempfailed resent."""
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack, max_memory=8)
        remover = WorkBaseRemover(gw.daemon.config.work_base_path)
        stack.callback(remover.stop)
        mails = batch(20 * WORK_BASE_ROUNDS, f"wr-{ingress}")
        sent, told = 0, {}  # one count across the batches
        while remover.hits < WORK_BASE_HITS and sent < len(mails):
            ledger = Ledger(mails[: sent + 20], told)
            ledger.send_all(gw.send, mails=mails[sent: sent + 20],
                            fault=None if sent else remover.start, fault_after=2)
            sent += 20
        remover.stop()
        assert remover.hits >= WORK_BASE_HITS, (remover.hits, remover.removals, sent)
        tempfailed = len(ledger.tempfailed())
        gw.check(ledger)  # mid-fault: nothing blocked passed, nothing lost
        # The fault is over once the work base is back: a worker idle since
        # before the last removal re-creates it within a turn of its loop (an
        # SMTP DATA on it meanwhile is told 451: open_spool does not make it).
        wait_for(lambda: os.path.isdir(remover.work_base), 10, "work base re-created")
        ledger.resend(gw.send)  # the MTA retries
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == counts.resent == tempfailed
        assert gw.daemon.proc.poll() is None
        report(f"work base removed x{remover.removals}, {remover.hits} times mid-message "
               f"[{ingress}]", counts)
