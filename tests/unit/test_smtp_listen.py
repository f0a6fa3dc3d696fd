"""Where the SMTP/LMTP listeners listen, who may talk to them, and what a
session makes of BDAT (RFC 3030 CHUNKING).

The BDAT tests drive the session as the loop does (receive / request_ready /
answer), the wire cut into pieces anywhere, or through the loop itself
(`protocol.loop.serve`) where its clock and request count matter. The
pipeline is stood in for (tests/rigs/smtp_standin.py: the framing is what
is tested, so it keeps the bytes it was handed and gives the destiny it is
told); the next
hop, where a message passes, is a real one (tests/rigs/nexthop.py).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest

from amavisd import config as configuration
from amavisd.actions.methods import ListenSpec, parse_listen
from amavisd.config import ConfigError
from amavisd.listeners import ListenerError, bind_all, bind_smtp, describe
from amavisd.protocol import registry
from amavisd.protocol.loop import ConnectionLimits, serve
from amavisd.protocol.smtp import LMTPSession, SMTPSession, allowed
from amavisd.verdict import Destiny
from tests.rigs.nexthop import NextHop
from tests.rigs.postfix import free_port
from tests.rigs.smtp_standin import StandIn


@pytest.mark.parametrize("spec, parsed", [
    ("127.0.0.1:10024", ListenSpec("smtp", "127.0.0.1", 10024)),
    ("smtp:[::1]:24", ListenSpec("smtp", "::1", 24)),
    ("lmtp:127.0.0.1:10024", ListenSpec("lmtp", "127.0.0.1", 10024)),
    ("unix:/run/amavisd/smtp.sock", ListenSpec("smtp", path="/run/amavisd/smtp.sock")),
    ("lmtp:unix:/run/amavisd/lmtp.sock", ListenSpec("lmtp", path="/run/amavisd/lmtp.sock")),
])
def test_listen_spellings(spec, parsed):
    assert parse_listen(spec) == parsed


@pytest.mark.parametrize("key, value, said", [
    ("smtp_listen", ["10024"], "use [smtp:|lmtp:]HOST:PORT"),
    ("smtp_listen", ["unix:relative"], "unix:/absolute/path"),
    ("smtp_listen", ["127.0.0.1:10024", "lmtp:127.0.0.1:10024"], "listed twice"),
    ("smtp_allow", ["localhost"], "not an address or network"),
    ("forward_method", "lmtp:unix:x", "lmtp:unix:/absolute/path"),
])
def test_bad_settings_are_one_line_naming_the_key(key, value, said):
    with pytest.raises(ConfigError, match=re.escape(said)) as caught:
        configuration.load(None, {key: value})
    named = {"smtp_listen": "--smtp-listen", "forward_method": "--forward"}.get(key, key)
    assert str(caught.value).startswith(named) and "\n" not in str(caught.value)


def test_the_protocols_are_registered():
    assert registry.session_class("smtp") is SMTPSession
    assert registry.session_class("lmtp") is LMTPSession


def test_only_loopback_unless_asked(short_tmp):
    cfg = configuration.load(None, {"workdir": str(short_tmp)})
    with pytest.raises(ListenerError, match="smtp_listen_remote"):
        bind_smtp(f"0.0.0.0:{free_port()}", cfg)
    listener = bind_smtp(f"0.0.0.0:{free_port()}", cfg.replace(smtp_listen_remote=True))
    try:
        assert listener.protocol == "smtp" and describe(listener).startswith("smtp:tcp:0.0.0.0:")
    finally:
        listener.close()


def test_a_listener_that_cannot_bind_leaves_no_socket_behind(short_tmp):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cfg = configuration.load(None, {"workdir": str(short_tmp),
                                        "smtp_listen": [f"lmtp:unix:{short_tmp}/l.sock",
                                                        f"127.0.0.1:{port}"]})
        with pytest.raises(ListenerError, match="cannot bind"):
            bind_all(cfg)
    assert not (short_tmp / "amavisd.sock").exists() and not (short_tmp / "l.sock").exists()


@pytest.mark.parametrize("peer, networks, ok", [
    ("127.0.0.1", ["127.0.0.0/8", "::1"], True),
    ("::1", ["127.0.0.0/8", "::1"], True),
    ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
    ("192.0.2.1", ["127.0.0.0/8", "::1"], False),
    ("192.0.2.1", ["192.0.2.0/24"], True),
    ("", [], True),  # a Unix socket: its mode decides
    ("not an address", ["0.0.0.0/0"], False),
])
def test_smtp_allow(peer, networks, ok):
    assert allowed(peer, networks) is ok


# -- BDAT --------------------------------------------------------------------------------


def stand_in(base, forward: str = "smtp:[127.0.0.1]:9", destiny=Destiny.DISCARD,
             **settings) -> StandIn:
    """The shared stand-in (tests/rigs/smtp_standin.py); here a message is
    discarded unless a test says otherwise, so no next hop is needed."""
    return StandIn.at(base, forward=forward, destiny=destiny, **settings)


class Driven(list):
    """Reply lines after the greeting; `.answers` how many answer() calls gave them."""

    answers = 0
    closing = False


def drive(handler: StandIn, wire: bytes, cuts=(), lmtp: bool = False) -> Driven:
    """The replies to `wire` fed in pieces of `cuts` bytes, then the rest."""
    ours, theirs = socket.socketpair()
    try:
        session = (LMTPSession if lmtp else SMTPSession)(ours, handler)
        out, pos, answers = [session.greeting()], 0, 0
        for cut in [*cuts, len(wire)]:
            piece, pos = wire[pos:pos + cut], pos + cut
            if piece and not session.closing:
                session.receive(piece)
            while session.request_ready() and not session.closing:
                out.append(session.answer())
                answers += 1
        session.finish()
        assert not spools_open(handler.config.work_base_path)
        driven = Driven(b"".join(out).split(b"\r\n")[1:-1])
        driven.answers, driven.closing = answers, session.closing
        return driven
    finally:
        ours.close()
        theirs.close()


def spools_open(work: str) -> list[str]:
    """Files of this process in `work`: the spool is anonymous, so it shows only here."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [t for t in targets if t.startswith(work + "/")]


def bdat(octets: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(octets), b" LAST" if last else b"") + octets


HELLO = b"EHLO mta.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
# what no chunk may be taken for: the DATA end, dot lines, bare line ends, commands
CHUNKS = [b"Subject: chunks\r\n\r\n.\r\n..x\r\n", b"bare\nlf\rcr\r\nBDAT 9 LAST\r\n",
          b"QUIT\r\n\x00\xff no CRLF at the end"]


def codes(replies: list[bytes]) -> list[bytes]:
    return [line[:3] for line in replies if line[3:4] == b" "]


def test_chunks_are_spooled_raw_whatever_the_cuts(tmp_path):
    wire = HELLO + bdat(CHUNKS[0]) + bdat(CHUNKS[1]) + bdat(CHUNKS[2], last=True) + b"QUIT\r\n"
    for cut in range(1, len(wire), 7):
        for size in (1, 5, 64):
            handler = stand_in(tmp_path)
            replies = drive(handler, wire, [cut] + [size] * (len(wire) // size))
            assert handler.spooled == [b"".join(CHUNKS)], (cut, size)
            assert replies[-4:] == [b"250 2.0.0 %d octets received" % len(CHUNKS[0]),
                                    b"250 2.0.0 %d octets received" % len(CHUNKS[1]),
                                    b"250 2.7.0 Ok, discarded, id=9-01 - CLEAN",
                                    b"221 2.0.0 Bye"], (cut, size)
            assert replies.closing


def test_pipelined_chunks_are_answered_in_one_go_and_zero_is_a_size(tmp_path):
    handler = stand_in(tmp_path)
    wire = HELLO + bdat(b"") + bdat(b"x") + bdat(b"") + bdat(b"", last=True) + b"NOOP\r\n"
    replies = drive(handler, wire)
    assert replies[-5:] == [b"250 2.0.0 0 octets received", b"250 2.0.0 1 octets received",
                            b"250 2.0.0 0 octets received",
                            b"250 2.7.0 Ok, discarded, id=9-01 - CLEAN", b"250 2.0.0 Ok"]
    assert codes(replies) == [b"250"] * 8
    # EHLO to the message in one answer, then the NOOP: a message ends an answer
    assert replies.answers == 2 and handler.spooled == [b"x"] and not replies.closing
    handler = stand_in(tmp_path)
    replies = drive(handler, HELLO + b"BDAT 0 LAST\r\n")  # an empty message is one
    assert handler.spooled == [b""] and replies[-1].startswith(b"250 2.7.0")


def test_a_message_past_max_message_size_is_refused_and_the_stream_stays_in_step(tmp_path):
    handler = stand_in(tmp_path, max_message_size=100)
    wire = (HELLO + bdat(b"a" * 60) + bdat(b"b" * 41 + b"\r\nNOOP\r\n") + bdat(b"c", last=True)
            + b"NOOP\r\n")
    replies = drive(handler, wire, [30] * 20)
    assert replies[-4:] == [b"250 2.0.0 60 octets received",
                            b"552 5.3.4 Error: message file too big",
                            b"503 5.5.1 Error: need MAIL command",  # the pipelined rest: read
                            b"250 2.0.0 Ok"]
    assert handler.spooled == [] and not replies.closing
    # with LMTP a refused last chunk is answered for each recipient, as after DATA
    wire = (b"LHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@b.test>\r\nRCPT TO:<d@b.test>\r\n"
            + bdat(b"z" * 101, last=True) + b"NOOP\r\n")
    replies = drive(handler, wire, lmtp=True)
    assert replies[-3:] == [b"552 5.3.4 Error: message file too big"] * 2 + [b"250 2.0.0 Ok"]


def test_bdat_out_of_sequence_is_503_and_its_octets_are_still_read(tmp_path):
    handler = stand_in(tmp_path)
    mail = b"MAIL FROM:<a@example.test>\r\n"
    wire = (b"EHLO x\r\n" + bdat(b"NOOP\r\n") + mail + bdat(b"RSET\r\n", last=True)
            + b"RCPT TO:<b@example.test>\r\n" + b"NOOP\r\n")
    replies = drive(handler, wire)
    assert replies[-5:] == [b"503 5.5.1 Error: need MAIL command", b"250 2.1.0 Ok",
                            b"503 5.5.1 Error: no valid recipients",
                            b"503 5.5.1 Error: need MAIL command",  # the refusal reset it
                            b"250 2.0.0 Ok"]
    wire = HELLO + bdat(b"part") + b"RCPT TO:<c@example.test>\r\nDATA\r\nNOOP\r\n" + bdat(b"x")
    replies = drive(handler, wire)
    assert replies[-5:] == [b"250 2.0.0 4 octets received", b"503 5.5.1 Error: RCPT after BDAT",
                            b"503 5.5.1 Error: DATA after BDAT", b"250 2.0.0 Ok",
                            b"503 5.5.1 Error: need MAIL command"]  # DATA ended the transaction
    assert handler.spooled == [] and not replies.closing


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 5 FIRST", b"BDAT 1e3",
                                  b"BDAT 99999999999999999999999 LAST"])
def test_a_count_we_cannot_read_is_501_and_we_hang_up(tmp_path, line):
    handler = stand_in(tmp_path)
    replies = drive(handler, HELLO + line + b"\r\nhello\r\nNOOP\r\n")
    assert replies[-1] == b"501 5.5.4 Syntax: BDAT count [LAST]" and replies.closing
    assert handler.spooled == []


def test_chunking_is_offered_and_lmtp_answers_each_recipient_after_the_last_chunk(tmp_path):
    with NextHop(lmtp=True, rcpt_replies={"d@b.test": "550 5.1.1 no such user"}) as hop:
        handler = stand_in(tmp_path, forward=hop.spec, destiny=Destiny.PASS)
        wire = (b"LHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@b.test>\r\nRCPT TO:<d@b.test>\r\n"
                + bdat(CHUNKS[0]) + bdat(CHUNKS[1], last=True) + b"QUIT\r\n")
        replies = drive(handler, wire, [40] * 10, lmtp=True)
        [message] = hop.wait(1)
    assert b"250-CHUNKING" in replies
    assert codes(replies)[-4:] == [b"250", b"250", b"550", b"221"]
    assert replies[-3].endswith(b"250 2.0.0 Ok: delivered") and b"no such user" in replies[-2]
    # forwarded by DATA, the bare LF as CRLF, as any message is (actions.smtpdata)
    assert message.data == CHUNKS[0] + CHUNKS[1].replace(b"bare\n", b"bare\r\n")
    assert message.delivered_to == ["c@b.test"] and "DATA" in hop.commands
    assert not any(c.startswith("BDAT") for c in hop.commands)


def test_a_client_gone_mid_chunk_leaves_no_spool(tmp_path):
    handler = stand_in(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        session = SMTPSession(ours, handler)
        session.receive(HELLO + bdat(b"whole") + b"BDAT 100 LAST\r\nhalf")
        while session.request_ready():
            session.answer()
        assert session.mid_request() and not session.request_ready()
        [spool] = spools_open(handler.config.work_base_path)
        assert spool.endswith("(deleted)") and os.listdir(handler.config.work_base_path) == []
        session.finish()  # the loop's, when the client is gone
        assert not spools_open(handler.config.work_base_path) and handler.spooled == []
    finally:
        ours.close()
        theirs.close()


def serve_in_thread(session, limits: ConnectionLimits) -> threading.Thread:
    def serve_then_close():  # as the worker does
        serve(session, limits)
        session.conn.close()

    thread = threading.Thread(target=serve_then_close, daemon=True)
    thread.start()
    return thread


def test_smtp_data_timeout_runs_across_all_the_chunks(tmp_path):
    """Each chunk within smtp_idle_timeout, the sequence longer than smtp_data_timeout."""
    handler = stand_in(tmp_path, smtp_idle_timeout=5.0, smtp_data_timeout=1.5)
    ours, theirs = socket.socketpair()
    session = SMTPSession(ours, handler)
    thread = serve_in_thread(session, ConnectionLimits())
    theirs.settimeout(10)
    reader = theirs.makefile("rb")
    theirs.sendall(HELLO)
    started = time.monotonic()
    said = []
    try:
        for _ in range(8):
            theirs.sendall(bdat(b"x" * 10))
            time.sleep(0.4)
    except OSError:
        pass  # hung up on
    said = reader.read()
    thread.join(10)
    theirs.close()
    assert b"250 2.0.0 10 octets received" in said
    assert 1.4 < time.monotonic() - started < 4.0 and not thread.is_alive()
    assert handler.spooled == [] and not spools_open(handler.config.work_base_path)


def test_chunks_mid_message_do_not_count_as_requests(tmp_path):
    """A message in more chunks than max_connection_requests, a reply awaited
    for each (no pipelining), passes; the connection ends at a message's end."""
    handler = stand_in(tmp_path, max_connection_requests=12)  # EHLO MAIL RCPT LAST + 8 held
    ours, theirs = socket.socketpair()
    session = SMTPSession(ours, handler)
    thread = serve_in_thread(session, ConnectionLimits.from_config(handler.config))
    theirs.settimeout(10)
    reader = theirs.makefile("rb")
    reader.readline()
    for line in HELLO.split(b"\r\n")[:-1]:
        theirs.sendall(line + b"\r\n")
        while reader.readline()[3:4] == b"-":
            pass
    for n in range(50):
        theirs.sendall(bdat(b"%02d\r\n" % n, last=n == 49))
        assert reader.readline().startswith(b"250 2."), n
    assert reader.readline() == b""  # and the worker is free for the next connection
    thread.join(10)
    theirs.close()
    assert handler.spooled == [b"".join(b"%02d\r\n" % n for n in range(50))]
