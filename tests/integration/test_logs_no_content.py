"""No message content and no secret in any log line, at log_level debug too.

What may be logged is what amavisd-new's line carries: the envelope, the
client address, Queue-ID, Message-ID, quarantine id, size, the verdict and
its reason (a virus name; for BANNED, the offending name or type, which is
the reason). Never the Subject, a body, a decoded attachment, an attachment's
name when it is not the reason, nor a release's secret_id, right or wrong.

Real daemon (AM.PDP socket and the SMTP content filter), real clamd, a real
next hop and release sink. Canaries go in every place content can hide;
the daemon's stderr and log file are then searched for them, for both
log formats. The control: each log does carry the line per message and
DEBUG records, so an empty or silenced log cannot pass.
"""

from __future__ import annotations

import base64
import json
import re
import smtplib
import subprocess
import sys

import pytest

from amavisd.testing.eicar import EICAR
from tests.integration.test_daemon import ampdp, spool
from tests.rigs.daemon import DaemonInstance
from tests.rigs.nexthop import NextHop
from tests.rigs.postfix import free_port
from tests.rigs.smtpsink import SMTPSink

pytestmark = pytest.mark.integration

SUBJECT = "Subject-canary-q7Zr"
BODY = "Body-canary-W3xk"
INNER = "Attachment-canary-Lm9p"  # inside a base64 text attachment: decoded content
NAME = "name-canary-Vb2t.txt"
WRONG_SECRET = "WrongSecretCanaryAAA"
CANARIES = (SUBJECT, BODY, INNER, NAME, WRONG_SECRET)


def message(kind: str, n: int) -> bytes:
    """A MIME mail with every canary; `kind` "virus" adds EICAR as a second
    attachment (the mail is quarantined, so there is a secret to release with)."""
    inner = base64.encodebytes(f"{INNER}\n".encode()).decode()
    parts = [f"--b\nContent-Type: text/plain\n\n{BODY}\n",
             f'--b\nContent-Type: text/plain; name="{NAME}"\n'
             f'Content-Disposition: attachment; filename="{NAME}"\n'
             f"Content-Transfer-Encoding: base64\n\n{inner}"]
    if kind == "virus":
        parts.append('--b\nContent-Type: application/octet-stream; name="v.com"\n'
                     "Content-Transfer-Encoding: base64\n\n"
                     + base64.encodebytes(EICAR).decode())
    return ("From: alice@example.test\nTo: bob@example.test\n"
            f"Subject: {SUBJECT} {kind}\nMessage-ID: <{kind}-{n}@example.test>\n"
            'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
            + "".join(parts) + "--b--\n").encode()


def scan(daemon: DaemonInstance, raw: bytes, name: str) -> dict:
    path = spool(daemon, raw, name)
    reply = ampdp(daemon.socket_path, [
        ("request", "AM.PDP"), ("mail_file", str(path)), ("tempdir", str(path.parent)),
        ("sender", "<alice@example.test>"), ("recipient", "<bob@example.test>")])
    assert reply is not None, daemon.stderr_text()[-3000:]
    return reply


@pytest.fixture(params=["text", "json"])
def logs(request, short_tmp, clamd_nodecomp):
    """Every log line of a daemon that saw the canaries, and the secret it used."""
    fmt = request.param
    with NextHop() as hop, SMTPSink() as releases:
        host, port = releases.address
        smtp_port = free_port()
        daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                                log_level="debug", log_format=fmt, log_to=["stderr"],
                                smtp_listen=[f"127.0.0.1:{smtp_port}"],
                                forward_method=hop.spec, release_method=f"smtp:{host}:{port}")
        with daemon:
            assert scan(daemon, message("clean", 1), "c").get("return_value") == "continue"
            assert scan(daemon, message("virus", 2), "v").get("return_value") == "discard"
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as smtp:
                smtp.sendmail("alice@example.test", ["bob@example.test"], message("clean", 3))
                smtp.sendmail("alice@example.test", ["bob@example.test"], message("virus", 4))
            log_text = daemon.log_text()
            qid = re.search(r"(virus-[A-Za-z0-9_-]{12})", log_text).group(1)
            secret = daemon_secret(daemon, qid)
            wrong = ampdp(daemon.socket_path, [("request", "release"), ("mail_id", qid),
                                               ("secret_id", WRONG_SECRET)])
            right = ampdp(daemon.socket_path, [("request", "release"), ("mail_id", qid),
                                               ("secret_id", secret)])
            assert wrong is not None and right is not None
            assert "refused" in wrong.get("setreply", ""), wrong
            assert right.get("setreply", "").startswith("250"), right
            assert releases.wait(1, timeout=20)
        yield fmt, daemon.stderr_text(), daemon.log_text(), secret


def daemon_secret(daemon: DaemonInstance, qid: str) -> str:
    """As the admin finds it: `amavisd quarantine list --secrets`."""
    listing = subprocess.run([sys.executable, "-m", "amavisd", "quarantine", "-c",
                              str(daemon.config_path), "list", "--secrets"],
                             capture_output=True, text=True, timeout=30).stdout
    [line] = [x for x in listing.splitlines() if x.startswith(qid)]
    return line.split()[1]


def test_no_content_and_no_secret_in_any_log_line(logs):
    fmt, stderr, log_file, secret = logs
    for where, text in (("stderr", stderr), ("log_file", log_file)):
        # the control: the log is there, at debug, with the lines it must have
        assert "DEBUG" in text or '"level": "debug"' in text, (where, text[-2000:])
        for n in (1, 2, 3, 4):
            assert f"clean-{n}@example.test" in text or f"virus-{n}@example.test" in text
        assert text.count("INFECTED") >= 2 and "release" in text.lower()
        leaked = [c for c in (*CANARIES, secret) if c in text]
        assert leaked == [], (where, [line for line in text.splitlines()
                                      if any(c in line for c in leaked)][:5])
        if fmt == "json":  # every record is one JSON object, nothing else on a line
            for line in text.splitlines():
                if line.startswith("{"):
                    json.loads(line)


def test_a_banned_name_is_logged_only_as_the_reason(short_tmp, clamd_nodecomp):
    """amavisd-new logs the name that made a mail BANNED: it is the reason.
    The same name in a mail that is not banned is not logged."""
    banned_name = "payload-canary-Hq4.exe"
    raw = message("clean", 5).replace(NAME.encode(), banned_name.encode())
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                        log_level="debug") as daemon:
        reply = scan(daemon, raw, "b")
        assert reply.get("return_value") != "continue", reply
        assert scan(daemon, message("clean", 6), "c").get("return_value") == "continue"
        text = daemon.stderr_text() + daemon.log_text()
    banned_lines = [line for line in text.splitlines() if banned_name in line]
    assert banned_lines and all("BANNED" in line for line in banned_lines), banned_lines
    assert NAME not in text and BODY not in text and SUBJECT not in text
