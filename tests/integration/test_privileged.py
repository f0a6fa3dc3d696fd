"""Started as root, dropped to `amavis`, on an interpreter only root can read.

The real daemon runs from a sealed copy of this interpreter (tests/rigs/
sealed.py: a 0700 root-owned prefix of hard links), so once the master has
dropped privileges any import fails as it would in production. Messages hide
EICAR behind each lazily loaded codec (tests/rigs/codec_messages.py: a
deflated zip member named in cp437, a Joliet ISO, a TNEF winmail.dat); a
private clamd that decodes nothing must be handed the member itself. Each
must be INFECTED and the admin notice must reach the SMTP sink (smtplib asks
for the idna codec). The control runs the same daemon with `preload()`
disabled: nothing is found, and nothing passes as CLEAN either.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from amavisd.testing import archivers
from tests.integration.test_daemon import ampdp, spool
from tests.rigs import codec_messages
from tests.rigs.daemon import DaemonInstance
from tests.rigs.sealed import seal

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges"),
]

USER = "amavis"  # Debian's amavisd-new package creates it (make deps)
SEALED = ["-I", "-m", "amavisd"]  # -I: no PYTHONPATH, no current dir on sys.path
# The same daemon with the preload switched off, to show what it prevents.
UNPRELOADED = ["-I", "-c", "import sys, amavisd.preload as p; p.preload = lambda: None; "
                           "from amavisd.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} (make deps installs amavisd-new, which creates it)")


@pytest.fixture(scope="module")
def sealed_python(user):
    base = Path(tempfile.mkdtemp(prefix="amseal", dir="/tmp"))
    try:
        yield str(seal(base / "py"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def messages(short_tmp) -> dict[str, bytes]:
    for fmt in ("zip", "iso"):
        if archivers.available(fmt):
            pytest.skip(archivers.available(fmt))
    return codec_messages.messages(short_tmp)


def daemon_for(short_tmp: Path, clamd, sealed_python: str, sink, python_args: list[str]):
    host, port = sink.address
    return DaemonInstance(short_tmp / "d", clamd.address, workers=1, python=sealed_python,
                          python_args=python_args, user=USER, group=USER, log_file="",
                          notify_method=f"smtp:{host}:{port}", local_domains=["example.test"])


def scan(daemon: DaemonInstance, user: pwd.struct_passwd, name: str, raw: bytes) -> dict:
    path = spool(daemon, raw, name)
    for owned in (path.parent, path):  # the MTA spools as the daemon's user
        os.chown(owned, user.pw_uid, user.pw_gid)
    reply = ampdp(daemon.socket_path, [
        ("request", "AM.PDP"), ("mail_file", str(path)), ("tempdir", str(path.parent)),
        ("sender", "<alice@example.test>"), ("recipient", "<bob@example.test>")])
    assert reply is not None, daemon.stderr_text()[-3000:]
    return reply


def test_the_seal_holds(sealed_python, user):
    """The sealed interpreter is root's alone: `amavis` cannot even start it."""
    with pytest.raises(PermissionError):
        subprocess.run([sealed_python, "-c", "pass"], user=user.pw_uid, group=user.pw_gid,
                       extra_groups=[], timeout=30)
    subprocess.run([sealed_python, "-I", "-c", "import amavisd"], check=True, timeout=30)


def test_after_the_drop_every_codec_still_finds_the_virus(short_tmp, clamd_nodecomp,
                                                          sealed_python, user, sink, messages):
    with daemon_for(short_tmp, clamd_nodecomp, sealed_python, sink, SEALED) as daemon:
        (worker,) = daemon.wait_for_workers(1)
        uids = Path(f"/proc/{worker}/status").read_text().split("Uid:")[1].split()[:4]
        assert uids == [str(user.pw_uid)] * 4
        for name, raw in messages.items():
            reply = scan(daemon, user, name, raw)
            assert reply.get("return_value") == "discard", (name, reply)
        notices = sink.wait(len(messages), timeout=20)
    log = daemon.stderr_text()
    assert log.count("Blocked INFECTED: Eicar-Test-Signature") == len(messages), log[-3000:]
    assert "preloaded" in log and "Traceback" not in log and "failed" not in log, log[-3000:]
    assert [m.rcpt_tos for m in notices] == [["virusalert@example.test"]] * len(messages)
    bodies = [email.message_from_bytes(m.data, policy=email.policy.default)
              .get_body(("plain",)).get_content() for m in notices]
    assert any(codec_messages.CP437_SHOWN in body for body in bodies), bodies


def test_control_without_preload_nothing_is_found_and_nothing_passes(
        short_tmp, clamd_nodecomp, sealed_python, user, sink, messages):
    with daemon_for(short_tmp, clamd_nodecomp, sealed_python, sink, UNPRELOADED) as daemon:
        replies = {name: scan(daemon, user, name, raw) for name, raw in messages.items()}
    log = daemon.stderr_text()
    assert "INFECTED" not in log and "preloaded" not in log
    for name, reply in replies.items():  # UNCHECKED: rejected by default, never CLEAN
        assert reply.get("return_value") != "continue", (name, reply)
    assert "ImportError" in log or "LookupError" in log, log[-3000:]
