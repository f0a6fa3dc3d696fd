"""A connection's spool serves its next message: emptied
at the end of each, so no message ever sees another's bytes; a message big
enough to be mapped, or one whose spool failed, gets a new file after it."""

from __future__ import annotations

import errno
import os
import socket

from amavisd.decode import window
from amavisd.protocol.smtp import SMTPSession
from amavisd.protocol.smtpfilter import Transaction
from tests.unit.test_smtp_listen import HELLO, bdat, drive, spools_open, stand_in


def data(body: bytes) -> bytes:
    return b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n" + body \
        + b".\r\n"


def test_each_message_spools_only_its_own_bytes_on_a_reused_spool(tmp_path):
    long, short = b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n", b"Subject: s\r\n\r\nhi\r\n"
    wire = (b"EHLO mta.test\r\n" + data(long) + data(short) + HELLO[15:]
            + bdat(b"Subject: c\r\n\r\n", last=True) + data(b"") + b"QUIT\r\n")
    handler = stand_in(tmp_path)
    replies = drive(handler, wire)  # drive checks that finish() leaves no spool open
    assert handler.spooled == [long, short, b"Subject: c\r\n\r\n", b""]
    assert replies[-1] == b"221 2.0.0 Bye"


def run_messages(handler, bodies: list[bytes]) -> list[object]:
    """The spare spool after each message, on one connection."""
    ours, theirs = socket.socketpair()
    spares = []
    try:
        session = SMTPSession(ours, handler)
        session.receive(b"EHLO mta.test\r\n")
        session.answer()
        for body in bodies:
            session.receive(data(body))
            while session.request_ready():
                session.answer()
            spares.append(session.spare)
            if session.spare is not None:
                assert os.fstat(session.spare.fileno()).st_size == 0  # emptied at once
                assert session.spare.tell() == 0
        session.finish()
        assert session.spare is None and not spools_open(handler.config.work_base_path)
    finally:
        ours.close()
        theirs.close()
    return spares


def test_the_same_file_serves_and_a_mappable_message_is_not_kept(tmp_path):
    handler = stand_in(tmp_path, max_message_size=4 * window.MAP_ABOVE)
    big = b"Subject: big\r\n\r\n" + b"y" * window.MAP_ABOVE + b"\r\n"
    first, second, after_big, again = run_messages(handler, [b"a\r\n", b"b\r\n", big, b"c\r\n"])
    assert first is not None and second is first
    assert after_big is None and again is not None
    assert handler.spooled == [b"a\r\n", b"b\r\n", big, b"c\r\n"]


def test_a_spool_that_failed_or_cannot_be_emptied_is_closed(tmp_path):
    failed = Transaction("a@example.test", {}, {})
    failed.open_spool(str(tmp_path))
    failed.spool_error = OSError(errno.ENOSPC, "full")
    spool = failed.spool
    assert failed.close_spool(keep=True) is None and spool.closed

    class NoTruncate:  # a real file's descriptor, a truncate that fails (EIO)
        closed = False

        def __init__(self, fd: int):
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

        def truncate(self, size):
            raise OSError(errno.EIO, "no")

        def close(self):
            os.close(self.fd)
            self.closed = True

    stuck = Transaction("a@example.test", {}, {})
    stuck.spool = NoTruncate(os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600))
    assert stuck.close_spool(keep=True) is None and stuck.spool is None
    plain = Transaction("a@example.test", {}, {})
    plain.open_spool(str(tmp_path))
    spool = plain.spool
    assert plain.close_spool() is None and spool.closed


def test_a_kept_spool_is_taken_before_a_new_file(tmp_path):
    first = Transaction("a@example.test", {}, {})
    first.open_spool(str(tmp_path))(b"secret")
    spare = first.close_spool(keep=True)
    assert spare is not None and os.pread(spare.fileno(), 100, 0) == b""
    second = Transaction("a@example.test", {}, {})
    second.open_spool(str(tmp_path), spare)(b"next")
    assert second.spool is spare and os.pread(spare.fileno(), 100, 0) == b"next"
    second.close_spool()


def test_quit_closes_the_kept_spool_before_its_reply(tmp_path):
    handler = stand_in(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        session = SMTPSession(ours, handler)
        session.receive(b"EHLO mta.test\r\n" + data(b"a\r\n"))
        while session.request_ready():
            session.answer()
        assert session.spare is not None and spools_open(handler.config.work_base_path)
        session.receive(b"QUIT\r\n")
        assert session.answer() == b"221 2.0.0 Bye\r\n"
        assert session.spare is None and not spools_open(handler.config.work_base_path)
    finally:
        ours.close()
        theirs.close()
