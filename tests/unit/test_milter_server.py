"""The milter's asyncio server, its options and its command line.

The MTA side is a Python client speaking the milter protocol with our codec;
the daemon side is `FaultDaemon`, a named fake: it stands in for amavisd
only where the real one cannot fail on demand (silence, garbage, a reply
it would never send) and records each request and the spooled message as
the daemon would have read it. Against the real daemon: test_miltertest.py.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from amavisd.config.table import BY_NAME
from amavisd_client.milter import codec, options
from amavisd_client.milter.codec import Framer
from amavisd_client.milter.links import DaemonLinks
from amavisd_client.milter.options import OptionError, Settings, resolve
from amavisd_client.milter.server import ListenError, MilterServer, bind
from amavisd_client.wire.address import Address
from amavisd_client.wire.ampdp import Decoder, encode_block
from tests.rigs.daemon import ROOT

POSTFIX_OFFER = codec.OptNeg(6, 0x1FF, 0x1FFFFF)
FINAL = set(b"cayrtd")
HEADER = [codec.Header(b"From", b"alice@example.test"), codec.Header(b"Subject", b"hi")]


class FaultDaemon:
    """A fake AM.PDP daemon (named fault): `answer(block)` gives the reply
    bytes, None for silence; `delay` seconds before answering. Every
    connection gets its own thread, as the daemon's workers would."""

    def __init__(self, path: Path, answer, delay: float = 0.0):
        self.path = str(path)
        self.answer = answer
        self.delay = delay
        self.requests: list = []
        self.spooled: list[tuple[bytes, int, int]] = []  # content, file mode, dir mode
        self.stop_event = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop_event.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        decoder, blocks = Decoder(), []
        conn.settimeout(10)
        try:
            while not blocks:
                data = conn.recv(65536)
                if not data:
                    return
                blocks = decoder.feed(data)
            block = blocks[0]
            self.requests.append(block)
            path = block.get("mail_file")
            with open(path, "rb") as fh:
                self.spooled.append((fh.read(), stat.S_IMODE(os.fstat(fh.fileno()).st_mode),
                                     stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))
            if self.stop_event.wait(self.delay):
                return
            reply = self.answer(block)
            if reply is None:
                self.stop_event.wait(60)
                return
            conn.sendall(reply)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop_event.set()
        self.sock.close()
        self.thread.join(2)


def clean_reply(block) -> bytes:
    return encode_block([("version_server", "2"), ("log_id", "1-01"),
                         ("insheader", ["0", "X-Virus-Scanned", "by amavisd at test"]),
                         ("return_value", "continue"),
                         ("setreply", ["250", "2.5.0", "Ok, id=1-01, CLEAN"])])


@pytest.fixture
def tempbase(short_tmp):
    path = short_tmp / "tmp"
    path.mkdir(mode=0o1770)
    path.chmod(0o1770)
    return path


def settings(short_tmp: Path, tempbase: Path, **changes) -> Settings:
    values = dict(listen=Address("unix", path=str(short_tmp / "milter.sock")),
                  socket_mode=0o660, socket_group="",
                  daemon_socket=Address("unix", path=str(short_tmp / "daemon.sock")),
                  tempbase=str(tempbase), daemon_timeout=10.0, progress_interval=10.0,
                  on_error="tempfail", policy_bank="", quarantine=frozenset())
    values.update(changes)
    return Settings(**values)


async def mta_session(path: str, commands, until_final: int = 1, timeout: float = 30.0):
    """Send `commands` (packets), read replies until `until_final` final
    verdicts came (0: until the milter closes); return [(code, payload)]."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"".join(c if isinstance(c, bytes) else codec.encode_command(c)
                          for c in commands))
    await writer.drain()
    framer, got = Framer(), []
    deadline = time.monotonic() + timeout
    while until_final == 0 or sum(1 for code, _ in got if code in FINAL) < until_final:
        data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        if not data:
            break
        got += framer.feed(data)
    writer.close()
    return [(chr(code), payload) for code, payload in got]


def message(rcpt: str = "<b@example.test>", body: bytes = b"hello\r\n"):
    return [POSTFIX_OFFER, codec.Macro("C", {"j": "mx"}),
            codec.Connect("client.example", "4", 1234, "192.0.2.7"),
            codec.Mail(("<a@example.test>",)), codec.Rcpt((rcpt,)), *HEADER,
            codec.EndOfHeaders(), codec.Body(body), codec.Macro("E", {"i": "QID7"}),
            codec.EndOfMessage()]


def run_server(config: Settings, scenario):
    """Serve on `config.listen` while `scenario(server)` runs; return its result."""
    async def main():
        server = MilterServer(config)
        await server.start([bind(config.listen, config.socket_mode)])
        try:
            return await scenario(server)
        finally:
            await server.stop(2.0)
    return asyncio.run(main())


def final(replies):
    return [r for r in replies if r[0] in "cayrtd"]


# -- verdicts through the whole server ---------------------------------------------------


def test_a_verdict_reaches_the_mta_and_the_spool_is_what_the_mta_sent(short_tmp, tempbase):
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply)
    config = settings(short_tmp, tempbase, policy_bank="MILTER")
    try:
        replies = run_server(config, lambda s: mta_session(config.listen.path, message()))
    finally:
        daemon.close()
    assert replies[1:] == [("i", b"\0\0\0\0X-Virus-Scanned\0 by amavisd at test\0"),
                           ("c", b"")]
    ((content, file_mode, dir_mode),) = daemon.spooled
    assert content == b"From:alice@example.test\r\nSubject:hi\r\n\r\nhello\r\n"
    assert (file_mode, dir_mode) == (0o600, 0o700)
    request = daemon.requests[0].as_dict()
    assert request["sender"] == ["<a@example.test>"] and request["queue_id"] == ["QID7"]
    assert request["client_address"] == ["192.0.2.7"] and request["policy_bank"] == ["MILTER"]
    assert request["tempdir_removed_by"] == ["client"]
    assert os.listdir(tempbase) == []  # removed after the verdict


def test_the_daemon_down_is_a_tempfail_with_one_log_line(short_tmp, tempbase, caplog):
    config = settings(short_tmp, tempbase)
    replies = run_server(config, lambda s: mta_session(config.listen.path, message()))
    assert final(replies) == [("y", b"451 4.3.0 Virus scanner unavailable, try again later\0")]
    lines = [r for r in caplog.records if "cannot connect to amavisd" in r.getMessage()]
    assert len(lines) == 1 and "QID7: <a@example.test> -> <b@example.test>" in \
        lines[0].getMessage()
    assert os.listdir(tempbase) == []


@pytest.mark.parametrize("on_error,expected", [
    ("tempfail", ("y", b"451 4.3.0 Virus scanner unavailable, try again later\0")),
    ("reject", ("y", b"554 5.7.0 Virus scanner unavailable, message rejected\0")),
    ("accept", ("c", b"")),
])
def test_a_bad_reply_gets_the_on_error_action(short_tmp, tempbase, on_error, expected):
    daemon = FaultDaemon(short_tmp / "daemon.sock",
                         lambda block: b"log_id=1\r\nreturn_value=perhaps\r\n\r\n")
    config = settings(short_tmp, tempbase, on_error=on_error)
    try:
        replies = run_server(config, lambda s: mta_session(config.listen.path, message()))
    finally:
        daemon.close()
    assert final(replies) == [expected]


def test_a_silent_daemon_gets_progress_then_the_timeout_tempfail(short_tmp, tempbase):
    daemon = FaultDaemon(short_tmp / "daemon.sock", lambda block: None)
    config = settings(short_tmp, tempbase, daemon_timeout=2.0, progress_interval=0.3)
    started = time.monotonic()
    try:
        replies = run_server(config, lambda s: mta_session(config.listen.path, message()))
    finally:
        daemon.close()
    took = time.monotonic() - started
    codes = [code for code, _ in replies[1:]]
    assert codes[-1] == "y" and final(replies)[0][1].startswith(b"451 4.3.0")
    assert 2 <= codes.count("p") <= 7 and set(codes[:-1]) == {"p"}
    assert 2.0 <= took < 8
    deadline = time.monotonic() + 5  # the aborted thread removes its spool at once
    while os.listdir(tempbase) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(tempbase) == []


def test_a_slow_daemon_still_answers_after_progress(short_tmp, tempbase):
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply, delay=1.2)
    config = settings(short_tmp, tempbase, progress_interval=0.25)
    try:
        replies = run_server(config, lambda s: mta_session(config.listen.path, message()))
    finally:
        daemon.close()
    codes = [code for code, _ in replies[1:]]
    assert codes.count("p") >= 3 and codes[-2:] == ["i", "c"]


def test_stopping_mid_scan_ends_the_question_and_removes_the_spool(short_tmp, tempbase):
    daemon = FaultDaemon(short_tmp / "daemon.sock", lambda block: None)  # never answers
    config = settings(short_tmp, tempbase, daemon_timeout=60.0)

    async def stop_mid_scan(server):
        mta = asyncio.ensure_future(mta_session(config.listen.path, message()))
        while not daemon.requests:
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await server.stop(grace=0.5)
        replies = await mta
        return replies, time.monotonic() - started
    try:
        replies, took = run_server(config, stop_mid_scan)
    finally:
        daemon.close()
    assert final(replies) == []  # hung up on: the MTA applies its default (tempfail)
    assert took < 10
    assert os.listdir(tempbase) == []


def test_many_mta_connections_are_served_at_once(short_tmp, tempbase):
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply, delay=1.0)
    config = settings(short_tmp, tempbase)

    async def twenty(server):
        return await asyncio.gather(*(mta_session(config.listen.path,
                                                  message(f"<r{i}@example.test>"))
                                      for i in range(20)))
    started = time.monotonic()
    try:
        results = run_server(config, twenty)
    finally:
        daemon.close()
    assert all(final(r) == [("c", b"")] for r in results)
    assert time.monotonic() - started < 12  # not 20 x 1 s one after the other
    assert sorted(b.get("recipient") for b in daemon.requests) == sorted(
        f"<r{i}@example.test>" for i in range(20))


def test_a_small_message_touches_the_disk_only_when_the_daemon_is_asked(short_tmp, tempbase):
    """The event loop makes no spool for a message that fits in memory: up to
    the end of message the temp base stays empty; the call that asks the
    daemon makes it, and the daemon reads exactly what the MTA sent."""
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply)
    config = settings(short_tmp, tempbase)
    *start, eom = message()

    async def watched(server):
        reader, writer = await asyncio.open_unix_connection(config.listen.path)
        writer.write(b"".join(codec.encode_command(c) for c in start))
        await asyncio.wait_for(reader.read(100), 10)  # the negotiation reply
        await asyncio.sleep(0.3)  # every command before EOM is in
        before_eom = os.listdir(tempbase)
        writer.write(codec.encode_command(eom))
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        return before_eom, reply
    try:
        before_eom, reply = run_server(config, watched)
    finally:
        daemon.close()
    assert before_eom == []
    assert [code for code, _ in Framer().feed(reply)][-1] == ord("c")
    assert daemon.spooled[0][0] == b"From:alice@example.test\r\nSubject:hi\r\n\r\nhello\r\n"
    assert os.listdir(tempbase) == []


def test_a_message_larger_than_the_memory_hold_is_spooled_whole(short_tmp, tempbase):
    """Past spool.MEMORY the message goes to the file chunk by chunk, on the loop."""
    from amavisd_client.milter import spool

    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply)
    config = settings(short_tmp, tempbase)
    chunks = [bytes([65 + n]) * 60_000 + b"\r\n" for n in range(5)]  # 300 KB, 5 packets
    body = b"".join(chunks)
    assert len(body) > 4 * spool.MEMORY
    commands = message(body=chunks[0])
    commands[9:9] = [codec.Body(c) for c in chunks[1:]]  # after the first chunk
    try:
        replies = run_server(config, lambda s: mta_session(config.listen.path, commands))
    finally:
        daemon.close()
    assert final(replies) == [("c", b"")]
    assert daemon.spooled[0][0] == b"From:alice@example.test\r\nSubject:hi\r\n\r\n" + body
    assert os.listdir(tempbase) == []


def test_the_spool_sink_holds_then_makes_the_file_and_never_after_discard(tempbase):
    from amavisd_client.milter.spool import SpoolSink
    from amavisd_client.spool import SpoolError

    sink = SpoolSink(str(tempbase), memory=10)
    sink.write(b"12345")
    assert os.listdir(tempbase) == [] and sink.size == 5
    with pytest.raises(SpoolError):
        _ = sink.path  # no path to name before the file exists
    sink.write(b"6789abc")  # past `memory`: made now, the held bytes first
    with open(sink.path, "rb") as fh:
        assert fh.read() == b"123456789abc"
    assert stat.S_IMODE(os.stat(sink.path).st_mode) == 0o600
    sink.discard()
    sink.discard()
    assert os.listdir(tempbase) == []
    held = SpoolSink(str(tempbase))
    held.write(b"x")
    held.discard()  # the connection went away before the daemon was asked
    with pytest.raises(SpoolError):
        held.open()  # a late thread makes nothing
    with pytest.raises(SpoolError):
        held.write(b"y")
    assert os.listdir(tempbase) == []


def test_the_daemon_is_asked_over_tcp_on_the_loop_and_the_spool_goes_after(tempbase):
    """daemon.py's non-blocking exchange over TCP (the rest of these tests use
    a Unix socket): the daemon reads the spool while asked; it is gone after."""
    from amavisd_client.milter.daemon import DaemonCall
    from amavisd_client.milter.spool import SpoolSink
    from amavisd_client.milter.state import Ask

    seen = []

    async def daemon(reader, writer):
        decoder, blocks = Decoder(), []
        while not blocks:
            blocks = decoder.feed(await reader.read(65536))
        with open(blocks[0].get("mail_file"), "rb") as fh:
            seen.append((blocks[0], fh.read()))
        writer.write(clean_reply(None))
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(daemon, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sink = SpoolSink(str(tempbase))
        sink.write(b"Subject: x\r\n\r\nbody\r\n")
        question = Ask([("request", "AM.PDP"), ("sender", "<a@x>")], [], sink, "test")
        links = DaemonLinks(Address("tcp", host="127.0.0.1", port=port))
        try:
            return await DaemonCall(links, question).run()
        finally:
            links.close()
            server.close()
    reply = asyncio.run(main())
    assert reply.get("return_value") == "continue"
    assert seen[0][1] == b"Subject: x\r\n\r\nbody\r\n"
    assert os.listdir(tempbase) == []


def test_a_daemon_socket_with_a_full_backlog_is_waited_for_not_failed(short_tmp, tempbase):
    """A connect to a Unix socket whose backlog is full fails at once (EAGAIN;
    the thread-and-timeout client made that a tempfail): the call tries again
    until the daemon accepts, within daemon_timeout, and gets its verdict."""
    from amavisd_client.milter.daemon import DaemonCall
    from amavisd_client.milter.spool import SpoolSink
    from amavisd_client.milter.state import Ask

    path = str(short_tmp / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    while True:  # queue connections nobody accepts until one would have to wait
        filler = socket.socket(socket.AF_UNIX)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)

    def accept_later():
        time.sleep(0.5)
        for _ in range(len(fillers) + 1):
            conn, _ = listener.accept()
            conn.settimeout(5)
            decoder, blocks = Decoder(), []
            try:
                while not blocks:
                    data = conn.recv(65536)
                    if not data:
                        break
                    blocks = decoder.feed(data)
                if blocks:
                    conn.sendall(clean_reply(blocks[0]))
            except OSError:
                pass
            conn.close()
    daemon = threading.Thread(target=accept_later, daemon=True)
    daemon.start()
    for filler in fillers:
        filler.close()  # accepted, then seen closed

    async def main():
        sink = SpoolSink(str(tempbase))
        sink.write(b"\r\nbody\r\n")
        question = Ask([("request", "AM.PDP"), ("sender", "<a@x>")], [], sink, "test")
        links = DaemonLinks(Address("unix", path=path))
        try:
            return await DaemonCall(links, question).run()
        finally:
            links.close()
    try:
        reply = asyncio.run(main())
    finally:
        daemon.join(10)
        listener.close()
    assert reply.get("return_value") == "continue"
    assert os.listdir(tempbase) == []


def test_a_silent_mta_connection_is_closed_after_the_idle_timeout(short_tmp, tempbase,
                                                                 monkeypatch):
    from amavisd_client.milter import mta as server_module

    monkeypatch.setattr(server_module, "IDLE_TIMEOUT", 0.5)
    config = settings(short_tmp, tempbase)

    async def silent(server):
        reader, writer = await asyncio.open_unix_connection(config.listen.path)
        writer.write(b"".join(codec.encode_command(c) for c in message()[:5]))
        started = time.monotonic()
        first = await asyncio.wait_for(reader.read(100), 10)
        rest = await asyncio.wait_for(reader.read(100), 10)  # b"": closed on us
        writer.close()
        return first, rest, time.monotonic() - started, len(server.connections)
    first, rest, took, left = run_server(config, silent)
    assert first[4:5] == b"O" and rest == b"" and left == 0
    assert 0.4 <= took < 5
    assert os.listdir(tempbase) == []  # the half-begun message is gone


def test_the_idle_sweep_closes_only_silent_connections_with_no_question_open():
    """One timer for every connection: it closes the silent ones, never one
    whose daemon question is in flight (daemon_timeout bounds that) nor a
    recent one, and looks again until stopped."""
    from types import SimpleNamespace

    from amavisd_client.milter.mta import IdleSweep, MtaConnection
    from amavisd_client.milter.verdicts import Policy

    async def sweep() -> tuple[set[str], set[str]]:
        loop = asyncio.get_running_loop()
        server = SimpleNamespace(loop=loop, open_sink=None, policy=Policy(),
                                 settings=SimpleNamespace(policy_bank=""))
        named = {name: MtaConnection(server) for name in ("silent", "asking", "recent")}
        closed: set[str] = set()
        for name, connection in named.items():
            connection.close = lambda name=name: closed.add(name)
        named["silent"].last = named["asking"].last = loop.time() - 10
        named["asking"].asking = loop.create_future()  # a question in flight
        idle = IdleSweep(set(named.values()), idle=5.0)
        idle.every = 0.01
        idle.start()
        await asyncio.sleep(0.05)
        first = set(closed)
        named["recent"].last = loop.time() - 10  # silent now too: the next look closes it
        await asyncio.sleep(0.05)
        idle.stop()
        return first, closed
    first, closed = asyncio.run(sweep())
    assert first == {"silent"} and closed == {"silent", "recent"}


def test_several_messages_on_one_connection_after_abort(short_tmp, tempbase):
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply)
    config = settings(short_tmp, tempbase)
    first = message()
    commands = first[:-3] + [codec.Abort()] + first[3:] + [codec.Abort(), codec.Abort()] \
        + first[3:] + [codec.Quit()]
    try:
        replies = run_server(config, lambda s: mta_session(config.listen.path, commands, 0))
    finally:
        daemon.close()
    assert [c for c, _ in replies] == ["O", "i", "c", "i", "c"]
    assert len(daemon.requests) == 2 and os.listdir(tempbase) == []


def test_an_oversize_packet_closes_the_connection(short_tmp, tempbase, caplog):
    config = settings(short_tmp, tempbase)

    async def oversize(server):
        reader, writer = await asyncio.open_unix_connection(config.listen.path)
        writer.write(b"".join(codec.encode_command(c) for c in (
            POSTFIX_OFFER, codec.Mail(("<a@x>",)), codec.Header(b"A", b"1"))))
        first = await reader.read(100)
        writer.write(b"\x00\x10\x00\x01B" + b"x" * 1000)  # 1 MiB + 1 announced
        rest = await asyncio.wait_for(reader.read(100), 10)
        writer.close()
        return first, rest
    first, rest = run_server(config, oversize)
    assert first[4:5] == b"O" and rest == b""  # negotiated, then closed on us
    assert any("protocol error: packet of 1048577 bytes" in r.getMessage()
               for r in caplog.records)
    assert os.listdir(tempbase) == []  # the half-spooled message is gone


def test_a_peer_that_sends_and_never_reads_loses_its_connection(short_tmp, tempbase,
                                                               monkeypatch):
    """Version 2: every event gets a reply. A peer that writes a stream of
    events and reads none fills our send buffer; the connection must end
    after the idle timeout instead of waiting to drain for ever (a few of
    those would take every connection the milter serves)."""
    from amavisd_client.milter import mta as server_module

    monkeypatch.setattr(server_module, "IDLE_TIMEOUT", 1.0)
    config = settings(short_tmp, tempbase)

    async def flood(server):
        _, writer = await asyncio.open_unix_connection(config.listen.path)
        writer.write(codec.encode_command(codec.OptNeg(2, 0x3F, 0x7F))
                     + codec.encode_command(codec.Data()) * 400_000)
        deadline = time.monotonic() + 15
        while not server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert server.connections, "the milter never took the connection"
        while server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        held = len(server.connections)
        writer.transport.abort()
        return held
    assert run_server(config, flood) == 0


def test_a_spool_that_cannot_be_made_is_a_tempfail(short_tmp, tempbase):
    config = settings(short_tmp, short_tmp / "missing")
    replies = run_server(config, lambda s: mta_session(config.listen.path, message()))
    assert final(replies)[0][1].startswith(b"451 4.3.0")


# -- listeners ------------------------------------------------------------------------------


def test_a_unix_listener_gets_its_mode_and_group_before_anyone_connects(short_tmp):
    group = grp.getgrnam("amavisd-test") if os.geteuid() == 0 else None
    path = short_tmp / "m.sock"
    sock = bind(Address("unix", path=str(path)), 0o660, group.gr_name if group else "")
    try:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        if group is not None:
            assert info.st_gid == group.gr_gid
    finally:
        sock.close()
    # a stale socket is replaced, a live one or a file is not
    sock = bind(Address("unix", path=str(path)), 0o600)
    try:
        with pytest.raises(ListenError, match="another milter"):
            bind(Address("unix", path=str(path)))
    finally:
        sock.close()
    (short_tmp / "file").write_text("x")
    with pytest.raises(ListenError, match="not a socket"):
        bind(Address("unix", path=str(short_tmp / "file")))
    with pytest.raises(ListenError, match="no such group"):
        bind(Address("unix", path=str(short_tmp / "g.sock")), group="no-such-group-here")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("swap", ["symlink", "hardlink"])
def test_a_swap_at_the_socket_path_never_hands_root_s_file_away(short_tmp, monkeypatch, swap):
    """The socket's dir belongs to the user root drops to (/var/lib/amavis):
    that user (amavisd-evil here) swaps the fresh socket for a link to a file
    of root's between bind() and the chown/chmod. Named fault: the attacker
    wins that race every time (a wrapper around bind() does the swap), which
    a real race would only do now and then."""
    evil = pwd.getpwnam("amavisd-evil").pw_uid
    victim = short_tmp / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    path = short_tmp / "evil-dir" / "m.sock"
    path.parent.mkdir()
    os.chown(path.parent, evil, -1)
    real_bind = socket.socket.bind

    def bind_then_swap(sock, address):
        real_bind(sock, address)
        os.unlink(address)
        (os.symlink if swap == "symlink" else os.link)(victim, address)

    monkeypatch.setattr(socket.socket, "bind", bind_then_swap)
    try:
        bind(Address("unix", path=str(path)), 0o660, "amavisd-test", owner=evil).close()
        refused = ""
    except ListenError as err:
        refused = str(err)
    info = os.stat(victim)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert "replaced" in refused


@pytest.mark.parametrize("spelling", ["inet:127.0.0.1:{port}", "inet:{port}@127.0.0.1",
                                      "tcp:127.0.0.1:{port}"])
def test_inet_listeners_in_postfix_and_sendmail_spelling(short_tmp, tempbase, spelling):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = options.listen_address(spelling.format(port=port))
    assert (address.host, address.port) == ("127.0.0.1", port)
    config = settings(short_tmp, tempbase, listen=address)

    async def negotiate(server):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(codec.encode_command(POSTFIX_OFFER))
        data = await reader.read(100)
        writer.close()
        return data
    assert run_server(config, negotiate)[4:5] == b"O"


# -- options -------------------------------------------------------------------------------


def test_options_come_from_the_daemons_file_then_the_flags(short_tmp, monkeypatch):
    monkeypatch.delenv("AMAVISD_CONFIG", raising=False)
    conf = short_tmp / "amavisd.toml"
    conf.write_text('[daemon]\nworkdir = "/srv/amavis"\nuser = "amavis"\n'
                    '[milter]\nmilter_listen = "inet:10999@127.0.0.1"\n'
                    'milter_daemon_timeout = 120\nmilter_quarantine = ["discard"]\n'
                    'milter_on_error = "reject"\n[log]\nlog_to = ["stderr"]\n')
    s = resolve(["-c", str(conf)])
    assert (s.listen.host, s.listen.port) == ("127.0.0.1", 10999)
    assert s.daemon_socket == Address("unix", path="/srv/amavis/amavisd.sock")
    assert s.tempbase == "/srv/amavis/tmp" and s.user == "amavis"
    assert s.daemon_timeout == 120.0 and s.quarantine == {"discard"}
    assert s.on_error == "reject" and s.progress_interval == 10.0
    s = resolve(["-c", str(conf), "--listen", "unix:/run/m.sock", "--quarantine", "off",
                 "--daemon-socket", "/x/d.sock", "--tempbase", "/x/tmp", "--on-error",
                 "tempfail", "--user", ""])
    assert s.listen == Address("unix", path="/run/m.sock") and s.quarantine == frozenset()
    assert s.daemon_socket.path == "/x/d.sock" and s.tempbase == "/x/tmp"
    assert s.on_error == "tempfail" and s.user == ""


@pytest.mark.parametrize("text,error", [
    ('[milter]\nmilter_lisen = "unix:/x"\n', "unknown key milter.milter_lisen"),
    ('[milter]\nmilter_on_error = "pass"\n', "milter_on_error: must be one of"),
    ('[milter]\nmilter_quarantine = ["tempfail"]\n', "milter_quarantine"),
    ('[milter]\nmilter_socket_mode = "0666"\n', "no access for others"),
    ('[milter]\nmilter_listen = "inet:nowhere"\n', "expected unix:/path"),
    ('[milter]\nmilter_progress_interval = 0\n', "must be > 0"),
    ("[milter\n", "not valid TOML"),
])
def test_a_bad_setting_is_one_line_naming_it(short_tmp, text, error):
    conf = short_tmp / "bad.toml"
    conf.write_text(text)
    with pytest.raises(OptionError, match=error.replace("[", r"\[")):
        resolve(["-c", str(conf)])


def test_the_daemons_table_declares_the_milters_keys():
    rows = {name: s for name, s in BY_NAME.items() if s.section == "milter"}
    assert {name: s.default for name, s in rows.items()} == options.DEFAULTS
    for good in ("unix:/run/m.sock", "inet:127.0.0.1:9999", "inet:9999@localhost",
                 "inet6:9999@[::1]", "local:/m.sock"):
        rows["milter_listen"].validator(good)
        options.listen_address(good)
    for bad in ("inet:nowhere", "unix:relative", "9999"):
        with pytest.raises(ValueError):
            rows["milter_listen"].validator(bad)
        with pytest.raises(OptionError):
            options.listen_address(bad)


# -- the command line, as a process ------------------------------------------------------------


def milter_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "amavisd_client.milter.main", *args]


def test_a_bad_setting_exits_78_before_binding(short_tmp):
    proc = subprocess.run(milter_argv("-c", os.devnull, "--on-error", "pass"),
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 78 and "milter_on_error" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root")
def test_started_as_root_it_binds_then_runs_as_the_daemons_user(short_tmp):
    run = short_tmp / "run"  # the milter's own dir, as /var/lib/amavis is amavis's
    run.mkdir()
    os.chown(run, pwd.getpwnam("amavisd-test").pw_uid, -1)
    sock, pidfile = run / "m.sock", short_tmp / "milter.pid"
    proc = subprocess.Popen(milter_argv(
        "-c", os.devnull, "--foreground", "--log", "stderr", "--listen", f"unix:{sock}",
        "--socket-group", "amavisd-test", "--user", "amavisd-test",
        "--daemon-socket", str(short_tmp / "d.sock"), "--tempbase", str(short_tmp),
        "--pidfile", str(pidfile)), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert int(pidfile.read_text()) == proc.pid
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        user = grp.getgrnam("amavisd-test")
        assert set(uid_line.split()[1:]) == {str(os.stat(sock).st_uid)} != {"0"}
        assert os.stat(sock).st_gid == user.gr_gid
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert not sock.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv (util-linux)")
def test_it_starts_with_no_more_capabilities_than_its_systemd_unit_grants(short_tmp):
    """init/amavisd-milter.service bounds root to CapabilityBoundingSet: the
    socket's mode must be set while root owns it (a chmod after the chown
    to amavis needs CAP_FOWNER, and the milter would never start)."""
    unit = (Path(ROOT) / "init" / "amavisd-milter.service").read_text()
    [caps] = [line.split("=", 1)[1].split() for line in unit.splitlines()
              if line.startswith("CapabilityBoundingSet=")]
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    run = short_tmp / "run"
    run.mkdir()
    os.chown(run, pwd.getpwnam("amavisd-test").pw_uid, -1)
    sock, pidfile = run / "m.sock", run / "milter.pid"
    proc = subprocess.Popen(
        ["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", "--no-new-privs",
         *milter_argv("-c", os.devnull, "--foreground", "--log", "stderr",
                      "--listen", f"unix:{sock}", "--socket-group", "amavisd-test",
                      "--user", "amavisd-test", "--daemon-socket", str(short_tmp / "d.sock"),
                      "--tempbase", str(short_tmp), "--pidfile", str(pidfile))],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None and not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1]
        info = os.stat(sock)
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (
            pwd.getpwnam("amavisd-test").pw_uid, 0o660)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


@pytest.mark.parametrize("planted", ["hardlink", "fifo"])
def test_the_pid_file_never_opens_what_the_milter_s_user_left_at_its_name(short_tmp, planted):
    """Root writes the pid file in a dir the milter's user owns (the LSB
    script's /run/amavisd-milter): that user planted a hard link to a file of
    root's (which O_TRUNC would have emptied) or a FIFO (which would have
    blocked the start for good)."""
    victim = short_tmp / "precious"
    victim.write_text("root's data\n")
    pidfile = short_tmp / "milter.pid"
    if planted == "hardlink":
        os.link(victim, pidfile)
    else:
        os.mkfifo(pidfile)
    code = ("import os, sys; from amavisd_client.milter.main import write_pidfile; "
            "write_pidfile(sys.argv[1]); print(os.getpid())")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(pidfile)], cwd=ROOT,
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("writing the pid file blocked on a planted FIFO")
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "root's data\n"
    assert stat.S_ISREG(os.lstat(pidfile).st_mode) and os.stat(pidfile).st_nlink == 1
    assert pidfile.read_text() == done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the init script drops to a user: needs root")
def test_the_lsb_init_script_starts_reports_and_stops_the_milter(short_tmp):
    launcher = short_tmp / "amavisd-milter"
    launcher.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
                        "-m amavisd_client.milter.main \"$@\"\n")
    launcher.chmod(0o755)
    run = short_tmp / "run"
    env = dict(os.environ, DAEMON=str(launcher), CONFIG=os.devnull,
               PIDFILE=str(run / "amavisd-milter.pid"), MILTER_USER="amavisd-test",
               AMAVISD_MILTER_DEFAULTS="/nonexistent",
               MILTER_ARGS=f"--listen unix:{run}/m.sock --daemon-socket {short_tmp}/d.sock "
                           f"--tempbase {short_tmp}")
    script = [str(Path(ROOT) / "init" / "amavisd-milter")]

    def init(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", *script, action], env=env, capture_output=True,
                              text=True, timeout=60)
    started = init("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = init("status")
        assert status.returncode == 0 and "is running" in status.stdout
        pid = int((run / "amavisd-milter.pid").read_text())
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam("amavisd-test").pw_uid
        assert stat.S_ISSOCK(os.stat(run / "m.sock").st_mode)
        assert init("start").returncode == 0  # already running: nothing to do
    finally:
        stopped = init("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert init("status").returncode == 3
    assert not (run / "m.sock").exists()


def test_commands_sent_while_the_daemon_is_asked_wait_in_the_kernel(short_tmp, tempbase):
    """Reading goes on while the daemon is asked (a pause and a resume a message
    cost two epoll_ctl calls), but the first bytes that arrive meanwhile pause
    it: an MTA that streams 8 MiB during a slow scan leaves at most one read
    with us, and every command is still served after the verdict."""
    from amavisd_client.milter.mta import READ_BUFFER

    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply, delay=1.0)
    config = settings(short_tmp, tempbase)
    chunk = codec.encode_command(codec.Body(b"x" * 65_000))

    async def flood(server):
        reader, writer = await asyncio.open_unix_connection(config.listen.path)
        writer.write(b"".join(codec.encode_command(c) for c in message()))
        await asyncio.sleep(0.3)  # the daemon is asked now
        writer.write(b"".join(codec.encode_command(c) for c in message()[3:-3]))
        writer.write(chunk * 128)  # the next message's body: 8 MiB
        writer.write(b"".join(codec.encode_command(c) for c in message()[-2:]))
        await asyncio.sleep(0.5)
        (connection,) = server.connections
        held = connection.session.decoder.framer.pending + sum(
            len(getattr(c, "data", b"")) for c in connection.session.queue)
        await writer.drain()
        framer, got = Framer(), []
        while sum(1 for code, _ in got if code in FINAL) < 2:
            got += framer.feed(await asyncio.wait_for(reader.read(65536), 20))
        writer.close()
        return held, got
    try:
        held, got = run_server(config, flood)
    finally:
        daemon.close()
    assert held <= READ_BUFFER
    assert [chr(code) for code, _ in got if code in FINAL] == ["c", "c"]
    assert len(daemon.spooled[1][0]) > 128 * 65_000
