"""Hostile review of 10a7c72 (a connection's spool emptied and kept for its
next message): no message, checked or forwarded, may carry a byte of
another's, whatever ended the one before (refusal, failure, abort, drop,
timeout); the kept file never outlives its connection; and it is kept only
when the pipeline could not have mapped it (read_message's threshold)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from amavisd.decode import window
from amavisd.pipeline import read_message
from amavisd.protocol.loop import ConnectionLimits
from amavisd.protocol.smtp import SMTPSession
from amavisd.protocol.smtpfilter import Transaction
from amavisd.verdict import Category, Destiny, Result
from tests.rigs.nexthop import NextHop
from tests.unit.test_smtp_listen import bdat, drive, serve_in_thread, spools_open, stand_in

ENVELOPE = b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"


def body(tag: bytes, size: int) -> bytes:
    """A message of about `size` bytes whose every line names it."""
    line = b"line of " + tag + b" " + b"x" * 60 + b"\r\n"
    return b"Subject: " + tag + b"\r\n\r\n" + line * max(1, size // len(line))


def data(message: bytes) -> bytes:
    return ENVELOPE + b"DATA\r\n" + message + b".\r\n"


def test_each_ending_leaves_nothing_for_the_next_message(tmp_path):
    """Long, then refused as too big mid-DATA (552), then a BDAT refused as
    too big, then RSET mid-transaction, then short ones by DATA and BDAT, a
    pipelined group: each spool holds only its own message's bytes."""
    handler = stand_in(tmp_path, max_message_size=120_000)
    long, huge, short = body(b"LONG", 100_000), body(b"HUGE", 200_000), body(b"S", 10)
    wire = (b"EHLO mta.test\r\n" + data(long) + data(huge)
            + ENVELOPE + bdat(b"Subject: b\r\n\r\n" + b"z" * 100) + bdat(b"z" * 130_000, last=True)
            + ENVELOPE + b"RSET\r\n" + data(short)
            + ENVELOPE + bdat(b"Subject: c\r\n\r\n", last=True) + data(b"") + b"QUIT\r\n")
    replies = drive(handler, wire, [7000] * 80)
    assert [r[:3] for r in replies if r[:3] in (b"552", b"221")] == [b"552", b"552", b"221"]
    assert handler.spooled == [long, short, b"Subject: c\r\n\r\n", b""]


def test_lmtp_each_message_its_own_bytes(tmp_path):
    handler = stand_in(tmp_path)
    long, short = body(b"LONG", 50_000), body(b"S", 10)
    wire = b"LHLO mta.test\r\n" + data(long) + data(short) + b"QUIT\r\n"
    drive(handler, wire, lmtp=True)
    assert handler.spooled == [long, short]


class Failing:
    """A stand-in whose pipeline fails as told for the first message: a
    tempfail verdict, or an exception (an internal error: 421)."""

    def __init__(self, inner, how: str):
        self.inner, self.how, self.calls = inner, how, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def handle_message(self, job):
        self.calls += 1
        result = self.inner.handle_message(job)
        if self.calls == 1 and self.how == "raise":
            raise RuntimeError("the pipeline broke")
        if self.calls == 1:
            return Result(log_id=job.log_id, category=Category.CLEAN, destiny=Destiny.TEMPFAIL)
        return result


@pytest.mark.parametrize("how", ["tempfail", "raise"])
def test_a_failed_check_leaves_nothing_behind(tmp_path, how):
    handler = Failing(stand_in(tmp_path), how)
    long, short = body(b"LONG", 100_000), body(b"S", 10)
    replies = drive(handler, b"EHLO mta.test\r\n" + data(long) + data(short) + b"QUIT\r\n")
    if how == "raise":  # the 421 closes the connection: the kept spool went with it
        assert replies[-1].startswith(b"421") and handler.inner.spooled == [long]
    else:
        assert replies[-2].startswith(b"250") and handler.inner.spooled == [long, short]


def test_the_next_hop_gets_only_each_messages_bytes_after_a_failed_forward(tmp_path):
    """Forwarded straight from the spool to its end (no header edit: the
    spool itself is read until EOF), after a longer message, and after a
    forward the next hop refused at DATA (451): only the message's bytes."""
    long, short, third = body(b"LONG", 150_000), body(b"S", 10), body(b"T", 3000)
    with NextHop(rcpt_replies={"fail@b.test": "451 4.3.0 try later"}) as hop:
        handler = stand_in(tmp_path, forward=hop.spec, destiny=Destiny.PASS)
        wire = (b"EHLO mta.test\r\n" + data(long)
                + b"MAIL FROM:<a@example.test>\r\nRCPT TO:<fail@b.test>\r\nDATA\r\n"
                + body(b"REFUSED", 60_000) + b".\r\n" + data(short) + data(third) + b"QUIT\r\n")
        replies = drive(handler, wire, [9000] * 40)
        got = hop.wait(3)
    finals = [r[:3] for r in replies if r.startswith(b"451") or b"from MTA" in r]
    assert finals == [b"250", b"451", b"250", b"250"]
    assert [m.data for m in got] == [long, short, third]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_left_after_many_connections(tmp_path):
    """A hostile client's 300 connections, each one message then gone: with
    QUIT, dropped right after the reply, dropped mid-way through its next
    DATA (the kept spool taken): the worker holds no more files after them."""
    handler = stand_in(tmp_path)
    message = data(body(b"M", 2000))
    endings = [b"QUIT\r\n", b"", ENVELOPE + b"DATA\r\nSubject: cut\r\n"]
    drive(handler, b"EHLO mta.test\r\n" + message + b"QUIT\r\n")  # first-use imports, logging
    before = fds()
    for n in range(300):
        drive(handler, b"EHLO mta.test\r\n" + message + endings[n % 3])
    assert fds() == before and not spools_open(handler.config.work_base_path)
    assert len(handler.spooled) == 301


def test_a_connection_timing_out_mid_data_closes_the_kept_spool(tmp_path):
    handler = stand_in(tmp_path, smtp_idle_timeout=0.6, smtp_data_timeout=0.6)
    ours, theirs = socket.socketpair()
    session = SMTPSession(ours, handler)
    thread = serve_in_thread(session, ConnectionLimits())
    theirs.settimeout(10)
    reader = theirs.makefile("rb")
    theirs.sendall(b"EHLO mta.test\r\n" + data(body(b"ONE", 1000)))
    while not reader.readline().startswith(b"250 2.7.0"):  # DISCARD's reply
        pass
    assert session.spare is not None  # kept for the next message
    theirs.sendall(ENVELOPE + b"DATA\r\nSubject: two\r\n")  # then silence
    started = time.monotonic()
    said = reader.read()
    thread.join(10)
    theirs.close()
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert said.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")  # then hung up on
    assert session.spare is None
    assert not spools_open(handler.config.work_base_path)


@pytest.mark.parametrize("size", [window.MAP_ABOVE - 1, window.MAP_ABOVE, window.MAP_ABOVE + 1])
def test_kept_only_when_read_message_did_not_map_it(tmp_path, size):
    """The reuse is safe only because a kept spool was never mapped: tie the
    two thresholds (pipeline.read_message maps, close_spool keeps) together,
    so moving either one alone fails here."""
    transaction = Transaction("a@example.test", {}, {})
    transaction.open_spool(str(tmp_path))(b"x" * size)
    raw = read_message(transaction.spool.fileno(), "spool", 10 * window.MAP_ABOVE)
    mapped = window.mapped(raw)
    if mapped:
        window.close(raw)
    spare = transaction.close_spool(keep=True)
    assert (spare is None) == mapped
    assert mapped == (size > window.MAP_ABOVE)
    if spare is not None:
        assert os.fstat(spare.fileno()).st_size == 0 and spare.tell() == 0
        spare.close()


def test_the_kept_spool_is_nameless_private_and_not_inherited(tmp_path):
    """Between messages the kept file is what a spool was: no name (nlink 0),
    0600, ours, close-on-exec, empty (the real work base's 0700:
    tests/integration/test_smtp_filter.py)."""
    handler = stand_in(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        session = SMTPSession(ours, handler)
        session.receive(b"EHLO mta.test\r\n" + data(b"Subject: a\r\n\r\nsecret\r\n"))
        while session.request_ready():
            session.answer()
        spare = session.spare
        st = os.fstat(spare.fileno())
        assert st.st_nlink == 0 and st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
        assert st.st_size == 0 and not os.get_inheritable(spare.fileno())
        session.finish()
        assert spare.closed
    finally:
        ours.close()
        theirs.close()


def test_a_spool_that_filled_up_is_not_kept(tmp_path, monkeypatch):
    """The disk fills mid-message on a kept spool (its bytes partly in):
    451, that file closed, the next message on a new file with only its own."""
    write = Transaction._write

    def filling(self, chunk: bytes) -> None:
        write(self, chunk)
        if b"FULL" in chunk:
            self.spool_error = OSError(28, "No space left on device")
    monkeypatch.setattr(Transaction, "_write", filling)
    handler = stand_in(tmp_path)
    one, full, three = body(b"ONE", 5000), body(b"FULL", 20_000), body(b"THREE", 100)
    ours, theirs = socket.socketpair()
    try:
        session = SMTPSession(ours, handler)
        spares, replies = [], []
        session.receive(b"EHLO mta.test\r\n")
        session.answer()
        for message in (one, full, three):
            session.receive(data(message))
            while session.request_ready():
                replies.append(session.answer())
            spares.append(session.spare)
        session.finish()
        assert not spools_open(handler.config.work_base_path)
    finally:
        ours.close()
        theirs.close()
    said = b"\r\n" + b"".join(replies)
    assert said.count(b"\r\n451 ") == 1 and said.count(b"\r\n250 2.7.0") == 2  # 2 discarded
    assert spares[0] is not None and spares[1] is None and spares[2] is not None
    assert spares[2] is not spares[0] and spares[0].closed
    assert handler.spooled == [one, three]
