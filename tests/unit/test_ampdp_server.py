"""AM.PDP server side: path confinement, request parsing, replies, one session."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from amavisd.protocol.ampdp import (
    RequestError,
    Session,
    confine,
    encode_reply,
    parse_message_request,
)
from amavisd.verdict import Category, Destiny, HeaderEdit, Result
from amavisd_client.ampdp import Decoder, encode_block


@pytest.fixture
def tempbase(tmp_path):
    base = tmp_path / "tmp"
    (base / "job").mkdir(parents=True)
    (base / "job" / "email.txt").write_bytes(b"Subject: x\n\nhi\n")
    return base


def block(*attrs):
    (b,) = Decoder().feed(encode_block(attrs))
    return b


def test_confine_accepts_inside_and_refuses_everything_else(tempbase, tmp_path):
    assert confine(str(tempbase / "job"), str(tempbase), "tempdir") == str(tempbase / "job")
    outside = tmp_path / "secret"
    outside.write_text("x")
    (tempbase / "job" / "link").symlink_to(outside)
    for path in (str(outside), "/etc/shadow", str(tempbase), str(tempbase / ".." / "secret"),
                 str(tempbase / "job" / "link"), "relative/path", ""):
        with pytest.raises(RequestError):
            confine(path, str(tempbase), "mail_file")


def test_request_defaults_follow_the_protocol(tempbase):
    req = parse_message_request(block(("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                                      ("sender", "<a@x>"), ("recipient", "<b@x>"),
                                      ("recipient", "<c@x>"), ("queue_id", "Q1")),
                                str(tempbase), "1-01")
    assert req.job.mail_path == str(tempbase / "job" / "email.txt")
    assert req.remove_tempdir  # tempdir_removed_by defaults to server
    assert req.job.envelope.recipients == ["<b@x>", "<c@x>"]
    assert req.job.envelope.queue_id == "Q1"


def test_mail_file_outside_tempbase_is_refused(tempbase):
    with pytest.raises(RequestError, match="outside the temp base"):
        parse_message_request(block(("request", "AM.PDP"), ("mail_file", "/etc/passwd")),
                              str(tempbase), "1-01")


def test_reply_carries_destiny_and_header_edits_in_version_2_order():
    wire = encode_reply("9-01", Destiny.PASS, "CLEAN", [
        HeaderEdit("add", "X-Add", "a"), HeaderEdit("insert", "X-Virus-Scanned", "by us", 0),
        HeaderEdit("delete", "X-Old", index=1)])
    (reply,) = Decoder().feed(wire)
    names = [n for n, _ in reply.pairs]
    assert names[:2] == ["version_server", "log_id"]
    assert names.index("delheader") < names.index("insheader") < names.index("addheader")
    assert reply.fields("insheader", 3) == [["0", "X-Virus-Scanned", "by us"]]
    assert reply.get("return_value") == "continue" and reply.get("exit_code") == "0"
    assert reply.get("setreply").startswith("250 2.5.0 Ok, id=9-01")


@pytest.mark.parametrize("destiny, value, code, rcode", [
    (Destiny.DISCARD, "discard", "99", "250"), (Destiny.REJECT, "reject", "69", "554"),
    (Destiny.BOUNCE, "reject", "69", "554"), (Destiny.TEMPFAIL, "tempfail", "75", "451")])
def test_each_destiny_maps_to_ampdp(destiny, value, code, rcode):
    (reply,) = Decoder().feed(encode_reply("9-02", destiny, "INFECTED: X"))
    assert (reply.get("return_value"), reply.get("exit_code")) == (value, code)
    assert reply.get("setreply").split()[0] == rcode


def run_session(tempbase, wire: bytes, process=None) -> list:
    server, client = socket.socketpair()
    ids = iter(range(1, 100))
    calls = []

    def fake_process(job):  # a stand-in for the pipeline: this test is about the protocol
        calls.append(job)
        return Result(log_id=job.log_id, category=Category.CLEAN, destiny=Destiny.PASS)

    session = Session(server, str(tempbase), process or fake_process,
                      lambda: f"7-{next(ids):02d}", lambda: True, timeout=5)
    def serve_then_close():  # as the worker does: close once the client is done
        session.serve()
        server.close()

    thread = threading.Thread(target=serve_then_close)
    thread.start()
    client.sendall(wire)
    client.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    thread.join(5)
    client.close()
    return Decoder().feed(data), calls


def test_session_answers_several_requests_and_refuses_bad_ones(tempbase):
    good = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("tempdir_removed_by", "client")])
    missing_request = encode_block([("sender", "<a@x>"), ("tempdir", str(tempbase / "job"))])
    unknown = encode_block([("request", "AM.CL")])
    escape = encode_block([("request", "AM.PDP"), ("mail_file", "/etc/passwd")])
    too_long = b"request=AM.PDP\r\nsender=" + b"x" * 1_000_000 + b"\r\n\r\n"
    replies, calls = run_session(tempbase, good + missing_request + unknown + escape + too_long
                                 + good)
    assert [r.get("return_value") for r in replies] == [
        "continue", "tempfail", "tempfail", "tempfail", "tempfail", "continue"]
    assert "first attribute must be 'request'" in replies[1].get("setreply")
    assert "unsupported request 'AM.CL'" in replies[2].get("setreply")
    assert "outside the temp base" in replies[3].get("setreply")
    assert "longer than" in replies[4].get("setreply")
    assert len(calls) == 2  # only the good requests reached the pipeline
    assert os.path.exists(tempbase / "job" / "email.txt")  # removed_by=client: kept


def test_tempdir_removed_by_server_is_removed(tempbase):
    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job"))])
    replies, _ = run_session(tempbase, wire)
    assert replies[0].get("return_value") == "continue"
    assert not (tempbase / "job").exists()
    assert tempbase.exists()


def test_control_characters_in_the_envelope_are_neutralised(tempbase):
    """A CR/LF in an address would forge a log line or an SMTP command at release."""
    request = parse_message_request(block(
        ("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
        ("sender", "<a@x.test>\r\nRCPT TO:<evil@x.test>"),
        ("recipient", "<b@x.test>\n2026 amavisd[1]: Passed CLEAN"), ("recipient", "<c@x.test>"),
        ("queue_id", "Q1\x00\x1b[2J"), ("helo_name", "h\x7fost"),
    ), str(tempbase), "1-01")
    env = request.job.envelope
    assert env.sender == "<a@x.test>??RCPT TO:<evil@x.test>"
    assert env.recipients == ["<b@x.test>?2026 amavisd[1]: Passed CLEAN", "<c@x.test>"]
    assert env.queue_id == "Q1??[2J" and env.helo_name == "h?ost"
