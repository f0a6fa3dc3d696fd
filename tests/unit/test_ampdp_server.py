"""AM.PDP server side: path confinement, request parsing, replies, one session."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from amavisd import config as configuration
from amavisd.protocol.ampdp import (
    RequestError,
    Session,
    encode_reply,
    parse_message_request,
    within,
)
from amavisd.protocol.loop import ConnectionLimits, serve
from amavisd.verdict import Category, Destiny, HeaderEdit, Result
from amavisd_client.wire.ampdp import Decoder, encode_block


@pytest.fixture
def tempbase(tmp_path):
    base = tmp_path / "tmp"
    (base / "job").mkdir(parents=True)
    (base / "job" / "email.txt").write_bytes(b"Subject: x\n\nhi\n")
    return base


def block(*attrs):
    (b,) = Decoder().feed(encode_block(attrs))
    return b


def test_paths_must_be_spelled_strictly_below_the_temp_base(tempbase, tmp_path):
    """Lexical only (no system call): what a path leads to is checked when it
    is opened, component by component (test_beneath, and the symlink test below)."""
    assert within(str(tempbase / "job"), str(tempbase), "tempdir") == str(tempbase / "job")
    assert within(str(tempbase / "job") + "/", str(tempbase), "tempdir") == str(tempbase / "job")
    outside = tmp_path / "secret"
    for path in (str(outside), "/etc/shadow", str(tempbase), str(tempbase / ".." / "secret"),
                 f"{tempbase}/job/./email.txt", f"{tempbase}//job", "relative/path", "",
                 f"{tempbase}/job\0/email.txt"):
        with pytest.raises(RequestError):
            within(path, str(tempbase), "mail_file")


def test_a_symlink_in_the_path_is_refused_when_opened(tempbase, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "email.txt").write_bytes(b"Subject: secret\n\n")
    (tempbase / "link").symlink_to(outside)
    (tempbase / "job" / "file-link").symlink_to(outside / "email.txt")
    requests = [[("request", "AM.PDP"), ("mail_file", str(tempbase / "link" / "email.txt"))],
                [("request", "AM.PDP"), ("mail_file", str(tempbase / "job" / "file-link"))],
                [("request", "AM.PDP"), ("tempdir", str(tempbase / "link")),
                 ("tempdir_removed_by", "server")]]
    replies, calls = run_session(tempbase, b"".join(encode_block(r) for r in requests))
    assert [r.get("return_value") for r in replies] == ["tempfail"] * 3
    assert all("symlink" in r.get("setreply") for r in replies)
    assert calls == [] and (outside / "email.txt").exists()


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


class StandIn:
    """The worker's side as a session sees it (protocol.session.Handler), with
    a stand-in for the pipeline: these tests are about the protocol."""

    def __init__(self, tempbase, process=None):
        self.config = configuration.load(None, {"tempbase": str(tempbase),
                                                "work_base": str(tempbase) + "-work"})
        self.ids = iter(range(1, 100))
        self.calls = []
        self.process = process or self.clean

    def clean(self, job):
        self.calls.append(job)
        return Result(log_id=job.log_id, category=Category.CLEAN, destiny=Destiny.PASS)

    def next_log_id(self):
        return f"7-{next(self.ids):02d}"

    def handle_message(self, job):
        return self.process(job)

    def handle_release(self, request, recipients, log_id):
        raise AssertionError("no release in these tests")

    def handle_reply_sent(self):
        pass

    def keep_going(self):
        return True


def run_session(tempbase, wire: bytes, process=None, limits=None) -> list:
    server, client = socket.socketpair()
    handler = StandIn(tempbase, process)
    calls = handler.calls
    session = Session(server, handler)
    limits = limits or ConnectionLimits(idle_timeout=5, request_timeout=5)

    def serve_then_close():  # as the worker does: close once the client is done
        serve(session, limits)
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


def test_an_exception_while_answering_is_a_tempfail_not_a_dead_session(tempbase):
    def broken_process(job):
        raise RuntimeError("a bug")

    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("tempdir_removed_by", "client")])
    replies, _ = run_session(tempbase, wire + wire, process=broken_process)
    assert [r.get("return_value") for r in replies] == ["tempfail", "tempfail"]
    assert "internal error: RuntimeError" in replies[0].get("setreply")


def test_a_connection_ends_after_max_connection_requests(tempbase):
    wire = encode_block([("request", "AM.CL")]) * 10
    replies, _ = run_session(tempbase, wire, limits=ConnectionLimits(5, 5, max_requests=3))
    assert len(replies) == 3


def test_bad_requests_cost_one_log_line_a_connection(tempbase, caplog):
    wire = b"garbage\r\n\r\n" * 50
    with caplog.at_level("INFO", logger="amavisd.ampdp"):
        replies, _ = run_session(tempbase, wire, limits=ConnectionLimits(5, 5, max_requests=100))
    assert len(replies) == 50
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "49 more AM.PDP requests refused" in lines[1]


def hold(limits: ConnectionLimits, client_behaviour) -> float:
    """Seconds the session held the connection while the client did `client_behaviour`."""
    server, client = socket.socketpair()
    session = Session(server, StandIn("/nonexistent", lambda job: None))
    stop = threading.Event()
    thread = threading.Thread(target=client_behaviour, args=(client, stop), daemon=True)
    thread.start()
    started = time.monotonic()
    serve(session, limits)
    held = time.monotonic() - started
    stop.set()
    server.close()
    thread.join(5)
    client.close()
    return held


def test_an_idle_client_is_hung_up_on_after_client_idle_timeout():
    def silent(sock, stop):
        stop.wait(10)

    assert 0.4 <= hold(ConnectionLimits(idle_timeout=0.5, request_timeout=5), silent) < 2


def test_a_trickling_request_ends_at_request_timeout_whatever_the_pace():
    def trickle(sock, stop):
        while not stop.wait(0.1):
            try:
                sock.send(b"x")
            except OSError:
                return

    assert 0.9 <= hold(ConnectionLimits(idle_timeout=0.5, request_timeout=1), trickle) < 2.5


def test_a_client_that_does_not_read_its_replies_is_hung_up_on():
    def flood(sock, stop):  # never reads; its own send blocks once both buffers are full
        try:
            sock.sendall(b"request=AM.CL\r\n\r\n" * 20_000)
        except OSError:
            return  # the server hung up: what we want
        stop.wait(10)

    held = hold(ConnectionLimits(idle_timeout=0.5, request_timeout=5, max_requests=10**6), flood)
    assert held < 3


def test_a_connection_ends_at_max_connection_time_however_polite_the_client():
    """A request every 0.2 s, each answered, stays within every per-request
    deadline: only the whole connection's deadline ends it."""
    def polite(sock, stop):
        sock.settimeout(0.1)
        while not stop.wait(0.2):
            try:
                sock.sendall(b"request=AM.CL\r\n\r\n")
                sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return

    limits = ConnectionLimits(idle_timeout=0.5, request_timeout=1, max_requests=10**6,
                              max_time=1.5)
    assert 1.4 <= hold(limits, polite) < 2.5
