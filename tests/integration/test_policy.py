"""Policy and actions end to end: banned files, destinies on every ingress,
quarantine and release (our CLI and Debian's amavisd-release), notifications.

Real parts: the daemon, a private clamd that decodes nothing, the real
client, real archivers, Debian's amavisd-release, and an SMTP sink standing
in for the MTA's re-injection port.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import stat
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.testing.messages import eicar_message
from tests.rigs.daemon import DaemonInstance
from tests.rigs.smtpsink import SMTPSink

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
AMAVISD_RELEASE = "/usr/sbin/amavisd-release"


def attachment_message(filename: str, data: bytes, sender: str = "alice@example.test",
                       mime: str = "application/octet-stream") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "bob@example.test", f"file {filename}"
    msg["Message-ID"] = "<policy-test@example.test>"
    msg.set_content("see attached")
    maintype, subtype = mime.split("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


def archive(tool: list[str], name: str, members: dict[str, bytes], tmp: Path) -> bytes:
    src = tmp / f"src-{name}"
    src.mkdir()
    for member, data in members.items():
        (src / member).write_bytes(data)
    out = tmp / name
    subprocess.run(tool + [str(out)] + list(members), cwd=src, check=True,
                   capture_output=True, timeout=60)
    return out.read_bytes()


ARCHIVERS = {
    "zip": lambda m, t: archive(["zip", "-q"], "a.zip", m, t),
    "7z": lambda m, t: archive(["7zz", "a", "-bd", "-y"], "a.7z", m, t),
    "tar": lambda m, t: archive(["tar", "-cf"], "a.tar", m, t),
}


@pytest.fixture
def pipeline(clamd_nodecomp, short_tmp):
    def make(**values) -> Pipeline:
        values = {"clamd": clamd_nodecomp.address, "backup_scanners": [],
                  "quarantine_dir": str(short_tmp / "q"), "notify_method": "smtp:127.0.0.1:9",
                  "myhostname": "gw.example.test"} | values
        return Pipeline(configuration.load(None, values))
    return make


def process(pipeline: Pipeline, raw: bytes, tmp: Path, sender="alice@example.test"):
    path = tmp / "m.eml"
    path.write_bytes(raw)
    return pipeline.process(Job(log_id="t-1", mail_path=str(path),
                                envelope=Envelope(sender=sender, recipients=["bob@example.test"])))


# -- banned files -------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["AnnaKournikova.jpg.vbs", "invoice.pdf.exe", "run.scr",
                                      "setup.{3050f4d8-98b5-11cf-bb82-00aa00bdce0b}"])
def test_banned_names_at_the_top_level(pipeline, tmp_path, filename):
    result = process(pipeline(), attachment_message(filename, b"harmless bytes"), tmp_path)
    assert result.verdict == "BANNED", result.summary()
    assert result.banned_hits[0].part_name == filename
    assert result.destiny.value == "discard"


def test_a_banned_part_is_not_passed_when_the_scanners_are_down(pipeline, tmp_path):
    """when_scanners_fail=pass is about the virus scan only: banned rules
    did their work, and their verdict stands."""
    dead = f"unix:{tmp_path}/no-clamd.sock"
    result = process(pipeline(clamd=dead, when_scanners_fail="pass"),
                     attachment_message("invoice.pdf.exe", b"harmless bytes"), tmp_path)
    assert result.verdict == "BANNED", result.summary()
    assert result.destiny.value == "discard"
    clean = process(pipeline(clamd=dead, when_scanners_fail="pass"),
                    attachment_message("notes.txt", b"harmless bytes"), tmp_path)
    assert (clean.verdict, clean.destiny.value) == ("UNCHECKED", "pass")


@pytest.mark.parametrize("fmt", sorted(ARCHIVERS))
def test_banned_names_inside_archives(pipeline, tmp_path, fmt):
    raw_archive = ARCHIVERS[fmt]({"readme.txt": b"hi", "invoice.pdf.exe": b"MZ fake"}, tmp_path)
    result = process(pipeline(), attachment_message(f"docs.{fmt}", raw_archive), tmp_path)
    assert result.verdict == "BANNED", result.summary()
    assert any(h.part_name.endswith("invoice.pdf.exe") for h in result.banned_hits)


def test_a_clean_look_alike_passes(pipeline, tmp_path):
    for name in ("report.pdf", "photo.jpg", "Proposal.v12.pdf", "exe-notes.txt"):
        result = process(pipeline(), attachment_message(name, b"%PDF-1.4 just text"), tmp_path)
        assert result.verdict == "CLEAN", (name, result.summary())


def test_rule_order_the_first_match_decides(pipeline, tmp_path):
    raw = attachment_message("tool.exe", b"MZ\x90\x00 not really")
    assert process(pipeline(), raw, tmp_path).verdict == "BANNED"
    allow_first = ["allow name ~ ^tool\\.exe$"] + configuration.defaults()["banned_rules"]
    assert process(pipeline(banned_rules=allow_first), raw, tmp_path).verdict == "CLEAN"
    allow_last = configuration.defaults()["banned_rules"] + ["allow name ~ ^tool\\.exe$"]
    assert process(pipeline(banned_rules=allow_last), raw, tmp_path).verdict == "BANNED"


def test_scan_says_which_rule_hit(clamd_nodecomp, tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(attachment_message("invoice.pdf.exe", b"x"))
    proc = subprocess.run([sys.executable, "-m", "amavisd", "scan", "--tree", "--clamd",
                           clamd_nodecomp.address, str(path)], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 1
    assert "BANNED" in proc.stdout and "rule 1 [deny name ~" in proc.stdout, proc.stdout


# -- quarantine, headers, notifications ------------------------------------------------


def test_quarantine_modes_and_the_log_line(pipeline, short_tmp, tmp_path, caplog):
    caplog.set_level("INFO", logger="amavisd.pipeline")
    old = os.umask(0)
    try:
        result = process(pipeline(), eicar_message(), tmp_path)
    finally:
        os.umask(old)
    assert result.verdict == "INFECTED" and result.destiny.value == "discard"
    qdir = short_tmp / "q"
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    files = sorted(qdir.iterdir())
    assert [f.name for f in files] == [f"{result.quarantine_id}", f"{result.quarantine_id}.json"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert files[0].read_bytes() == eicar_message()
    line = [r.getMessage() for r in caplog.records if "(t-1)" in r.getMessage()][-1]
    assert re.search(r"\(t-1\) Blocked INFECTED: Eicar\S* \{discard\}, <alice@example.test> -> "
                     r"<bob@example.test>, quarantine: virus-\S{12}, size: \d+, \d+ ms",
                     line), line


def test_passed_with_a_problem_gets_alert_and_quarantine_headers(pipeline, tmp_path):
    raw = attachment_message("f.bin", b"x", mime="message/partial")
    p = pipeline(banned_rules=[], unchecked_destiny="pass", quarantine=["unchecked"])
    result = process(p, raw, tmp_path)
    assert result.verdict == "UNCHECKED" and result.destiny.value == "pass"
    names = {e.name: e.value for e in result.header_edits}
    assert names["X-Virus-Scanned"].startswith("by amavisd")
    assert names["X-Amavis-Alert"].startswith("UNCHECKED: ")
    assert names["X-Quarantine-ID"] == f"<{result.quarantine_id}>"


def gzip_nest(levels: int) -> bytes:
    data = b"plain text at the bottom\n"
    for _ in range(levels):
        data = subprocess.run(["gzip", "-c"], input=data, capture_output=True,
                              check=True).stdout
    return data


def encrypted_zip(tmp: Path) -> bytes:
    return archive(["zip", "-q", "-P", "secret"], "locked.zip", {"report.txt": b"hello\n"}, tmp)


def test_unchecked_destinies_per_kind(pipeline, tmp_path):
    """encrypted=pass lets a locked zip through with an alert; a bomb in the
    same message still meets the (stricter) unchecked_destiny."""
    p = pipeline(unchecked_destinies=["encrypted=pass", "partial=discard"], max_depth=3)
    zipped = encrypted_zip(tmp_path)
    locked = process(p, attachment_message("locked.zip", zipped), tmp_path)
    assert locked.verdict == "UNCHECKED" and locked.destiny.value == "pass"
    assert [r.kind for r in locked.unchecked] == ["encrypted"]
    assert any(e.name == "X-Amavis-Alert" and "encrypted zip member report.txt" in e.value
               for e in locked.header_edits)

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.test", "b@example.test", "two"
    msg.set_content("two attachments")
    msg.add_attachment(zipped, maintype="application", subtype="zip", filename="again.zip")
    msg.add_attachment(gzip_nest(6), maintype="application", subtype="gzip",
                       filename="deep.gz")
    both = process(p, msg.as_bytes(), tmp_path)
    assert sorted(r.kind for r in both.unchecked) == ["encrypted", "limit"]
    assert both.destiny.value == "reject"  # unchecked_destiny: the limit has no entry

    partial = process(p, attachment_message("f.bin", b"x", mime="message/partial"), tmp_path)
    assert partial.destiny.value == "discard" and partial.unchecked[0].kind == "partial"


def test_a_reason_s_words_never_choose_its_destiny():
    """Reasons carry member names and tool output: only their kind counts."""
    from amavisd.policy.destinies import destinies
    from amavisd.verdict import Category, Unchecked

    table = destinies(configuration.load(None, {"unchecked_destinies": ["encrypted=pass"]}))
    disguised = Unchecked("nested deeper than 20 levels (encrypted password.zip)", "limit")
    assert table.destiny(Category.UNCHECKED, [disguised]).value == "reject"
    locked = Unchecked("encrypted zip member a.txt (p001/p002)", "encrypted")
    assert table.destiny(Category.UNCHECKED, [locked]).value == "pass"


def test_admin_alert_and_sender_dsn_arrive_as_mime(pipeline, tmp_path):
    with SMTPSink() as sink:
        host, port = sink.address
        p = pipeline(notify_method=f"smtp:{host}:{port}", banned_destiny="bounce",
                     local_domains=["example.test"])
        result = process(p, attachment_message("AnnaKournikova.jpg.vbs", b"x"), tmp_path)
        assert result.verdict == "BANNED" and result.destiny.value == "bounce"
        p.send_notices()
        got = {m.rcpt_tos[0]: m for m in sink.wait(2)}
    alert = email.message_from_bytes(got["virusalert@example.test"].data,
                                      policy=email.policy.default)
    assert "AnnaKournikova.jpg.vbs" in alert.get_body(("plain",)).get_content()
    assert result.quarantine_id in alert.as_string()
    dsn_msg = got["alice@example.test"]
    assert dsn_msg.mail_from == ""  # a DSN comes from the null sender
    dsn = email.message_from_bytes(dsn_msg.data, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parts = [p.get_content_type() for p in dsn.iter_parts()]
    assert parts[:2] == ["text/plain", "message/delivery-status"]
    status = dsn_msg.data.decode()
    assert "Final-Recipient: rfc822; bob@example.test" in status and "Status: 5.7.0" in status


def test_no_sender_notice_for_viruses_and_a_dead_mta_does_not_block(pipeline, tmp_path):
    with SMTPSink() as sink:
        host, port = sink.address
        p = pipeline(notify_method=f"smtp:{host}:{port}", virus_destiny="bounce",
                     local_domains=["example.test"])
        process(p, eicar_message(), tmp_path)
        p.send_notices()
        got = sink.wait(1)
    assert [m.rcpt_tos for m in got] == [["virusalert@example.test"]]  # no backscatter
    dead = pipeline(notify_method="smtp:127.0.0.1:9")
    assert process(dead, eicar_message(), tmp_path).verdict == "INFECTED"
    dead.send_notices()  # logged, not raised


# -- destinies on every ingress --------------------------------------------------------

DESTINY_REPLIES = {  # destiny: (client exit in file mode, AM.PDP return_value, setreply code)
    "pass": (0, "continue", "250"),
    "discard": (99, "discard", "250"),
    "bounce": (69, "reject", "554"),
    "reject": (69, "reject", "554"),
    "tempfail": (75, "tempfail", "451"),
}


@pytest.mark.parametrize("destiny", sorted(DESTINY_REPLIES))
def test_each_destiny_through_the_client_and_ampdp(short_tmp, clamd_nodecomp, destiny):
    from tests.integration.test_daemon import ampdp, spool

    exit_code, return_value, code = DESTINY_REPLIES[destiny]
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                        virus_destiny=destiny) as daemon:
        message = short_tmp / "m.eml"
        message.write_bytes(eicar_message())
        proc = daemon.client(str(message))
        assert proc.returncode == exit_code, proc.stdout
        path = spool(daemon, eicar_message())
        reply = ampdp(daemon.socket_path, [("request", "AM.PDP"), ("mail_file", str(path)),
                                           ("tempdir", str(path.parent))])
        assert reply.get("return_value") == return_value
        assert reply.get("setreply").split()[0] == code
        assert reply.get("exit_code") == str(exit_code)
        # the Sendmail mailer: delivered only on pass
        out = short_tmp / "delivered.eml"
        proc = daemon.client("-d", f"dd of={out} status=none", "-f", "a@example.test", "--",
                             "b@example.test", stdin=eicar_message())
        assert out.exists() == (destiny == "pass")
        assert proc.returncode == {"pass": 0, "discard": 0}.get(destiny, exit_code)


# -- release ----------------------------------------------------------------------------


@pytest.fixture
def quarantined(short_tmp, clamd_nodecomp):
    """A daemon whose release method is an SMTP sink, and one quarantined virus."""
    sink = SMTPSink()
    host, port = sink.start()
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            release_method=f"smtp:{host}:{port}").start()
    from tests.integration.test_daemon import ampdp, spool

    path = spool(daemon, eicar_message())
    reply = ampdp(daemon.socket_path, [
        ("request", "AM.PDP"), ("mail_file", str(path)), ("tempdir", str(path.parent)),
        ("sender", "<alice@example.test>"), ("recipient", "<bob@example.test>"),
        ("recipient", "<carol@example.test>")])
    assert reply.get("return_value") == "discard"
    qid = re.search(r"quarantine: (virus-\S{12})", daemon.log_text()).group(1)
    yield daemon, sink, qid
    daemon.stop()
    sink.stop()


def test_release_with_the_cli_delivers_with_the_original_envelope(quarantined):
    daemon, sink, qid = quarantined
    run = [sys.executable, "-m", "amavisd", "quarantine", "-c", str(daemon.config_path)]
    listing = subprocess.run(run + ["list"], capture_output=True, text=True, timeout=30)
    [line] = [x for x in listing.stdout.splitlines() if qid in x]
    assert "INFECTED  <alice@example.test> -> <bob@example.test>,<carol@example.test>" in line
    proc = subprocess.run(run + ["release", qid], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sink.wait(1)[0]
    assert got.mail_from == "alice@example.test"
    assert sorted(got.rcpt_tos) == ["bob@example.test", "carol@example.test"]
    # the stored bytes, under amavisd-new's Resent-* block and a Received: line
    assert got.data.startswith(b"Resent-From: ")
    assert got.data.replace(b"\r\n", b"\n").endswith(eicar_message())
    bad = subprocess.run(run + ["release", "../../etc/passwd"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 1 and "not a quarantine id" in bad.stdout + bad.stderr


def test_debians_amavisd_release_works_against_our_daemon(quarantined, short_tmp):
    """`amavisd-release ID SECRET [RCPT...]`, the secret from `quarantine show`
    (what it refuses: tests/integration/test_release_auth.py)."""
    if not os.path.exists(AMAVISD_RELEASE):
        pytest.skip("amavisd-release not installed (Debian package amavisd-new)")
    daemon, sink, qid = quarantined
    text = Path(AMAVISD_RELEASE).read_text()
    text, n = re.subn(r"^\s*\$socketname = '[^']*';", f"  $socketname = '{daemon.socket_path}';",
                      text, count=1, flags=re.M)
    assert n == 1, "amavisd-release's layout changed"
    script = short_tmp / "amavisd-release"
    script.write_text(text)
    shown = subprocess.run([sys.executable, "-m", "amavisd", "quarantine", "-c",
                            str(daemon.config_path), "show", "--headers-only", qid],
                           capture_output=True, text=True, timeout=30).stdout
    secret = re.search(r"^# secret_id: (\S+)$", shown, flags=re.M).group(1)
    proc = subprocess.run(["perl", "-T", str(script), qid, secret], capture_output=True,
                          text=True, timeout=60)
    assert "250 2.0.0" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    got = sink.wait(1)[0]
    assert got.mail_from == "alice@example.test"
    assert sorted(got.rcpt_tos) == ["bob@example.test", "carol@example.test"]
    # to one of the original recipients, as amavisd-release allows
    proc = subprocess.run(["perl", "-T", str(script), qid, secret, "carol@example.test"],
                          capture_output=True, text=True, timeout=60)
    assert "250 2.0.0" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert sink.wait(2)[1].rcpt_tos == ["carol@example.test"]
