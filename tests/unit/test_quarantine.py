"""The quarantine store: modes under a permissive umask, gzip on and off,
list/show, ids that are not ours, and a release through a real SMTP sink
(and through a real sendmail-style program)."""

from __future__ import annotations

import gzip
import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from amavisd.actions.forward import ForwardError, PipeForwarder, SMTPForwarder, forwarder
from amavisd.envelope import Envelope
from amavisd.quarantine.entry import ID_PATTERN, QuarantineError, UnknownEntry
from amavisd.quarantine.file import FileStore
from amavisd.quarantine.release import resend
from amavisd.verdict import Category, Destiny, Finding, Result
from tests.rigs.smtpsink import SMTPSink

RAW = (b"Return-Path: <alice@example.com>\r\nFrom: Alice <alice@example.com>\r\n"
       b"To: bob@example.org\r\nSubject: invoice\r\nMessage-ID: <q1@example.com>\r\n\r\n"
       b"Please see the attachment.\r\n.a line that starts with a dot\r\n\r\nbye\r\n")


def envelope() -> Envelope:
    return Envelope(sender="<alice@example.com>", queue_id="4ABCD12345",
                    recipients=["<bob@example.org>", "carol@example.org"],
                    client_address="192.0.2.7")


def infected() -> Result:
    return Result(log_id="12345-07", category=Category.INFECTED, destiny=Destiny.DISCARD,
                  findings=[Finding("p001/p003", "Eicar-Test-Signature", "clamd")])


@pytest.fixture
def open_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_directory_0700_and_files_0600_even_with_umask_0(tmp_path: Path, open_umask):
    qdir = tmp_path / "virusmails"
    qid = FileStore(str(qdir)).store(RAW, envelope(), infected())
    assert mode(qdir) == 0o700
    files = sorted(p.name for p in qdir.iterdir())
    assert files == [f"virus-{qid}", f"virus-{qid}.json"]
    assert all(mode(qdir / name) == 0o600 for name in files)
    assert ID_PATTERN.fullmatch(qid) and len(qid) == 12


def test_a_permissive_existing_directory_is_fixed(tmp_path: Path, open_umask):
    qdir = tmp_path / "q"
    qdir.mkdir(0o777)
    assert mode(qdir) == 0o777
    FileStore(str(qdir)).prepare()
    assert mode(qdir) == 0o700


def test_a_symlink_in_place_of_the_directory_is_refused(tmp_path: Path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(QuarantineError, match="not a directory"):
        FileStore(str(tmp_path / "q")).store(RAW, envelope(), infected())
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_with_and_without_gzip(tmp_path: Path, compress: bool):
    store = FileStore(str(tmp_path), gzip=compress)
    qid = store.store(RAW, envelope(), infected())
    entry = store.get(qid)
    data = store.message(entry)
    assert data == RAW
    stored = (tmp_path / entry.file).read_bytes()
    if compress:
        assert entry.file == f"virus-{qid}.gz" and gzip.decompress(stored) == RAW
        assert stored != RAW
    else:
        assert entry.file == f"virus-{qid}" and stored == RAW
    assert (entry.sender, entry.recipients, entry.queue_id) == (
        "<alice@example.com>", ["<bob@example.org>", "carol@example.org"], "4ABCD12345")
    assert (entry.category, entry.viruses, entry.log_id) == (
        "INFECTED", ["Eicar-Test-Signature"], "12345-07")
    assert entry.size == len(RAW) and entry.date.endswith("+00:00")


def test_store_from_a_path_and_the_sidecar_is_json(tmp_path: Path):
    mail = tmp_path / "email.txt"
    mail.write_bytes(RAW)
    store = FileStore(str(tmp_path / "q"))
    result = Result(log_id="9-1", category=Category.BANNED, destiny=Destiny.REJECT,
                    banned=["'a.exe' (p001/p002) by rule [deny type = exe]"],
                    unchecked=["encrypted zip member b.doc"])
    qid = store.store(str(mail), envelope(), result)
    side = json.loads((tmp_path / "q" / f"banned-{qid}.json").read_bytes())
    assert side["banned"] == result.banned and side["unchecked"] == result.unchecked
    assert side["kind"] == "banned" and side["id"] == qid
    assert store.message(store.get(qid)) == RAW


def test_list_load_by_id_or_file_name_and_remove(tmp_path: Path):
    store = FileStore(str(tmp_path))
    first = store.store(RAW, envelope(), infected())
    banned = Result(log_id="12345-08", category=Category.BANNED, destiny=Destiny.DISCARD,
                    banned=["x.exe"])
    second = store.store(RAW + b"more\r\n", envelope(), banned)
    (tmp_path / "virus-incomplete00.json").write_bytes(b"{not json")  # damaged: skipped
    listed = store.list()
    assert sorted(e.id for e in listed) == sorted([first, second])
    assert store.get(f"banned-{second}").log_id == "12345-08"
    assert store.get(f"virus-{first}").id == first
    store.remove(first)
    assert [e.id for e in store.list()] == [second]
    with pytest.raises(UnknownEntry):
        store.get(first)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "virus-../../../x", "..%2f..%2fabc",
                                 "abc/defghijkl", "virus-AAAAAAAAAAAA/../x", "",
                                 "/etc/shadow", "AAAAAAAAAAA", "AAAAAAAAAAAAA", "a b c d e f "])
def test_ids_that_are_not_ours_are_refused(tmp_path: Path, bad: str):
    store = FileStore(str(tmp_path / "q"))
    store.store(RAW, envelope(), infected())
    with pytest.raises(UnknownEntry, match="not a quarantine id"):
        store.get(bad)
    with pytest.raises(UnknownEntry):
        resend(store, bad, forward=SMTPForwarder("127.0.0.1", 9))


def test_tampered_message_is_not_released(tmp_path: Path):
    store = FileStore(str(tmp_path))
    qid = store.store(RAW, envelope(), infected())
    (tmp_path / f"virus-{qid}").write_bytes(RAW.replace(b"invoice", b"INVOICE"))
    with pytest.raises(QuarantineError, match="does not match its digest"):
        store.message(store.get(qid))


def test_release_resends_the_original_envelope_and_bytes(tmp_path: Path, sink: SMTPSink):
    store = FileStore(str(tmp_path), gzip=True)
    qid = store.store(RAW, envelope(), infected())
    host, port = sink.address
    assert resend(store, qid, forward=forwarder(f"smtp:[{host}]:{port}")).refused == {}
    [got] = sink.wait(1)
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org", "carol@example.org"]
    assert got.data == RAW  # byte for byte, the dot-stuffed line included


def test_release_to_other_recipients_and_from_the_null_sender(tmp_path: Path, sink: SMTPSink):
    store = FileStore(str(tmp_path))
    qid = store.store(RAW, Envelope(sender="<>", recipients=["bob@example.org"]), infected())
    resend(store, qid, recipients=["admin@example.org"], forward=SMTPForwarder(*sink.address))
    [got] = sink.wait(1)
    assert (got.mail_from, got.rcpt_tos, got.data) == ("", ["admin@example.org"], RAW)


def test_release_reports_refused_recipients_and_fails_when_all_are(tmp_path: Path):
    with SMTPSink(refuse=["carol@example.org"]) as partial:
        store = FileStore(str(tmp_path))
        qid = store.store(RAW, envelope(), infected())
        refused = resend(store, qid, forward=SMTPForwarder(*partial.address)).refused
        assert list(refused) == ["carol@example.org"] and refused["carol@example.org"][:3] == "550"
        assert partial.wait(1)[0].rcpt_tos == ["bob@example.org"]
        with pytest.raises(ForwardError, match="all recipients refused"):
            resend(store, qid, recipients=["carol@example.org"],
                          forward=SMTPForwarder(*partial.address))


def test_release_to_an_unreachable_port_is_one_error(tmp_path: Path):
    store = FileStore(str(tmp_path))
    qid = store.store(RAW, envelope(), infected())
    with pytest.raises(ForwardError, match="smtp:.*cannot connect"):
        resend(store, qid, forward=SMTPForwarder("127.0.0.1", 9, timeout=2))


def test_release_through_a_sendmail_style_program(tmp_path: Path):
    """The pipe method: argv (no shell), -f sender, -- before the recipients."""
    program = tmp_path / "sendmail"
    program.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.args"\ncat > "$0.body"\n')
    program.chmod(0o755)
    store = FileStore(str(tmp_path / "q"))
    hostile = Envelope(sender="<-oQ/tmp/x@example.com>", recipients=["bob@example.org"])
    qid = store.store(RAW, hostile, infected())
    resend(store, qid, forward=PipeForwarder((str(program),)))
    args = (tmp_path / "sendmail.args").read_text().splitlines()
    assert args == ["-i", "-f", "-oQ/tmp/x@example.com", "--", "bob@example.org"]
    assert (tmp_path / "sendmail.body").read_bytes() == RAW


def test_a_message_without_verdict_is_not_stored(tmp_path: Path):
    with pytest.raises(QuarantineError, match="no verdict"):
        FileStore(str(tmp_path)).store(RAW, envelope(), Result(log_id="x"))
    assert list(tmp_path.iterdir()) == []


def test_a_release_request_cannot_forge_log_lines(tmp_path: Path, sink: SMTPSink, caplog):
    from amavisd import config as configuration
    from amavisd.quarantine.release import release

    host, port = sink.address
    config = configuration.load(None, {"quarantine_dir": str(tmp_path),
                                       "release_method": f"smtp:[{host}]:{port}"})
    qid = FileStore(str(tmp_path)).store(RAW, envelope(), infected())
    caplog.set_level("INFO", logger="amavisd.release")
    outcome = release(config, qid, ["<admin@example.org>\r\namavisd[1]: Passed CLEAN"],
                      local=True)
    # The line breaks became "?", and what is left closes the angle brackets:
    # refused for good (553 5.1.3 from our SMTP client), nothing sent.
    assert not outcome.ok and not outcome.temporary, outcome
    assert not sink.wait(0, timeout=0.5)
    lines = [r.getMessage() for r in caplog.records if "release of" in r.getMessage()]
    assert lines and all("\n" not in line and "\r" not in line for line in lines)
    assert any("??amavisd[1]" in line for line in lines)


# -- release authorisation (secret_id, release_to_others) ---------------------------------


@pytest.fixture
def releasing(tmp_path: Path, sink: SMTPSink):
    """A quarantine with one entry, and `release` bound to a config that sends to the sink."""
    from amavisd import config as configuration
    from amavisd.quarantine import release as release_module

    host, port = sink.address

    def config(**values):
        return configuration.load(None, {"quarantine_dir": str(tmp_path / "q"),
                                         "release_method": f"smtp:[{host}]:{port}"} | values)

    store = FileStore(str(tmp_path / "q"))
    qid = store.store(RAW, envelope(), infected())
    return store, qid, config, release_module


def test_each_entry_has_its_own_secret_in_the_0600_sidecar(tmp_path: Path, open_umask):
    store = FileStore(str(tmp_path))
    first = store.get(store.store(RAW, envelope(), infected()))
    second = store.get(store.store(RAW, envelope(), infected()))
    assert first.secret_id != second.secret_id
    for entry in (first, second):
        assert len(entry.secret_id) == 16 and entry.secret_id[0].isalnum()
        assert set(entry.secret_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                           "0123456789-_")
        sidecar = tmp_path / f"virus-{entry.id}.json"
        assert json.loads(sidecar.read_bytes())["secret_id"] == entry.secret_id
        assert mode(sidecar) == 0o600
        assert entry.secret_id not in (tmp_path / entry.file).read_bytes().decode()


def test_a_remote_release_needs_the_right_secret(releasing, sink: SMTPSink, caplog):
    store, qid, config, rel = releasing
    secret = store.get(qid).secret_id
    caplog.set_level("INFO", logger="amavisd.release")
    missing = rel.release(config(), qid, [], "r-1")
    wrong = rel.release(config(), qid, [], "r-2",
                        secret=secret[:-1] + ("y" if secret.endswith("x") else "x"))
    as_request = rel.release(config(), rel.ReleaseRequest(f"virus-{qid}", "nope"), [], "r-3")
    for outcome in (missing, wrong, as_request):  # amavisd-new's: 450 4.5.0 Failure, exit 75
        assert (outcome.ok, outcome.smtp, outcome.enhanced, outcome.temporary) == (
            False, "450", "4.5.0", True)
        assert outcome.text == "Failure: " + rel.REFUSED_TEXT
    assert sink.wait(0, timeout=0.3) == []
    logged = " | ".join(r.getMessage() for r in caplog.records)
    assert "(r-1) release of" in logged and "no secret_id in the request" in logged
    assert "(r-2) release of" in logged and "wrong secret_id" in logged
    assert secret not in logged  # the secret is never logged
    ok = rel.release(config(), rel.ReleaseRequest(f"virus-{qid}", secret), [], "r-4")
    assert ok.ok, ok
    assert sink.wait(1)[0].rcpt_tos == ["bob@example.org", "carol@example.org"]


def test_unknown_ids_and_bad_secrets_look_the_same(releasing):
    """No oracle: same reply, and no quicker, whether the id exists or not."""
    store, qid, config, rel = releasing
    other = "AAAAAAAAAAAA"  # unknown (one chance in 2^72 to be qid)
    replies = set()
    for name in (qid, other, f"virus-{other}", "../../etc/passwd"):
        started = time.monotonic()
        outcome = rel.release(config(), name, [], "r", secret="x" * 16)
        elapsed = time.monotonic() - started
        assert not outcome.ok and elapsed >= rel.REFUSAL_FLOOR, (name, elapsed)
        replies.add((outcome.smtp, outcome.enhanced, outcome.text))
    assert len(replies) == 1, replies


def test_entries_without_a_secret_are_released_locally_only(releasing, tmp_path, sink):
    store, qid, config, rel = releasing
    sidecar = tmp_path / "q" / f"virus-{qid}.json"
    data = json.loads(sidecar.read_bytes())
    del data["secret_id"]  # as written before release authorisation
    sidecar.write_bytes(json.dumps(data).encode())
    assert store.get(qid).secret_id == ""
    for secret in (None, "", "x"):
        assert not rel.release(config(), qid, [], "r", secret=secret).ok
    assert rel.release(config(), qid, [], "cli", local=True).ok
    assert len(sink.wait(1)) == 1


def test_auth_required_release_off(releasing, sink):
    """As amavisd-new: no secret needed, but one that is sent is still checked."""
    store, qid, config, rel = releasing
    lax = config(auth_required_release=False)
    assert not rel.release(lax, qid, [], "r", secret="wrong").ok
    assert not rel.release(lax, "AAAAAAAAAAAA", [], "r").ok  # unknown (2^-72 it is qid)
    assert rel.release(lax, qid, [], "r").ok
    assert rel.release(lax, qid, [], "r", secret=store.get(qid).secret_id).ok
    assert len(sink.wait(2)) == 2


def test_other_recipients_take_release_to_others(releasing, sink):
    store, qid, config, rel = releasing
    secret = store.get(qid).secret_id
    outsider = rel.release(config(), qid, ["bob@example.org", "<mallory@evil.test>"], "r",
                           secret=secret)
    assert (outsider.ok, outsider.smtp, outsider.enhanced) == (False, "450", "4.5.0")
    assert "release_to_others" in outsider.text and "mallory@evil.test" in outsider.text
    # a subset of the original recipients is no privilege (the domain's case does not count)
    subset = rel.release(config(), qid, ["<carol@EXAMPLE.org>"], "r", secret=secret)
    assert subset.ok, subset
    assert sink.wait(1)[0].rcpt_tos == ["carol@EXAMPLE.org"]
    # local parts may be case-sensitive: Bob is someone else
    assert not rel.release(config(), qid, ["Bob@example.org"], "r", secret=secret).ok
    allowed = rel.release(config(release_to_others=True), qid, ["mallory@evil.test"], "r",
                          secret=secret)
    assert allowed.ok, allowed
    assert rel.release(config(), qid, ["admin@example.org"], "cli", local=True).ok
    assert [m.rcpt_tos for m in sink.wait(3)[1:]] == [["mallory@evil.test"],
                                                      ["admin@example.org"]]


def test_a_damaged_entry_is_refused_remotely_like_an_unknown_one(releasing, tmp_path):
    store, qid, config, rel = releasing
    (tmp_path / "q" / f"virus-{qid}.json").write_bytes(b"{damaged")
    remote = rel.release(config(), qid, [], "r", secret="x" * 16)
    unknown = rel.release(config(), "AAAAAAAAAAAA", [], "r", secret="x" * 16)
    assert (remote.smtp, remote.text) == (unknown.smtp, unknown.text) == (
        "450", "Failure: " + rel.REFUSED_TEXT)
    local = rel.release(config(), qid, [], "cli", local=True)  # the admin is told why
    assert local.temporary and "damaged sidecar" in local.text


# -- the trace on released mail (amavisd-new's Resent-* block and Received:) ----------


def test_the_resent_block_is_amavisd_news_and_names_who_asked(releasing, sink):
    store, qid, config, rel = releasing
    ok = rel.release(config(myhostname="mx.example.org"),
                     rel.ReleaseRequest(qid, store.get(qid).secret_id, "boss@example.org"),
                     ["carol@example.org"], "r-9")
    assert ok.ok, ok
    [got] = sink.wait(1)
    head, _, rest = got.data.partition(b"\r\nFrom: Alice")
    fields = [f.split(b":")[0] for f in head.replace(b"\r\n ", b" ").split(b"\r\n")]
    assert fields == [b"Resent-From", b"Resent-Sender", b"Resent-To", b"Resent-Date",
                      b"Resent-Message-ID", b"Received", b"Return-Path"]  # then the stored mail
    unfolded = head.replace(b"\r\n ", b" ").decode()
    assert "Resent-From: <boss@example.org>\r\n" in unfolded
    assert 'Resent-Sender: "Content-filter at mx.example.org" <postmaster@mx.example.org>' \
        in unfolded
    assert "Resent-To: <carol@example.org>\r\n" in unfolded
    assert re.search(rf"Resent-Message-ID: <{qid}-[A-Za-z0-9_-]{{12}}@mx.example.org>", unfolded)
    assert re.search(r"Received: from unknown by localhost \(amavisd, unix socket\) id "
                     r"[A-Za-z0-9_-]{12} for <carol@example.org>; \w\w\w, ", unfolded)
    assert b"Return-Path: <alice@example.com>" + b"\r\nFrom: Alice" + rest == RAW


def test_client_values_cannot_add_header_fields_to_the_trace():
    from amavisd.quarantine import resent

    hostile = "<carol@example.org>\r\nBcc: everyone@example.net"
    fields = [*resent.resent("AAAAAAAAAAAA", "BBBBBBBBBBBB", [hostile], myhostname="h\r\nX: y",
                             from_header="f", requested_by="a@b\nSubject: spam"),
              resent.received("BBBBBBBBBBBB", [hostile], client="1.2.3.4\r\nX-Evil: 1")]
    out = resent.prepend(b"Subject: s\n\nbody\n", fields).decode()
    names = [line.split(":")[0] for line in out.split("\n\n")[0].split("\n")
             if line[:1] not in (" ", "\t")]
    assert names == ["Resent-From", "Resent-Sender", "Resent-To", "Resent-Date",
                     "Resent-Message-ID", "Received", "Subject"]
    assert all(len(line) <= 78 for line in out.split("\n") if "@" not in line)
