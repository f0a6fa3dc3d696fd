"""AM.PDP both ways with software nobody here wrote.

- Debian's `amavisd-submit` (Perl, from amavisd-new) against our daemon.
- Our `amavisd-client` against Debian's real amavisd-new daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message, forwarded_eicar_message
from tests.rigs import amavisd_new
from tests.rigs.daemon import ROOT, DaemonInstance

pytestmark = pytest.mark.integration
# These tests check the mechanics through the MTA-visible reject (exit 69);
# the default, discard after quarantine, has its own tests (test_policy).
REJECTING = {"virus_destiny": "reject"}

AMAVISD_SUBMIT = "/usr/sbin/amavisd-submit"


@pytest.fixture
def daemon(short_tmp, clamd_nodecomp):
    instance = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, **REJECTING).start()
    yield instance
    instance.stop()


@pytest.fixture
def submit(short_tmp, daemon):
    """A copy of amavisd-submit with its two settings pointed at our daemon."""
    if not os.path.exists(AMAVISD_SUBMIT):
        pytest.skip("amavisd-submit not installed (Debian package amavisd-new)")
    text = Path(AMAVISD_SUBMIT).read_text()
    text, n1 = re.subn(r"^\s*\$socketname = '[^']*';", f"  $socketname = '{daemon.socket_path}';",
                       text, count=1, flags=re.M)
    text, n2 = re.subn(r"^\s*\$tempbase = '[^']*';", f"  $tempbase = '{daemon.tempbase}';",
                       text, count=1, flags=re.M)
    text = re.sub(r"^\s*\$log_level = \d+;", "  $log_level = 2;", text, count=1, flags=re.M)
    assert n1 == n2 == 1, "amavisd-submit's layout changed"
    script = short_tmp / "amavisd-submit"
    script.write_text(text)

    def run(message: bytes) -> subprocess.CompletedProcess:
        return subprocess.run(["perl", "-T", str(script), "alice@example.test",
                               "bob@example.test", "carol@example.test"], input=message,
                              capture_output=True, timeout=60)

    return run


def test_amavisd_submit_clean(submit, daemon):
    proc = submit(clean_message())
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "< return_value=continue" in err
    assert "< insheader=0 X-Virus-Scanned by amavisd" in err
    assert re.search(r"250 2\.5\.0 Ok, id=\d+-\d+, CLEAN, continue delivery", err)
    assert os.listdir(daemon.tempbase) == []  # tempdir_removed_by=server: we removed it
    assert "<alice@example.test> -> <bob@example.test>,<carol@example.test>" in daemon.log_text()


@pytest.mark.parametrize("message", [eicar_message(), forwarded_eicar_message()],
                         ids=["attachment", "forwarded"])
def test_amavisd_submit_infected(submit, daemon, message):
    proc = submit(message)
    assert proc.returncode == 69, proc.stderr
    err = proc.stderr.decode()
    assert "< return_value=reject" in err
    assert "554 5.7.0 Reject" in err and "INFECTED: Eicar-Test-Signature" in err


# -- our client against the real amavisd-new ------------------------------------------


@pytest.fixture
def amavisd_new_daemon(short_tmp, clamd_nodecomp):
    reason = amavisd_new.skip_reason()
    if reason:
        pytest.skip(reason)
    instance = amavisd_new.AmavisdNewInstance(short_tmp / "an", clamd_nodecomp.socket_path)
    instance.start()
    yield instance
    instance.stop()


def run_client_as_amavis(instance, *args: str, stdin: bytes | None = None):
    """Our client runs as the daemon's user, as a milter or Sendmail mailer would
    (U=amavis); it is stdlib-only, so Debian's own python3 runs it."""
    python = shutil.which("python3", path="/usr/bin") or "/usr/bin/python3"
    launcher = (f"import sys; sys.path.insert(0, {ROOT!r}); "
                "from amavisd_client.client import main; sys.exit(main())")
    return subprocess.run(["runuser", "-u", "amavis", "--", python, "-I", "-S", "-c", launcher,
                           "-s", str(instance.socket_path), *args],
                          input=stdin, capture_output=True, timeout=60)


def test_our_client_against_amavisd_new(amavisd_new_daemon, short_tmp):
    clean = short_tmp / "clean.eml"
    clean.write_bytes(clean_message())
    infected = short_tmp / "infected.eml"
    infected.write_bytes(eicar_message())
    for path in (clean, infected):
        path.chmod(0o644)
    proc = run_client_as_amavis(amavisd_new_daemon, str(clean))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"250 2.5.0 Ok" in proc.stdout
    proc = run_client_as_amavis(amavisd_new_daemon, str(infected))
    assert proc.returncode == 69
    assert b"554 5.7.0 Reject" in proc.stdout and b"INFECTED: Eicar-Test-Signature" in proc.stdout

    outdir = short_tmp / "out"
    outdir.mkdir()
    outdir.chmod(0o777)
    out = outdir / "delivered.eml"
    proc = run_client_as_amavis(amavisd_new_daemon, "-d", f"dd of={out} status=none",
                                "-f", "alice@example.test", "--", "bob@example.test",
                                stdin=clean_message())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_bytes().startswith(b"X-Virus-Scanned: amavisd-new at example.test\n")
    proc = run_client_as_amavis(amavisd_new_daemon, "-d", f"dd of={outdir}/bad.eml status=none",
                                "-f", "mallory@example.test", "--", "bob@example.test",
                                stdin=eicar_message())
    assert proc.returncode == 69 and not (outdir / "bad.eml").exists()
    assert os.listdir(amavisd_new_daemon.tempbase) == []  # our spool dirs were removed
