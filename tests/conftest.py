"""Shared fixtures: a real private clamd, short temp dirs, the corpus location."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from amavisd.testing import clamd as clamd_testing
from tests.rigs.smtpsink import SMTPSink

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def short_tmp():
    """A 0755 dir directly under /tmp: AF_UNIX paths are limited to 108 bytes,
    and other users (amavis, nobody) must be able to traverse it."""
    path = Path(tempfile.mkdtemp(prefix="amd", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def clamd_nodecomp(tmp_path_factory):
    """One real clamd for the session that does NOT decode mail or archives,
    so a detection proves our decomposition handed it the part."""
    reason = clamd_testing.skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="amc", dir="/tmp"))
    base.chmod(0o755)
    instance = clamd_testing.ClamdInstance(base, mode="nodecomp").start()
    yield instance
    instance.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def corpus() -> Path:
    path = Path(os.environ.get("AMAVISD_CORPUS", REPO.parent / "shared" / "corpus"))
    if not path.is_dir():
        pytest.skip(f"corpus not found at {path} (set AMAVISD_CORPUS)")
    return path


@pytest.fixture
def sink():
    """A real SMTP sink standing in for the MTA's re-injection port."""
    with SMTPSink() as server:
        yield server


@pytest.fixture
def small_tmpfs():
    """A real 1 MiB tmpfs: the disk really fills up (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tempfile.mkdtemp(prefix="amdfull", dir="/tmp")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path],
                          capture_output=True)
    if done.returncode:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", path], check=False)
    os.rmdir(path)


def _mta_factory(rig, make_instance, short_tmp, prefix):
    """Yield make(**options) -> a started private MTA from `rig` (its
    skip_reason() decides whether there is one here), each in its own dir
    under `short_tmp`; all stopped at the end."""
    reason = rig.skip_reason()
    if reason:
        pytest.skip(reason)
    made = []

    def make(**options):
        instance = make_instance(short_tmp / f"{prefix}{len(made)}", **options)
        made.append(instance)
        return instance.start()

    yield make
    for instance in made:
        instance.stop()


@pytest.fixture
def postfix_factory(short_tmp):
    """make(**options) -> a started private Postfix (tests/rigs/postfix.py,
    options as PostfixInstance's), each with its own dir; all stopped at the end."""
    from tests.rigs import postfix as postfix_rig

    yield from _mta_factory(postfix_rig, postfix_rig.PostfixInstance, short_tmp, "postfix")


@pytest.fixture
def postfix(postfix_factory):
    """A started private Postfix relaying everything to its own SMTP sink (`.sink`)."""
    return postfix_factory()


@pytest.fixture
def sendmail_factory(short_tmp):
    """make(**options) -> a started private Sendmail (tests/rigs/sendmail.py,
    options as SendmailInstance's), each with its own dir; all stopped at the end."""
    from tests.rigs import sendmail as sendmail_rig

    yield from _mta_factory(sendmail_rig, sendmail_rig.SendmailInstance, short_tmp, "sendmail")
