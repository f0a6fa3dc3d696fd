"""The quarantine store: modes under a permissive umask, gzip on and off,
list/show, ids that are not ours, and a release through a real SMTP sink
(and through a real sendmail-style program)."""

from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path

import pytest

from amavisd.actions.forward import PipeForwarder, SMTPForwarder, forwarder
from amavisd.actions.quarantine import (
    ID_PATTERN,
    Quarantine,
    QuarantineError,
    UnknownEntry,
)
from amavisd.envelope import Envelope
from amavisd.testing.smtpsink import SMTPSink
from amavisd.verdict import Category, Destiny, Finding, Result

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
    qid = Quarantine(str(qdir)).store(RAW, envelope(), infected())
    assert mode(qdir) == 0o700
    files = sorted(p.name for p in qdir.iterdir())
    assert files == [f"virus-{qid}", f"virus-{qid}.json"]
    assert all(mode(qdir / name) == 0o600 for name in files)
    assert ID_PATTERN.fullmatch(qid) and len(qid) == 12


def test_a_permissive_existing_directory_is_fixed(tmp_path: Path, open_umask):
    qdir = tmp_path / "q"
    qdir.mkdir(0o777)
    assert mode(qdir) == 0o777
    Quarantine(str(qdir)).prepare()
    assert mode(qdir) == 0o700


def test_a_symlink_in_place_of_the_directory_is_refused(tmp_path: Path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(QuarantineError, match="not a directory"):
        Quarantine(str(tmp_path / "q")).store(RAW, envelope(), infected())
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_with_and_without_gzip(tmp_path: Path, compress: bool):
    store = Quarantine(str(tmp_path), gzip=compress)
    qid = store.store(RAW, envelope(), infected())
    entry, data = store.show(qid)
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
    store = Quarantine(str(tmp_path / "q"))
    result = Result(log_id="9-1", category=Category.BANNED, destiny=Destiny.REJECT,
                    banned=["'a.exe' (p001/p002) by rule [deny type = exe]"],
                    unchecked=["encrypted zip member b.doc"])
    qid = store.store(str(mail), envelope(), result)
    side = json.loads((tmp_path / "q" / f"banned-{qid}.json").read_bytes())
    assert side["banned"] == result.banned and side["unchecked"] == result.unchecked
    assert side["kind"] == "banned" and side["id"] == qid
    assert store.show(qid)[1] == RAW


def test_list_load_by_id_or_file_name_and_remove(tmp_path: Path):
    store = Quarantine(str(tmp_path))
    first = store.store(RAW, envelope(), infected())
    banned = Result(log_id="12345-08", category=Category.BANNED, destiny=Destiny.DISCARD,
                    banned=["x.exe"])
    second = store.store(RAW + b"more\r\n", envelope(), banned)
    (tmp_path / "virus-incomplete00.json").write_bytes(b"{not json")  # damaged: skipped
    listed = store.list()
    assert sorted(e.id for e in listed) == sorted([first, second])
    assert store.load(f"banned-{second}").log_id == "12345-08"
    assert store.load(f"virus-{first}").id == first
    store.remove(first)
    assert [e.id for e in store.list()] == [second]
    with pytest.raises(UnknownEntry):
        store.load(first)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "virus-../../../x", "..%2f..%2fabc",
                                 "abc/defghijkl", "virus-AAAAAAAAAAAA/../x", "",
                                 "/etc/shadow", "AAAAAAAAAAA", "AAAAAAAAAAAAA", "a b c d e f "])
def test_ids_that_are_not_ours_are_refused(tmp_path: Path, bad: str):
    store = Quarantine(str(tmp_path / "q"))
    store.store(RAW, envelope(), infected())
    with pytest.raises(UnknownEntry, match="not a quarantine id"):
        store.load(bad)
    with pytest.raises(UnknownEntry):
        store.release(bad, forward=SMTPForwarder("127.0.0.1", 9))


def test_tampered_message_is_not_released(tmp_path: Path):
    store = Quarantine(str(tmp_path))
    qid = store.store(RAW, envelope(), infected())
    (tmp_path / f"virus-{qid}").write_bytes(RAW.replace(b"invoice", b"INVOICE"))
    with pytest.raises(QuarantineError, match="does not match its digest"):
        store.show(qid)


def test_release_resends_the_original_envelope_and_bytes(tmp_path: Path, sink: SMTPSink):
    store = Quarantine(str(tmp_path), gzip=True)
    qid = store.store(RAW, envelope(), infected())
    host, port = sink.address
    assert store.release(qid, forward=forwarder(f"smtp:[{host}]:{port}")) == {}
    [got] = sink.wait(1)
    assert got.mail_from == "alice@example.com"
    assert got.rcpt_tos == ["bob@example.org", "carol@example.org"]
    assert got.data == RAW  # byte for byte, the dot-stuffed line included


def test_release_to_other_recipients_and_from_the_null_sender(tmp_path: Path, sink: SMTPSink):
    store = Quarantine(str(tmp_path))
    qid = store.store(RAW, Envelope(sender="<>", recipients=["bob@example.org"]), infected())
    store.release(qid, recipients=["admin@example.org"], forward=SMTPForwarder(*sink.address))
    [got] = sink.wait(1)
    assert (got.mail_from, got.rcpt_tos, got.data) == ("", ["admin@example.org"], RAW)


def test_release_reports_refused_recipients_and_fails_when_all_are(tmp_path: Path):
    with SMTPSink(refuse=["carol@example.org"]) as partial:
        store = Quarantine(str(tmp_path))
        qid = store.store(RAW, envelope(), infected())
        refused = store.release(qid, forward=SMTPForwarder(*partial.address))
        assert list(refused) == ["carol@example.org"] and refused["carol@example.org"][:3] == "550"
        assert partial.wait(1)[0].rcpt_tos == ["bob@example.org"]
        with pytest.raises(QuarantineError, match="all recipients refused"):
            store.release(qid, recipients=["carol@example.org"],
                          forward=SMTPForwarder(*partial.address))


def test_release_to_an_unreachable_port_is_one_error(tmp_path: Path):
    store = Quarantine(str(tmp_path))
    qid = store.store(RAW, envelope(), infected())
    with pytest.raises(QuarantineError, match=f"release of {qid} failed: smtp:"):
        store.release(qid, forward=SMTPForwarder("127.0.0.1", 9, timeout=2))


def test_release_through_a_sendmail_style_program(tmp_path: Path):
    """The pipe method: argv (no shell), -f sender, -- before the recipients."""
    program = tmp_path / "sendmail"
    program.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$0.args"\ncat > "$0.body"\n')
    program.chmod(0o755)
    store = Quarantine(str(tmp_path / "q"))
    hostile = Envelope(sender="<-oQ/tmp/x@example.com>", recipients=["bob@example.org"])
    qid = store.store(RAW, hostile, infected())
    store.release(qid, forward=PipeForwarder((str(program),)))
    args = (tmp_path / "sendmail.args").read_text().splitlines()
    assert args == ["-i", "-f", "-oQ/tmp/x@example.com", "--", "bob@example.org"]
    assert (tmp_path / "sendmail.body").read_bytes() == RAW


def test_a_message_without_verdict_is_not_stored(tmp_path: Path):
    with pytest.raises(QuarantineError, match="no verdict"):
        Quarantine(str(tmp_path)).store(RAW, envelope(), Result(log_id="x"))
    assert list(tmp_path.iterdir()) == []


def test_a_release_request_cannot_forge_log_lines(tmp_path: Path, sink: SMTPSink, caplog):
    from amavisd import config as configuration
    from amavisd.actions.release import release

    host, port = sink.address
    config = configuration.load(None, {"quarantine_dir": str(tmp_path),
                                       "release_method": f"smtp:[{host}]:{port}"})
    qid = Quarantine(str(tmp_path)).store(RAW, envelope(), infected())
    caplog.set_level("INFO", logger="amavisd.release")
    outcome = release(config, qid, ["<admin@example.org>\r\namavisd[1]: Passed CLEAN"])
    assert outcome.ok, outcome
    assert len(sink.wait(1)) == 1
    [line] = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert "\n" not in line and "\r" not in line and "??amavisd[1]" in line
