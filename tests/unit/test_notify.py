"""Notifications sent to a real SMTP sink and read back with email.parser:
the admin alert, the DSN (multipart/report; report-type=delivery-status),
recipient notices; the backscatter rules; hostile values; templates; and a
dead transport that returns False and logs instead of raising."""

from __future__ import annotations

import logging
import smtplib
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from amavisd.actions.forward import SMTPForwarder
from amavisd.actions.notify import (
    Notifier,
    NotifySettings,
    Template,
    TemplateError,
    Templates,
)
from amavisd.decode.engine import decompose
from amavisd.envelope import Envelope
from amavisd.testing.eicar import EICAR
from amavisd.verdict import Category, Destiny, Finding, Result
from tests.rigs.smtpsink import SMTPSink


def original(subject: str = "quarterly report", extra: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.com, carol@other.org"
    msg["Subject"] = subject
    msg["Message-ID"] = "<orig-1@example.com>"
    for line in filter(None, extra.split("\n")):
        name, value = line.split(":", 1)
        msg[name] = value.strip()
    msg.set_content("see attached\n")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                       filename="eicar.com")
    return bytes(msg)


def infected(raw: bytes, destiny: Destiny = Destiny.DISCARD) -> Result:
    """A verdict on the real tree of `raw`: EICAR found in its attachment."""
    decomposition = decompose(raw)
    decomposition.cleanup()
    tree = decomposition.root
    where = next(p for p in tree.walk() if p.name == "eicar.com")
    return Result(log_id="31337-02", category=Category.INFECTED, destiny=destiny, tree=tree,
                  findings=[Finding(where.path, "Eicar-Test-Signature", "clamd")])


def banned(destiny: Destiny = Destiny.BOUNCE) -> Result:
    return Result(log_id="31337-03", category=Category.BANNED, destiny=destiny,
                  banned=["'invoice.pdf.exe' (p001/p002/p004) by rule [deny type = exe]"])


ENVELOPE = Envelope(sender="<alice@example.com>", queue_id="4QX1",
                    recipients=["<bob@example.com>", "carol@other.org"],
                    client_address="192.0.2.9")


def settings(**changes) -> NotifySettings:
    return NotifySettings(myhostname="mx.example.com", local_domains=["example.com"], **changes)


def notifier(sink: SMTPSink, **changes) -> Notifier:
    return Notifier(settings(**changes), SMTPForwarder(*sink.address, timeout=5))


def parse(data: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(data)


def test_admin_alert_says_what_where_and_the_quarantine_id(sink: SMTPSink):
    raw = original()
    result = infected(raw)
    sent = notifier(sink).notify(result, ENVELOPE, raw, quarantine_id="AbCdEfGh_-12")
    assert [(n.role, ok) for n, ok in sent] == [("admin", True)]
    [got] = sink.wait(1)
    assert got.mail_from == "" and got.rcpt_tos == ["virusalert@example.com"]
    msg = parse(got.data)
    assert msg["To"] == "virusalert@example.com"
    assert "Eicar-Test-Signature" in msg["Subject"] and "alice@example.com" in msg["Subject"]
    assert msg["Auto-Submitted"] == "auto-generated"
    text = msg.get_body(("plain",)).get_content()
    where = result.findings[0].part
    assert f"Eicar-Test-Signature in {where} ('eicar.com'), found by clamd" in text
    for fact in ("AbCdEfGh_-12", "31337-02", "4QX1", "<alice@example.com>",
                 "<bob@example.com>, <carol@other.org>", "192.0.2.9", "quarterly report"):
        assert fact in text
    [headers] = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert "Message-ID: <orig-1@example.com>" in headers.get_content()


def test_dsn_to_a_local_sender_of_banned_mail_is_a_valid_delivery_status_report(sink):
    raw = original()
    sent = notifier(sink).notify(banned(), ENVELOPE, raw)
    assert sorted(n.role for n, ok in sent if ok) == ["admin", "sender"]
    [dsn] = [m for m in sink.wait(2) if m.rcpt_tos == ["alice@example.com"]]
    assert dsn.mail_from == ""  # a DSN always has the null return path
    msg = parse(dsn.data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "invoice.pdf.exe" in parts[0].get_content()
    per_message, *per_recipient = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.com"
    assert per_message["Arrival-Date"]
    assert [b["Final-Recipient"] for b in per_recipient] == [
        "rfc822; bob@example.com", "rfc822; carol@other.org"]
    for block in per_recipient:
        assert (block["Action"], block["Status"]) == ("failed", "5.7.0")
        diagnostic = " ".join(block["Diagnostic-Code"].split())
        assert diagnostic.startswith("smtp; 554 5.7.0 Reject, id=31337-03 - BANNED:")
    assert "Subject: quarterly report" in parts[2].get_content()


@pytest.mark.parametrize("result, envelope, extra, changes, why", [
    (infected(original(), Destiny.BOUNCE), ENVELOPE, "", {}, "viruses: senders are forged"),
    (banned(), Envelope(sender="<eve@remote.org>", recipients=["bob@example.com"]), "", {},
     "remote sender"),
    (banned(), Envelope(sender="<>", recipients=["bob@example.com"]), "",
     {"sender_notify_remote": True}, "null sender"),
    (banned(Destiny.REJECT), ENVELOPE, "", {}, "the MTA tells the sender"),
    (banned(Destiny.DISCARD), ENVELOPE, "", {}, "discard is silent"),
    (banned(), ENVELOPE, "Precedence: bulk", {}, "bulk mail"),
    (banned(), ENVELOPE, "Auto-Submitted: auto-generated", {}, "auto-submitted"),
    (banned(), ENVELOPE, "List-Id: <list.example.com>", {}, "mailing list"),
    (banned(), ENVELOPE, "", {"sender_notify": []}, "turned off"),
])
def test_no_dsn_where_it_would_be_backscatter(result, envelope, extra, changes, why):
    notices = Notifier(settings(**changes), transport=None).build(
        result, envelope, original(extra=extra))
    assert [n.role for n in notices] == ["admin"], why


def test_dsn_when_asked_for_viruses_and_remote_senders():
    chosen = settings(sender_notify=["infected"], sender_notify_remote=True)
    remote = Envelope(sender="<eve@remote.org>", recipients=["bob@example.com"])
    notices = Notifier(chosen, None).build(infected(original(), Destiny.BOUNCE), remote,
                                           original())
    [dsn] = [n for n in notices if n.role == "sender"]
    assert dsn.recipients == ["eve@remote.org"]
    assert "Eicar-Test-Signature" in dsn.message.get_body(("plain",)).get_content()


def test_local_domains_match_exactly_or_with_subdomains_when_dotted():
    chosen = NotifySettings(myhostname="h", local_domains=["example.com", ".corp.example"])
    assert chosen.is_local("<a@example.com>") and chosen.is_local("a@EXAMPLE.COM")
    assert not chosen.is_local("a@sub.example.com") and not chosen.is_local("a@example.com.evil")
    assert chosen.is_local("a@corp.example") and chosen.is_local("a@mx.corp.example")
    assert not chosen.is_local("a@notcorp.example") and not chosen.is_local("<>")
    assert chosen.admin_address == "virusalert@example.com"
    assert NotifySettings(myhostname="mx.test").admin_address == "virusalert@mx.test"


def test_recipient_notices_go_to_each_local_recipient(sink: SMTPSink):
    raw = original()
    sent = notifier(sink, admin_notify=[], recipient_notify=["infected"]).notify(
        infected(raw), ENVELOPE, raw, quarantine_id="QQQQQQQQQQQQ")
    assert [(n.role, n.recipients, ok) for n, ok in sent] == [
        ("recipient", ["bob@example.com"], True)]
    [got] = sink.wait(1)
    body = parse(got.data).get_body(("plain",)).get_content()
    assert "(bob@example.com)" in body and "QQQQQQQQQQQQ" in body
    # Delivered mail needs no notice.
    assert notifier(sink, admin_notify=[], recipient_notify=["infected"]).build(
        infected(raw, Destiny.PASS), ENVELOPE, raw) == []


def test_hostile_values_are_text_never_headers_or_code(sink: SMTPSink):
    raw = original(subject="{admin} {__class__} =?utf-8?q?=0D=0ABcc:_evil@x.org?=")
    hostile = Envelope(sender="<alice@example.com>\r\nBcc: evil@x.org",
                       recipients=["bob@example.com"])
    result = banned()
    result.banned = ["'a\r\nBcc: evil@x.org {sender.__class__}.exe' (p001/p002) by rule [x]"]
    sent = notifier(sink).notify(result, hostile, raw)
    assert sent and all(ok for _, ok in sent)
    for got in sink.wait(len(sent)):
        msg = parse(got.data)
        assert msg["Bcc"] is None and "evil@x.org" not in got.rcpt_tos
        text = msg.get_body(("plain",)).get_content()
        if "Subject:" in text:
            assert "{admin} {__class__}" in text  # the original subject, as text
        assert "{sender.__class__}.exe" in text


def test_a_dead_transport_returns_false_and_logs(caplog):
    raw = original()
    dead = Notifier(settings(), SMTPForwarder("127.0.0.1", 9, timeout=2))
    with caplog.at_level(logging.WARNING, logger="amavisd.notify"):
        sent = dead.notify(banned(), ENVELOPE, raw)
    assert [(n.role, ok) for n, ok in sent] == [("admin", False), ("sender", False)]
    assert "admin notification to virusalert@example.com failed" in caplog.text
    assert "31337-03" in caplog.text


def test_a_broken_template_is_logged_not_raised(tmp_path: Path, caplog):
    (tmp_path / "banned-admin.txt").write_text("Subject: x\n\n{nope}\n")
    broken = Notifier(settings(), None, Templates([str(tmp_path)]))
    with caplog.at_level(logging.WARNING, logger="amavisd.notify"):
        assert broken.notify(banned(), ENVELOPE, original()) == []
    assert "unknown placeholder {nope}" in caplog.text


@pytest.mark.parametrize("text, fault", [
    ("hello {nope}", "unknown placeholder {nope}"),
    ("hello {sender.__class__}", "unknown placeholder {sender.__class__}"),
    ("hello {sender[0]}", "unknown placeholder {sender[0]}"),
    ("hello {sender!r}", "takes no conversion or format spec"),
    ("hello {sender:>{admin}}", "takes no conversion or format spec"),
    ("hello {sender", "expected '}'"),
    ("Subject: a\nTo: x@y\n\nbody", "only a Subject: line"),
])
def test_bad_templates_are_refused_in_one_line(text: str, fault: str):
    with pytest.raises(TemplateError) as caught:
        Template.parse("t.txt", text)
    assert fault in str(caught.value) and "\n" not in str(caught.value)


def test_a_site_template_overrides_one_file_and_the_rest_is_shipped(tmp_path: Path):
    (tmp_path / "banned-sender.txt").write_text("Subject: Blocked {verdict}\n\nSorry.\n")
    templates = Templates([str(tmp_path)])
    templates.check_all()  # every shipped template loads and uses known placeholders
    notices = Notifier(settings(), None, templates).build(banned(), ENVELOPE, original())
    dsn = next(n for n in notices if n.role == "sender").message
    assert dsn["Subject"] == "Blocked BANNED"
    assert dsn.get_body(("plain",)).get_content().strip() == "Sorry."
    admin = next(n for n in notices if n.role == "admin").message
    assert admin["Subject"].startswith("BANNED contents in mail from")


def test_settings_from_a_config_mapping():
    config = {"myhostname": "mx.test", "local_domains": ["test"], "admin": "sec@test",
              "sender_notify": [], "unrelated": 1}
    chosen = NotifySettings.from_config(config)
    assert (chosen.myhostname, chosen.admin_address, chosen.sender_notify) == (
        "mx.test", "sec@test", [])
    assert chosen.admin_notify == ["infected", "banned"]


def test_unchecked_mail_uses_the_generic_templates():
    unchecked = Result(log_id="31337-04", category=Category.UNCHECKED, destiny=Destiny.BOUNCE,
                       unchecked=["encrypted zip member secret.doc (p001/p002/p004)"])
    chosen = settings(admin_notify=["unchecked"], sender_notify=["unchecked"])
    notices = {n.role: n.message for n in Notifier(chosen, None).build(
        unchecked, ENVELOPE, original())}
    assert set(notices) == {"admin", "sender"}
    assert notices["admin"]["Subject"] == "UNCHECKED mail from <alice@example.com>"
    assert "encrypted zip member secret.doc" in notices["admin"].get_body(("plain",)).get_content()
    assert notices["sender"]["Subject"] == "Undeliverable mail: UNCHECKED"


def test_the_sink_speaks_enough_smtp(sink: SMTPSink):
    """The test part itself: HELO, NOOP, RSET, sequence errors, dot-unstuffing."""
    with smtplib.SMTP(*sink.address, timeout=5) as client:
        assert client.helo("client.test")[0] == 250
        assert client.noop()[0] == 250
        assert client.rcpt("x@y")[0] == 503  # no MAIL yet
        assert client.mail("a@b")[0] == 250
        assert client.mail("a@b")[0] == 503  # nested MAIL
        assert client.rset()[0] == 250
        assert client.docmd("DATA")[0] == 503  # no recipients after RSET
        assert client.docmd("VRFY", "x")[0] == 500
        client.sendmail("a@b", ["c@d"], b"X: 1\r\n\r\n.\r\n..two\r\nend\r\n")
    [got] = sink.wait(1)
    assert (got.helo, got.data) == ("client.test", b"X: 1\r\n\r\n.\r\n..two\r\nend\r\n")


def test_templates_read_before_the_drop_are_used_when_the_files_are_gone(tmp_path):
    """The master reads the templates as root; a worker must not need to."""
    from amavisd.actions import notify as notify_module

    site = tmp_path / "templates"
    site.mkdir()
    (site / "admin.txt").write_text("Subject: site admin template\n\nfound\n")
    try:
        assert notify_module.load_templates(str(site)) >= 1
        (site / "admin.txt").unlink()
        site.chmod(0)
        template = notify_module.Templates([str(site)]).get("admin.txt")
        assert template.subject == "site admin template"
    finally:
        site.chmod(0o755)
        notify_module.load_templates("")


def test_a_policy_banks_templates_are_read_before_the_drop_too(tmp_path):
    """A bank's own template_dir is read with the base one (as root, before
    the fork), so a worker serving that bank never needs the files."""
    from amavisd.actions import notify as notify_module
    from amavisd.config import load

    base, bank = tmp_path / "base", tmp_path / "bank"
    for directory, subject in ((base, "base admin"), (bank, "bank admin")):
        directory.mkdir()
        (directory / "admin.txt").write_text(f"Subject: {subject}\n\nfound\n")
    source = tmp_path / "a.toml"
    source.write_text(f'[notify]\ntemplate_dir = "{base}"\n\n'
                      f'[policy_banks.OUT]\ntemplate_dir = "{bank}"\n')
    try:
        notify_module.load_templates(*notify_module.template_dirs(load(str(source))))
        for directory in (base, bank):
            (directory / "admin.txt").unlink()
            directory.chmod(0)
        assert notify_module.Templates([str(bank)]).get("admin.txt").subject == "bank admin"
        assert notify_module.Templates([str(base)]).get("admin.txt").subject == "base admin"
    finally:
        base.chmod(0o755)
        bank.chmod(0o755)
        notify_module.load_templates("")
