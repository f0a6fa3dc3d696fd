"""The stdlib client's own logic: arguments, header edits, delivery argv."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from amavisd_client.client import parse_args
from amavisd_client.connection import ClientError, Connection, check
from amavisd_client.delivery import deliver, delivery_argvs
from amavisd_client.edits import apply_edits, edit_message, header_edits
from amavisd_client.spool import inside
from amavisd_client.sysexits import EX_OK, EX_TEMPFAIL
from amavisd_client.wire.ampdp import Decoder, encode_block


def test_sendmail_mailer_arguments():
    opts = parse_args(["-s", "/var/lib/amavis/amavisd.sock", "-f", "a@x", "--", "b@y", "-c@y"])
    assert opts.sender == "a@x" and opts.args == ["b@y", "-c@y"]
    assert opts.tempbase == "/var/lib/amavis/tmp"
    opts = parse_args(["--socket=/s/amavisd.sock", "-fa@x", "-t", "5", "b@y"])
    assert (opts.socket, opts.sender, opts.timeout, opts.args) == (
        "/s/amavisd.sock", "a@x", 5.0, ["b@y"])


@pytest.mark.parametrize("argv", [["-x"], ["-t"], ["-t", "soon"], ["-s", "127.0.0.1:9998", "f"]])
def test_bad_arguments(argv):
    with pytest.raises(ValueError):
        parse_args(argv)


def test_relative_socket_paths_are_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    opts = parse_args(["-s", "var/lib/amavisd.sock", "f"])
    assert opts.socket == str(tmp_path / "var/lib/amavisd.sock")
    assert opts.tempbase == str(tmp_path / "var/lib/tmp")


def test_tcp_socket_needs_a_tempbase():
    assert parse_args(["-s", "127.0.0.1:9998", "-T", "/t", "f"]).tempbase == "/t"


def test_the_socket_takes_the_daemons_spellings_of_an_address():
    opts = parse_args(["-s", "unix:/s/amavisd.sock", "f"])
    assert (opts.socket, opts.tempbase) == ("/s/amavisd.sock", "/s/tmp")
    for spelling in ("tcp:127.0.0.1:9998", "inet:9998@127.0.0.1", "[::1]:9998"):
        assert parse_args(["-s", spelling, "-T", "/t", "f"]).socket == spelling
    with pytest.raises(ValueError, match="port"):  # never reachable: say so, once
        parse_args(["-s", "127.0.0.1:99999", "-T", "/t", "f"])


def reply(*attrs):
    (block,) = Decoder().feed(encode_block(attrs))
    return block


def test_header_edits_follow_milter_semantics():
    header = (b"From x\nReceived: one\n  folded\nSubject: s\nX-Spam: 1\nX-Spam: 2\n"
              b"X-Old: gone\n")
    edits = header_edits(reply(
        ("addheader", ["X-Tail", "end"]), ("insheader", ["0", "X-Virus-Scanned", "by us"]),
        ("chgheader", ["2", "X-Spam", "two"]), ("delheader", ["1", "X-Old"]),
        ("chgheader", ["1", "Subject", ""])))
    out = apply_edits(header, edits)
    assert out == (b"From x\nX-Virus-Scanned: by us\nReceived: one\n  folded\n"
                   b"X-Spam: 1\nX-Spam: two\nX-Tail: end\n")


def test_header_edits_keep_crlf_and_ignore_malformed_indexes():
    out = apply_edits(b"Subject: s\r\n", header_edits(reply(
        ("insheader", ["zero", "X-Bad", "x"]), ("insheader", ["1", "X-V", "ok"]))))
    assert out == b"Subject: s\r\nX-V: ok\r\n"


def test_delivery_argv_templates():
    assert delivery_argvs("/usr/lib/dovecot/deliver -f {sender} -- {recipients}", "a@x",
                          ["b@y", "c@y"]) == [
        ["/usr/lib/dovecot/deliver", "-f", "a@x", "--", "b@y", "c@y"]]
    assert delivery_argvs("mail.local -d {recipient}", "a@x", ["b", "c"]) == [
        ["mail.local", "-d", "b"], ["mail.local", "-d", "c"]]
    # the form that fits in one word of a Sendmail A= line
    assert delivery_argvs("/usr/lib/dovecot/deliver,-f,{sender},-d,{recipient}", "a@x",
                          ["b"]) == [["/usr/lib/dovecot/deliver", "-f", "a@x", "-d", "b"]]


def test_inside_requires_a_subdirectory(tmp_path):
    (tmp_path / "d").mkdir()
    assert inside(str(tmp_path / "d" / "email.txt"), str(tmp_path))
    assert not inside(str(tmp_path / "email.txt"), str(tmp_path))
    assert not inside("/etc/passwd", str(tmp_path))


# -- the spool: what is delivered is what was written -------------------------------------


def spooled(tmp_path, data: bytes):
    from amavisd_client.spool import Spool

    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    spool = Spool(str(tmp_path))
    try:
        spool.write_from(read_fd)
    finally:
        os.close(read_fd)
    return spool


def test_spool_modes_and_read_back(tmp_path):
    old = os.umask(0o077)
    try:
        spool = spooled(tmp_path, b"Subject: ours\n\nbody\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(spool.dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o640
    spool.verify()
    assert spool.read() == b"Subject: ours\n\nbody\n"
    spool.remove()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("swap", ["dir", "file"])
def test_a_swapped_spool_is_detected_and_its_bytes_never_read(tmp_path, swap):
    from amavisd_client.spool import SpoolError

    spool = spooled(tmp_path, b"Subject: ours\n\nclean\n")
    if swap == "dir":
        os.rename(spool.dir, str(tmp_path / "moved"))
        os.mkdir(spool.dir)
        planted = os.path.join(spool.dir, "email.txt")
    else:
        planted = spool.path
        os.unlink(planted)
    with open(planted, "wb") as fh:
        fh.write(b"Subject: theirs\n\nEICAR\n")
    with pytest.raises(SpoolError, match="replaced"):
        spool.verify()
    assert spool.read() == b"Subject: ours\n\nclean\n"  # from our descriptor, not the path
    spool.remove()
    if swap == "dir":  # someone else's dir at our name is left alone
        assert open(planted, "rb").read() == b"Subject: theirs\n\nEICAR\n"


def test_a_spool_file_changed_in_place_is_detected(tmp_path):
    from amavisd_client.spool import SpoolError

    spool = spooled(tmp_path, b"Subject: ours\n\nclean\n")
    with open(spool.path, "ab") as fh:
        fh.write(b"appended\n")
    with pytest.raises(SpoolError, match="changed size"):
        spool.verify()
    spool.remove()


def test_a_temp_base_others_may_write_without_the_sticky_bit_is_refused(tmp_path):
    from amavisd_client.spool import Spool, SpoolError

    tmp_path.chmod(0o770)
    with pytest.raises(SpoolError, match="not sticky"):
        Spool(str(tmp_path))
    tmp_path.chmod(0o1770)
    spool = Spool(str(tmp_path))
    spool.remove()


# -- the pieces, without the command line ----------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the client may load beyond its own modules, run as its launcher runs it
# (`python3 -I -S`): start-up is paid on every mail.
CLIENT_STDLIB = {"__future__", "_collections_abc", "_socket", "_stat", "genericpath", "os",
                 "os.path", "posixpath", "stat"}


def modules_loaded_by(*names: str) -> set[str]:
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); before = set(sys.modules)\n"
            f"for name in {list(names)!r}: __import__(name)\n"
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True).stdout
    return set(out.split())


def test_connection_spool_and_edits_import_without_the_command_line():
    loaded = modules_loaded_by("amavisd_client.connection", "amavisd_client.spool",
                               "amavisd_client.edits", "amavisd_client.delivery",
                               "amavisd_client.wire.ampdp")
    assert "amavisd_client.client" not in loaded
    assert {m for m in loaded if not m.startswith("amavisd_client")} <= CLIENT_STDLIB


def test_the_codec_imports_alone():
    loaded = modules_loaded_by("amavisd_client.wire.ampdp")
    assert {m for m in loaded if m.startswith("amavisd_client")} == {
        "amavisd_client", "amavisd_client.wire", "amavisd_client.wire.ampdp"}
    assert loaded <= CLIENT_STDLIB | {"amavisd_client", "amavisd_client.wire",
                                      "amavisd_client.wire.ampdp"}


def test_the_command_line_loads_only_what_python_has_anyway():
    loaded = modules_loaded_by("amavisd_client.client")
    assert {m for m in loaded if not m.startswith("amavisd_client")} <= CLIENT_STDLIB


def test_edit_message_edits_the_header_only():
    message = b"Subject: s\r\nX-Old: 1\r\n\r\nX-Old: in the body\r\n"
    edits = header_edits(reply(("delheader", ["1", "X-Old"]), ("addheader", ["X-New", "n"])))
    assert edit_message(message, edits) == (b"Subject: s\r\nX-New: n\r\n\r\n"
                                            b"X-Old: in the body\r\n")
    assert edit_message(message, []) is message


def test_deliver_runs_one_agent_a_recipient_with_the_message_on_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tee writes a file named after each recipient here
    assert deliver("tee {recipient}", "a@x", ["b@y", "c@y"], b"Subject: s\n\nbody\n") == EX_OK
    for rcpt in ("b@y", "c@y"):
        assert (tmp_path / rcpt).read_bytes() == b"Subject: s\n\nbody\n"


def test_deliver_passes_on_the_agents_failure(tmp_path):
    assert deliver("false", "a@x", ["b@y"], b"m\n") == 1
    assert deliver(f"{tmp_path}/no-such-agent", "a@x", ["b@y"], b"m\n") == EX_TEMPFAIL


class OneVerdictServer:
    """A stand-in daemon for the connection alone: answers each AM.PDP request
    with `return_value=continue` and keeps what it was asked."""

    def __init__(self, family: int, bind_to):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(bind_to)
        self.listener.listen()
        self.requests = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.talk(conn)

    def talk(self, conn: socket.socket) -> None:
        decoder = Decoder()
        while data := conn.recv(65536):
            for block in decoder.feed(data):
                self.requests.append(block.as_dict())
                conn.sendall(encode_block([("return_value", "continue")]))

    def read_one(self, conn: socket.socket) -> None:
        """Read one whole request and keep it."""
        decoder = Decoder()
        blocks = []
        while not blocks and (data := conn.recv(65536)):
            blocks = decoder.feed(data)
        self.requests.extend(block.as_dict() for block in blocks)


def test_the_connection_reaches_the_daemon_at_each_spelling(tmp_path):
    unix = OneVerdictServer(socket.AF_UNIX, str(tmp_path / "amavisd.sock"))
    tcp = OneVerdictServer(socket.AF_INET, ("127.0.0.1", 0))
    port = tcp.listener.getsockname()[1]
    spellings = [str(tmp_path / "amavisd.sock"), f"unix:{tmp_path}/amavisd.sock",
                 f"127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", f"inet:{port}@127.0.0.1"]
    for spelling in spellings:
        conn = Connection(spelling, timeout=5)
        try:
            reply = check(conn, "/t/client-1/email.txt", "a@x", ["b@y", "<c@y>"])
            assert reply.get("return_value") == "continue"
            assert check(conn, "/t/client-2/email.txt", None, ["b@y"]).get("return_value")
        finally:
            conn.close()
    unix.listener.close()
    tcp.listener.close()
    assert (len(unix.requests), len(tcp.requests)) == (4, 6)  # two requests a connection
    first = unix.requests[0]
    assert first["request"] == ["AM.PDP"] and first["mail_file"] == ["/t/client-1/email.txt"]
    assert first["tempdir"] == ["/t/client-1"] and first["sender"] == ["<a@x>"]
    assert first["recipient"] == ["<b@y>", "<c@y>"]
    assert "sender" not in unix.requests[1]


class ClosingAsWeSpeak(OneVerdictServer):
    """A named fake for a race a real daemon has only for microseconds: the
    worker gives its kept connection away (others wait), or retires, just as
    the client's next request arrives. Here: one answer a connection, then
    the connection is closed once the next request is there, unread."""

    def talk(self, conn: socket.socket) -> None:
        self.read_one(conn)
        conn.sendall(encode_block([("return_value", "continue")]))
        conn.recv(1, socket.MSG_PEEK)  # the next request is there: close, unread


class DyingMidScan(OneVerdictServer):
    """A named fake for a worker killed while it scans: the request is read,
    the connection ends without a byte of the reply."""

    def talk(self, conn: socket.socket) -> None:
        self.read_one(conn)


RELEASE = [("request", "release"), ("mail_id", "x"), ("secret_id", "y")]
SERVER_DELIVERS = [("request", "AM.PDP"), ("tempdir", "/t/s"), ("mail_file", "/t/s/email.txt"),
                   ("delivery_care_of", "server"), ("recipient", "<b@y>")]


@pytest.fixture(params=[socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def spelling(request, tmp_path):
    """(family, bind address, the client's spelling of it) for each transport."""
    if request.param == socket.AF_UNIX:
        path = str(tmp_path / "amavisd.sock")
        return request.param, path, lambda _server: path
    return request.param, ("127.0.0.1", 0), \
        lambda server: f"127.0.0.1:{server.listener.getsockname()[1]}"


def test_a_kept_connection_closed_as_the_next_check_arrives_is_asked_again(spelling):
    family, bind_to, spelled = spelling
    server = ClosingAsWeSpeak(family, bind_to)
    conn = Connection(spelled(server), timeout=5)
    try:
        conn.open()  # as the command line does: the first request is on a fresh connection
        for n in range(3):
            assert check(conn, f"/t/c{n}/email.txt", "a@x", ["b@y"]).get("return_value")
    finally:
        conn.close()
        server.listener.close()
    assert [r["mail_file"] for r in server.requests] == [
        ["/t/c0/email.txt"], ["/t/c1/email.txt"], ["/t/c2/email.txt"]]  # each read once


def test_the_first_request_on_a_connection_is_never_asked_again(spelling):
    """The connection is opened before the request (the command line does
    so): its first request ending without a reply is a worker dying on this
    message, not a kept connection given away: a tempfail, asked once."""
    family, bind_to, spelled = spelling
    server = DyingMidScan(family, bind_to)
    conn = Connection(spelled(server), timeout=5)
    try:
        conn.open()
        with pytest.raises(ClientError, match="without a verdict|connection failed"):
            check(conn, "/t/c0/email.txt", "a@x", ["b@y"])
        with pytest.raises(ClientError):  # unopened: the same
            check(conn, "/t/c1/email.txt", "a@x", ["b@y"])
    finally:
        conn.close()
        server.listener.close()
    assert [r["mail_file"] for r in server.requests] == [["/t/c0/email.txt"],
                                                         ["/t/c1/email.txt"]]


@pytest.mark.parametrize("attrs", [RELEASE, SERVER_DELIVERS], ids=["release", "server-delivers"])
def test_a_release_or_a_delivery_by_the_daemon_is_never_sent_twice(tmp_path, attrs):
    server = ClosingAsWeSpeak(socket.AF_UNIX, str(tmp_path / "amavisd.sock"))
    conn = Connection(str(tmp_path / "amavisd.sock"), timeout=5)
    try:
        assert check(conn, "/t/c0/email.txt", "a@x", ["b@y"]).get("return_value")
        with pytest.raises(ClientError):
            conn.request(attrs)
    finally:
        conn.close()
        server.listener.close()
    assert len(server.requests) == 1  # the check; the second request was never read


class HalfAnswering(OneVerdictServer):
    """A named fake: the first request is answered, the second gets part of
    a reply and then the end of the connection."""

    def talk(self, conn: socket.socket) -> None:
        reply = encode_block([("return_value", "continue")])
        self.read_one(conn)
        conn.sendall(reply)
        self.read_one(conn)
        conn.sendall(reply[:5])


def test_a_reply_cut_short_on_a_kept_connection_is_not_asked_again(tmp_path):
    """Some of the reply came: the daemon read the request and answered, so
    nothing says it did not act on it; a tempfail."""
    server = HalfAnswering(socket.AF_UNIX, str(tmp_path / "amavisd.sock"))
    conn = Connection(str(tmp_path / "amavisd.sock"), timeout=5)
    try:
        assert check(conn, "/t/c0/email.txt", "a@x", ["b@y"]).get("return_value")
        with pytest.raises(ClientError, match="without a verdict"):
            check(conn, "/t/c1/email.txt", "a@x", ["b@y"])
    finally:
        conn.close()
        server.listener.close()
    assert len(server.requests) == 2
