"""AM.PDP server side: path confinement, request parsing, replies, one session."""

from __future__ import annotations

import itertools
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

    def __init__(self, tempbase, process=None, settings=None):
        self.config = configuration.load(None, {"tempbase": str(tempbase),
                                                "work_base": str(tempbase) + "-work"}
                                         | (settings or {}))
        self.ids = itertools.count(1)
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


def run_session(tempbase, wire: bytes, process=None, limits=None, settings=None) -> list:
    server, client = socket.socketpair()
    handler = StandIn(tempbase, process, settings)
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
    # amavisd-new's answer to a request it cannot act on: 450 4.5.0 Failure, exit 75
    for refused in replies[1:5]:
        assert refused.get("setreply").startswith("450 4.5.0 Failure: request refused: ")
        assert refused.get("exit_code") == "75"
    assert str(tempbase) not in replies[3].get("setreply")  # nor our paths
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
    # the class of failure only: the exception is for the log
    assert replies[0].get("setreply").endswith("TEMPFAIL: internal error")
    assert "RuntimeError" not in replies[0].get("setreply")


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


# -- delivery_care_of=server ----------------------------------------------------------


def test_delivery_care_of_takes_client_or_server_only(tempbase):
    def parse(value):
        return parse_message_request(block(("request", "AM.PDP"),
                                           ("tempdir", str(tempbase / "job")),
                                           ("delivery_care_of", value)), str(tempbase), "1-01")

    assert parse("server").care_of_server and not parse("client").care_of_server
    assert parse("SERVER").care_of_server  # amavisd-new lower-cases it
    with pytest.raises(RequestError, match="delivery_care_of") as refused:
        parse("elsewhere")
    assert refused.value.public == "request refused: delivery_care_of must be client or server"


def test_server_delivery_forwards_the_bytes_that_were_scanned(tempbase, sink):
    """A client may rewrite its file after the scan: what we forward is the
    private copy the pipeline read, never the client's file again."""
    (tempbase / "job" / "email.txt").write_bytes(b"Subject: x\n\nclean\n")
    scanned = []

    def scan_then_tamper(job):
        scanned.append(os.pread(job.mail_fd, 1000, 0))
        (tempbase / "job" / "email.txt").write_bytes(b"Subject: x\n\nEVIL!\n")  # same size
        return Result(log_id=job.log_id, category=Category.CLEAN, destiny=Destiny.PASS,
                      header_edits=[HeaderEdit("insert", "X-Virus-Scanned", "by us", 0)])

    host, port = sink.address
    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("sender", "<a@x.test>"), ("recipient", "<b@x.test>"),
                         ("delivery_care_of", "server"), ("tempdir_removed_by", "client")])
    replies, _ = run_session(tempbase, wire, process=scan_then_tamper,
                             settings={"forward_method": f"smtp:[{host}]:{port}"})
    assert scanned == [b"Subject: x\n\nclean\n"]
    assert replies[0].get("return_value") == "discard" and replies[0].get("exit_code") == "99"
    assert replies[0].get("setreply") == (f"250 2.0.0 from MTA(smtp:[{host}]:{port}): "
                                          "250 2.0.0 ok: kept")
    assert replies[0].get("insheader") is None  # the edits are in the forwarded bytes
    [got] = sink.wait(1)
    assert (got.mail_from, got.rcpt_tos) == ("a@x.test", ["b@x.test"])
    lines = got.data.split(b"\r\n")
    assert lines[0] == b"X-Virus-Scanned: by us"
    assert lines[1].startswith(b"Received: from unknown by localhost (amavisd, unix socket)")
    assert got.data.endswith(b"\r\nSubject: x\r\n\r\nclean\r\n") and b"EVIL" not in got.data


def test_server_delivery_forwards_nothing_that_did_not_pass(tempbase, sink):
    host, port = sink.address
    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("recipient", "<b@x.test>"), ("delivery_care_of", "server")])

    def infected(job):
        return Result(log_id=job.log_id, category=Category.INFECTED, destiny=Destiny.DISCARD)

    replies, _ = run_session(tempbase, wire, process=infected,
                             settings={"forward_method": f"smtp:[{host}]:{port}"})
    assert replies[0].get("return_value") == "discard"
    assert replies[0].get("setreply").startswith("250 2.7.0 Ok, discarded")
    assert sink.wait(1, timeout=0.3) == []


def test_server_delivery_with_the_next_hop_down_is_a_tempfail(tempbase):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("recipient", "<b@x.test>"), ("delivery_care_of", "server"),
                         ("tempdir_removed_by", "server")])
    replies, _ = run_session(tempbase, wire,
                             settings={"forward_method": f"smtp:[127.0.0.1]:{port}"})
    assert (replies[0].get("return_value"), replies[0].get("exit_code")) == ("tempfail", "75")
    assert replies[0].get("setreply") == ("451 4.5.0 Temporary failure, id=7-01 - TEMPFAIL: "
                                          "Temporary MTA failure on relaying")
    assert not (tempbase / "job").exists()  # the MTA keeps the mail; the spool is done with


def test_a_permanent_failure_of_our_own_says_no_path(tempbase, tmp_path):
    """A forward method that refuses for good in its own words (a sendmail
    exiting 67, EX_NOUSER, with a path on stderr): a reject, the detail logged."""
    program = tmp_path / "sendmail"
    program.write_text(f'#!/bin/sh\ncat >/dev/null\necho "{tmp_path}/secret: no user" >&2\n'
                       "exit 67\n")
    program.chmod(0o755)
    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("recipient", "<b@x.test>"), ("delivery_care_of", "server"),
                         ("tempdir_removed_by", "client")])
    replies, _ = run_session(tempbase, wire, settings={"forward_method": f"pipe:{program}"})
    assert (replies[0].get("return_value"), replies[0].get("exit_code")) == ("reject", "69")
    assert replies[0].get("setreply") == ("554 5.1.1 id=7-01 - Unable to relay message back "
                                          "to MTA")


def test_a_file_shrunk_below_the_limit_after_the_copy_is_not_scanned_then_swapped(
        tempbase, sink, clamd_nodecomp):
    """The client's file is over max_message_size when the private copy is
    made, so none is made; the client then shrinks it to a clean message
    (which the real pipeline scans) and, after the scan, writes a virus of
    the same size. What the pipeline reads must be fixed when the copy is
    taken: the message stays too large (UNCHECKED), nothing is forwarded."""
    from amavisd.pipeline import Pipeline
    from amavisd.testing.messages import clean_message, eicar_message

    evil = eicar_message()
    clean = clean_message(body="x" * (len(evil) - len(clean_message(body=""))))
    assert len(clean) == len(evil)
    mail = tempbase / "job" / "email.txt"
    mail.write_bytes(clean + b"\n" * 4096)  # over the limit when the request comes
    host, port = sink.address
    settings = {"forward_method": f"smtp:[{host}]:{port}", "max_message_size": 4096,
                "clamd": clamd_nodecomp.address, "backup_scanners": [],
                "unchecked_destiny": "reject"}
    pipeline = Pipeline(configuration.load(None, {"tempbase": str(tempbase),
                                                  "work_base": str(tempbase) + "-work"}
                                           | settings))

    def shrink_scan_swap(job):
        with open(mail, "r+b") as fh:  # the attacker, racing the worker
            fh.write(clean)
            fh.truncate(len(clean))
        result = pipeline.process(job)
        mail.write_bytes(evil)
        return result

    wire = encode_block([("request", "AM.PDP"), ("mail_file", str(mail)),
                         ("sender", "<a@x.test>"), ("recipient", "<b@x.test>"),
                         ("delivery_care_of", "server")])
    replies, _ = run_session(tempbase, wire, process=shrink_scan_swap, settings=settings)
    assert replies[0].get("return_value") == "reject", replies[0].as_dict()
    assert "UNCHECKED" in replies[0].get("setreply")
    assert sink.wait(1, timeout=0.5) == []


def test_the_owner_of_a_loopback_tcp_client_is_found(tmp_path):
    """/proc/net/tcp names the uid of the client's end; a TIME_WAIT entry
    (shown with uid 0) or a missing one is no owner, never root."""
    from amavisd.protocol import handover

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            assert handover.peer_uid(server) == os.geteuid()
            assert handover.loopback_owner(server) == os.geteuid()
            ours = handover._proc_key(socket.AF_INET, server.getsockname())
            theirs = handover._proc_key(socket.AF_INET, server.getpeername())
            table = tmp_path / "tcp"
            title = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when " \
                    "retrnsmt   uid  timeout inode\n"
            table.write_text(title + f"   0: {theirs} {ours} 06 00000000:00000000 03:00000 "
                             "00000000     0        0 0 3 0000000000000000\n")
            assert handover.loopback_owner(server, {socket.AF_INET: str(table)}) is None
            table.write_text(title + f"   0: {theirs} {ours} 01 00000000:00000000 00:00000 "
                             "00000000  4242        0 77 1 0000000000000000\n")
            assert handover.loopback_owner(server, {socket.AF_INET: str(table)}) == 4242
            assert handover.loopback_owner(server, {socket.AF_INET: str(tmp_path / "no")}) \
                is None
            table.write_text(title + f"   0: {theirs} {ours} 05 00000000:00000000 03:00001760 "
                             "00000000     0        0 0 3 0000000000000000\n")  # an orphan
            assert handover.loopback_owner(server, {socket.AF_INET: str(table)}) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_a_client_that_closed_at_once_is_nobody_not_root():
    """Connect, send, close before the daemon looks: the kernel keeps the
    client's end as an orphan, which /proc/net/tcp shows as uid 0. That is
    not root asking (root is exempt from the ownership check)."""
    from amavisd.protocol import handover

    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        pid = os.fork()
        if pid == 0:  # the client, as nobody: never returns into pytest
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                client = socket.socket()
                client.connect(address)
                client.sendall(b"request=AM.PDP\r\n\r\n")
                client.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        server, _ = listener.accept()
        with server:
            assert handover.peer_uid(server) is None


def test_server_delivery_needs_the_clients_uid(tempbase, sink, monkeypatch):
    """Over TCP with the client's uid not found, its files are checked
    against no one: we will not forward one to recipients it names."""
    from amavisd.protocol import handover

    monkeypatch.setitem(handover._PROC_TCP, socket.AF_INET, str(tempbase / "no-such-table"))
    host, port = sink.address
    handler = StandIn(tempbase, None, {"forward_method": f"smtp:[{host}]:{port}"})
    wire = encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("recipient", "<b@x.test>"), ("delivery_care_of", "server"),
                         ("tempdir_removed_by", "client")])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            session = Session(server, handler)
            assert session.peer_uid is None
            session.receive(wire)
            (reply,) = Decoder().feed(session.answer())
    assert reply.get("return_value") == "tempfail"
    assert "delivery_care_of=server needs the client's uid" in reply.get("setreply")
    assert handler.calls == [] and sink.wait(1, timeout=0.3) == []


def test_oversized_mail_passed_unscanned_is_forwarded_only_as_it_was_judged(
        tempbase, sink, clamd_nodecomp):
    """A postmaster passes mail over max_message_size unscanned: the
    client's file is forwarded, but only at the size that made the verdict.
    One shrunk to a small virus after the verdict is a tempfail."""
    from amavisd.pipeline import Pipeline
    from amavisd.testing.messages import clean_message, eicar_message

    mail = tempbase / "job" / "email.txt"
    big = clean_message(body="y" * 8000)
    host, port = sink.address
    settings = {"forward_method": f"smtp:[{host}]:{port}", "max_message_size": 4096,
                "clamd": clamd_nodecomp.address, "backup_scanners": [],
                "unchecked_destinies": ["limit=pass"]}
    pipeline = Pipeline(configuration.load(None, {"tempbase": str(tempbase),
                                                  "work_base": str(tempbase) + "-work"}
                                           | settings))
    wire = encode_block([("request", "AM.PDP"), ("mail_file", str(mail)),
                         ("sender", "<a@x.test>"), ("recipient", "<b@x.test>"),
                         ("delivery_care_of", "server")])

    def judged_then(tamper):
        def process(job):
            result = pipeline.process(job)
            tamper()
            return result
        return process

    mail.write_bytes(big)
    replies, _ = run_session(tempbase, wire, process=judged_then(lambda: None),
                             settings=settings)
    assert replies[0].get("return_value") == "discard", replies[0].as_dict()
    [got] = sink.wait(1)
    assert got.data.endswith(b"y" * 100 + b"\r\n")

    mail.write_bytes(big)
    replies, _ = run_session(tempbase, wire,
                             process=judged_then(lambda: mail.write_bytes(eicar_message())),
                             settings=settings)
    assert replies[0].get("return_value") == "tempfail", replies[0].as_dict()
    assert sink.wait(2, timeout=0.5) == [got]


def test_every_envelope_field_is_made_printable():
    """Envelope names its fields one by one: a field added later and not
    named there would keep its control characters."""
    from dataclasses import fields

    from amavisd.envelope import Envelope

    values = {f.name: (["a\r\nb", "c\x00"] if f.name == "recipients" else f"{f.name}\r\n\x1b")
              for f in fields(Envelope)}
    env = Envelope(**values)
    for f in fields(Envelope):
        got = getattr(env, f.name)
        for text in got if isinstance(got, list) else [got]:
            assert text.isprintable(), (f.name, text)
