"""A real AM.PDP client nobody here wrote: Debian's C amavisd-milter (1.7.2),
behind a private Postfix, in front of OUR daemon and in front of Debian's
amavisd-new (tests/rigs/amavisd_new.py), with the same mails.

The outcomes the SMTP client and the final destination see must be the
same: a clean mail delivered once with an X-Virus-Scanned header, EICAR
(plain and zipped) rejected with 554 5.7.0 and never delivered, and a
backend that is down answered with a 4xx. The header texts differ by design
(each names its own daemon); the code classes and enhanced codes must not.
The C milter runs as its daemon's user, as Debian sets it up (the daemon
must read the files it spools), with -w the daemon's temp base.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs import amavisd_new
from tests.rigs.daemon import DaemonInstance
from tests.rigs.mailboxes import ensure_user
from tests.rigs.mta_cases import DAEMON_USER, QUIET, quarantined, zipped_eicar

pytestmark = pytest.mark.integration

C_MILTER = shutil.which("amavisd-milter") or "/usr/sbin/amavisd-milter"
SENDER = "alice@example.test"
CASES = {"clean": clean_message("interop clean"), "eicar": eicar_message(),
         "eicar-zip": zipped_eicar()}


@contextlib.contextmanager
def c_milter(workdir: Path, user: str, daemon_socket: str, tempbase: str):
    """Debian's amavisd-milter in the foreground as `user`; yields its socket path."""
    account = pwd.getpwnam(user)
    workdir.mkdir()
    os.chown(workdir, account.pw_uid, account.pw_gid)
    sock = workdir / "milter.sock"
    log = open(workdir / "c-milter.log", "wb")
    proc = subprocess.Popen([C_MILTER, "-f", "-s", f"unix:{sock}", "-S", daemon_socket,
                             "-w", tempbase, "-p", str(workdir / "pid")],
                            user=account.pw_uid, group=account.pw_gid, umask=0o000,
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, (workdir / "c-milter.log").read_text()
            assert time.monotonic() < deadline, "the C amavisd-milter made no socket"
            time.sleep(0.1)
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def ours(short_tmp: Path, clamd) -> tuple[DaemonInstance, str, str]:
    ensure_user(DAEMON_USER, DAEMON_USER)
    daemon = DaemonInstance(short_tmp / "ours", clamd.address, workers=2, user=DAEMON_USER,
                            group=DAEMON_USER, virus_destiny="reject", **QUIET).start()
    return daemon, DAEMON_USER, daemon.socket_path


def theirs(short_tmp: Path, clamd):
    reason = amavisd_new.skip_reason()
    if reason:
        pytest.skip(reason)
    instance = amavisd_new.AmavisdNewInstance(short_tmp / "theirs", clamd.socket_path,
                                              virus_destiny="D_REJECT").start()
    return instance, amavisd_new.AMAVIS_USER, str(instance.socket_path)


def outcome(pfx, name: str, texts: list[str]) -> tuple:
    """What the SMTP client was told, and what reached the final destination."""
    before = len(pfx.sink.messages)
    sent = pfx.send(SENDER, ["bob@example.test"], CASES[name])
    if sent.code == 250:
        delivered = pfx.sink.wait(before + 1, timeout=60)[before:]
    else:
        delivered = pfx.sink.messages[before:]
    scanned = [m for m in delivered if b"\r\nX-Virus-Scanned: " in b"\r\n" + m.data]
    enhanced = sent.text.split(" ", 1)[0] if sent.text[:2] in ("2.", "4.", "5.") else ""
    texts.append(f"{name}: {sent.code} {sent.text}")
    return sent.code, enhanced, len(delivered), len(scanned)


@pytest.fixture
def interop(short_tmp, postfix_factory, clamd_nodecomp):
    if not os.access(C_MILTER, os.X_OK):
        pytest.skip("Debian's amavisd-milter not installed (package amavisd-milter)")

    def run(backend) -> dict[str, tuple]:
        daemon, user, socket_path = backend(short_tmp, clamd_nodecomp)
        tempbase = str(daemon.tempbase)
        results = {}
        try:
            with c_milter(short_tmp / f"c-{user}", user, socket_path, tempbase) as sock:
                pfx = postfix_factory(milters=[f"unix:{sock}"])
                texts: list[str] = []
                for name in CASES:
                    results[name] = outcome(pfx, name, texts)
                results["quarantined"] = bool(quarantine_of(daemon))
                daemon.stop()
                results["backend down"] = outcome(pfx, "clean", texts)[:3]
                print(f"{backend.__name__}: " + "\n    ".join(texts))
                # the replies' texts too, but for the ids (log id, Postfix queue id)
                results["texts"] = [re.sub(r"id=\S+|queued as \w+", "ID", t) for t in texts]
        finally:
            daemon.stop()
        return results

    return run


def quarantine_of(daemon) -> list[str]:
    if isinstance(daemon, DaemonInstance):
        return quarantined(daemon)
    return os.listdir(daemon.quarantine_dir)


def test_the_c_milter_sees_the_same_outcomes_from_our_daemon_as_from_amavisd_new(interop):
    reference = interop(theirs)
    got = interop(ours)
    print(f"amavisd-new: {reference}\nours:        {got}")
    assert reference["clean"] == (250, "2.0.0", 1, 1), reference
    assert reference["eicar"][:3] == (554, "5.7.0", 0), reference
    assert got == reference
