"""Who may release quarantined mail (issue 10, item 10).

The quarantine id is public (log line, alert, X-Quarantine-ID), so over
AM.PDP a release must carry the entry's secret_id, as amavisd-new's
auth_required_release demands; other recipients than the original ones take
release_to_others; the admin's local CLI needs neither. Real parts: the
daemon, a clamd that decodes nothing, Debian's /usr/sbin/amavisd-release
(and the same script named amavisd-requeue, which sends request=requeue),
and an SMTP sink standing in for the MTA's re-injection port.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from amavisd.testing.messages import eicar_message
from tests.rigs.daemon import DaemonInstance
from tests.rigs.smtpsink import SMTPSink

pytestmark = pytest.mark.integration
AMAVISD_RELEASE = "/usr/sbin/amavisd-release"
# amavisd-new answers every release it will not do "450 4.5.0 Failure: ..." (exit_code 75)
REFUSED = ("450 4.5.0 Failure: release refused: no such quarantine entry, or a missing or "
           "wrong secret_id")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def release_script(directory: Path, socketname: str, name: str = "amavisd-release") -> Path:
    """Debian's amavisd-release, pointed at our daemon (its only setting)."""
    if not os.path.exists(AMAVISD_RELEASE):
        pytest.skip("amavisd-release not installed (Debian package amavisd-new)")
    text = Path(AMAVISD_RELEASE).read_text()
    text, n = re.subn(r"^\s*\$socketname = '[^']*';", f"  $socketname = '{socketname}';",
                      text, count=1, flags=re.M)
    assert n == 1, "amavisd-release's layout changed"
    script = directory / name
    script.write_text(text)
    return script


def run_release(script: Path, *args: str) -> str:
    proc = subprocess.run(["perl", "-T", str(script), *args], capture_output=True, text=True,
                          timeout=60)
    return (proc.stdout + proc.stderr).strip()


class Quarantined:
    """A daemon that quarantined one virus for bob and carol, and its release sink."""

    def __init__(self, workdir: Path, clamd: str, **settings):
        self.sink = SMTPSink()
        host, port = self.sink.start()
        self.daemon = DaemonInstance(workdir, clamd, workers=1,
                                     release_method=f"smtp:{host}:{port}", **settings).start()
        from tests.integration.test_daemon import ampdp, spool

        path = spool(self.daemon, eicar_message())
        reply = ampdp(self.daemon.socket_path, [
            ("request", "AM.PDP"), ("mail_file", str(path)), ("tempdir", str(path.parent)),
            ("sender", "<alice@example.test>"), ("recipient", "<bob@example.test>"),
            ("recipient", "<carol@example.test>")])
        assert reply.get("return_value") == "discard"
        self.qid = re.search(r"quarantine: (virus-\S{12})", self.daemon.log_text()).group(1)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "amavisd", "quarantine", "-c",
                               str(self.daemon.config_path), *args],
                              capture_output=True, text=True, timeout=30)

    def secret(self) -> str:
        """As the admin finds it: `amavisd quarantine list --secrets`."""
        listing = self.cli("list", "--secrets").stdout
        [line] = [x for x in listing.splitlines() if x.startswith(self.qid)]
        secret = line.split()[1]
        shown = self.cli("show", "--headers-only", self.qid).stdout
        assert f"# secret_id: {secret}" in shown
        return secret

    def close(self) -> None:
        self.daemon.stop()
        self.sink.stop()


@pytest.fixture
def quarantined(short_tmp, clamd_nodecomp):
    made = []

    def make(**settings) -> Quarantined:
        made.append(Quarantined(short_tmp / f"d{len(made)}", clamd_nodecomp.address,
                                **settings))
        return made[-1]

    yield make
    for q in made:
        q.close()


def test_amavisd_release_needs_the_secret(quarantined, short_tmp):
    q = quarantined()
    script = release_script(short_tmp, q.daemon.socket_path)
    secret = q.secret()
    assert run_release(script, q.qid) == REFUSED  # no secret: what the outsider did
    assert run_release(script, q.qid, "A" * len(secret)) == REFUSED
    assert run_release(script, q.qid, "", "bob@example.test") == REFUSED
    assert q.sink.wait(1, timeout=0.5) == []
    # an unknown id gets the very same answer: no oracle for which ids exist
    assert run_release(script, "virus-AAAAAAAAAAAA", secret) == REFUSED
    log = q.daemon.log_text()
    assert "refused: no secret_id in the request" in log and "refused: wrong secret_id" in log
    assert "refused: no such entry" in log
    assert secret not in log

    out = run_release(script, q.qid, secret)
    # amavisd-new's answer: the next hop's reply, one line a recipient
    assert out.splitlines() == [f"250 2.0.0 from MTA(smtp:[127.0.0.1]:{q.sink.address[1]}): "
                                "250 2.0.0 ok: kept"] * 2, out
    [got] = q.sink.wait(1)
    assert got.mail_from == "alice@example.test"
    assert sorted(got.rcpt_tos) == ["bob@example.test", "carol@example.test"]
    # the stored bytes, under the Resent-* block and our Received: line
    assert got.data.startswith(b"Resent-From: ")
    assert got.data.replace(b"\r\n", b"\n").endswith(eicar_message())


def test_requeue_needs_the_secret_too(quarantined, short_tmp):
    q = quarantined()
    script = release_script(short_tmp, q.daemon.socket_path, name="amavisd-requeue")
    assert run_release(script, q.qid) == REFUSED
    assert run_release(script, q.qid, q.secret()).startswith("250 2.0.0 from MTA(")
    assert len(q.sink.wait(1)) == 1


def test_other_recipients_take_release_to_others(quarantined, short_tmp):
    q = quarantined()
    script = release_script(short_tmp, q.daemon.socket_path)
    secret = q.secret()
    out = run_release(script, q.qid, secret, "mallory@example.net")
    assert out.startswith("450 4.5.0 Failure: release to other recipients than the original "
                          "ones is not allowed (release_to_others)"), out
    assert q.sink.wait(1, timeout=0.5) == []
    # one of the original recipients is no privilege
    assert run_release(script, q.qid, secret, "carol@example.test").startswith("250 2.0.0")
    assert q.sink.wait(1)[0].rcpt_tos == ["carol@example.test"]
    # the admin's CLI may send anywhere, without a secret
    proc = q.cli("release", q.qid, "postmaster@example.test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert q.sink.wait(2)[1].rcpt_tos == ["postmaster@example.test"]

    allowed = quarantined(release_to_others=True)
    script = release_script(short_tmp, allowed.daemon.socket_path, name="release-others")
    out = run_release(script, allowed.qid, allowed.secret(), "mallory@example.net")
    assert out.startswith("250 2.0.0"), out
    assert allowed.sink.wait(1)[0].rcpt_tos == ["mallory@example.net"]


def test_over_tcp_the_id_from_the_log_is_not_enough(quarantined, short_tmp):
    """With tcp_listen any local user reaches the daemon; the log (now 0640)
    gave them the id. Without the secret, nothing is released."""
    port = free_port()
    q = quarantined(tcp_listen=f"127.0.0.1:{port}")
    log_mode = stat.S_IMODE(q.daemon.log_path.stat().st_mode)
    assert log_mode == 0o640, oct(log_mode)
    script = release_script(short_tmp, f"127.0.0.1:{port}", name="release-tcp")
    assert run_release(script, q.qid) == REFUSED
    assert q.sink.wait(1, timeout=0.5) == []
    assert run_release(script, q.qid, q.secret()).startswith("250 2.0.0")
    assert len(q.sink.wait(1)) == 1


def test_auth_required_release_off_needs_no_secret_but_checks_one(quarantined, short_tmp):
    q = quarantined(auth_required_release=False)
    script = release_script(short_tmp, q.daemon.socket_path)
    assert run_release(script, q.qid, "wrong-secret") == REFUSED
    assert run_release(script, q.qid).startswith("250 2.0.0")
    assert len(q.sink.wait(1)) == 1
