"""Storage faults mid-stream, every message counted (issue 17, item 1).

The disk fills up under the work base (where mail is spooled and decoded)
and under the quarantine; the quarantine goes read-only (a remount: root
ignores chmod 000); the work base is removed again and again while mail
flows. Each time the mail that could not be spooled, checked or kept is
tempfailed, never passed and never discarded unkept, and arrives once when
resent after the fault. Real daemon, real clamd, a real 1 MiB tmpfs
(conftest `small_tmpfs`), AM.PDP and the SMTP filter; counted by the ledger.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.test_faults_scanner import report
from tests.rigs.ledger import Ledger, batch, open_gateway

pytestmark = pytest.mark.integration

INGRESSES = ["ampdp", "smtp"]


class Filler:
    """Keeps a filesystem full: writes until ENOSPC, and again whenever the
    daemon's removed temp files free some blocks, until `empty()`."""

    def __init__(self, directory: str):
        self.path = Path(directory) / "filler"
        self._stop = threading.Event()
        self._full = threading.Event()
        self._thread = threading.Thread(target=self._keep_full, daemon=True)

    def fill(self) -> None:
        self._thread.start()
        assert self._full.wait(10), "the disk did not fill up"

    def _keep_full(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 4096
        try:
            while not self._stop.is_set():
                try:
                    while os.write(fd, block):
                        pass
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    self._full.set()
                self._stop.wait(0.005)
        finally:
            os.close(fd)

    def empty(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.path.unlink()


def remount(path: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", path], check=True, capture_output=True)


@pytest.mark.parametrize("ingress", INGRESSES)
def test_disk_full_while_spooling(short_tmp, clamd_nodecomp, small_tmpfs, ingress):
    """The SMTP filter spools every message to the work base; AM.PDP reads the
    MTA's file and spills decoded parts there (max_memory tiny: every part)."""
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack,
                          work_base=small_tmpfs, max_memory=8)
        filler = Filler(small_tmpfs)
        stack.callback(lambda: filler.path.exists() and filler.empty())
        ledger = Ledger(batch(24, f"fs-{ingress}"))
        ledger.send_all(gw.send, fault=filler.fill, fault_after=6)
        tempfailed = len(ledger.tempfailed())
        assert tempfailed >= 10, ledger.told
        gw.check(ledger)
        filler.empty()
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
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


@pytest.mark.parametrize("ingress", INGRESSES)
def test_work_base_removed_again_and_again(short_tmp, clamd_nodecomp, ingress):
    stop = threading.Event()
    removals = []
    with ExitStack() as stack:
        gw = open_gateway(ingress, short_tmp, clamd_nodecomp.address, stack)
        work_base = gw.daemon.config.work_base_path

        def keep_removing():
            while not stop.wait(0.02):
                shutil.rmtree(work_base, ignore_errors=True)
                removals.append(1)

        remover = threading.Thread(target=keep_removing)
        ledger = Ledger(batch(40, f"wr-{ingress}"))
        try:
            ledger.send_all(gw.send, fault=remover.start, fault_after=4)
        finally:
            stop.set()
            remover.join(10)
        assert len(removals) >= 3
        first = len(ledger.tempfailed())
        gw.check(ledger)
        ledger.resend(gw.send)
        counts = gw.check(ledger, allow_tempfail=False)
        assert counts.tempfailed_once == first
        assert gw.daemon.proc.poll() is None
        report(f"work base removed x{len(removals)} [{ingress}]", counts)
