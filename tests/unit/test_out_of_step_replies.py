"""Replies out of step and retries that must not repeat a side effect
(found by a hostile review; each test failed on the code before its fix):

1. The AM.PDP client asks a check again when a kept connection ends before
   any byte of the reply -- also when the worker had read the request and
   died on it without last words (a crash in C code, SIGKILL after a hang
   where the ABRT handler could not run, the OOM killer): the message then
   takes a second worker, and a quarantine copy made before the reply is
   made twice.
2. A refusal at the end of DATA with more bytes behind it (a stray line
   read in place of the hop's answer) is believed: it bounces mail the hop
   may have taken.
3. Without PIPELINING, a transaction abandoned in DATA is ended with a
   QUIT inside the content, which waits QUIT_TIMEOUT for no reply.
4. ClamdScanner's own default timeout is still 120 s.
"""

from __future__ import annotations

import errno
import io
import socket
import time

import pytest

from amavisd import config as configuration
from amavisd.actions.forward import ForwardError, forwarder
from amavisd.actions.smtpsession import QUIT_TIMEOUT
from amavisd.scan.clamd import ClamdScanner
from amavisd_client.connection import ClientError, Connection, check
from amavisd_client.wire.ampdp import encode_block
from tests.rigs.nexthop import EXTENSIONS, NextHop
from tests.unit.test_client import OneVerdictServer, spelling  # noqa: F401 (a fixture)
from tests.unit.test_smtpout_reuse import WITHOUT_PIPELINING, settled

MESSAGE = b"Subject: test\r\n\r\nbody\r\n"


class ReadThenDying(OneVerdictServer):
    """A named fake for a worker that dies on a message without last words
    (a real daemon does so only on a crash or a SIGKILL): the
    first request of a connection is answered, the second is read whole and
    the connection ends without a byte of the reply."""

    def talk(self, conn: socket.socket) -> None:
        self.read_one(conn)
        conn.sendall(encode_block([("return_value", "continue")]))
        self.read_one(conn)


def test_a_check_the_worker_read_and_died_on_is_not_asked_again(spelling):  # noqa: F811
    """The worker took the whole request: it may have acted on it (the
    quarantine comes before the reply), or the message kills workers. Only
    a connection reset (our request unread when the worker closed) says the
    daemon never saw it."""
    family, bind_to, spelled = spelling
    server = ReadThenDying(family, bind_to)
    conn = Connection(spelled(server), timeout=5)
    try:
        conn.open()
        assert check(conn, "/t/c0/email.txt", "a@x", ["b@y"]).get("return_value")
        with pytest.raises(ClientError, match="without a verdict"):
            check(conn, "/t/c1/email.txt", "a@x", ["b@y"])
    finally:
        conn.close()
        server.listener.close()
    assert [r["mail_file"] for r in server.requests] == [["/t/c0/email.txt"],
                                                         ["/t/c1/email.txt"]]


@pytest.mark.parametrize("options", [
    {"data_reply": "550 5.7.1 stray\n250 2.0.0 Ok: queued as HOP1"},
    {"lmtp": True, "data_replies": {"b@x.test": "550 5.7.1 stray\n250 2.0.0 Ok: delivered"}},
], ids=["smtp", "lmtp"])
def test_a_refusal_of_the_end_of_data_with_more_behind_it_is_a_tempfail(options):
    """The hop said more than one reply a recipient to the final dot (a
    named fake: NextHop writes the reply text's lines as they are): the
    refusal read may be a stray line and the hop's answer the 250 behind
    it, so never a bounce. (A 250 with more behind stays believed:
    tests/unit/test_forward_handover.py, a hop that said it twice.)"""
    with NextHop(**options) as hop:
        fwd = forwarder(hop.spec, 10.0, helo="filter.test")
        with pytest.raises(ForwardError) as said:
            fwd.hand_over("a@x.test", ["b@x.test"], MESSAGE)
        assert said.value.temporary, said.value


class SpoolFailingMidway(io.BytesIO):
    """A named fake for a spool file the disk fails to read (EIO) after its
    first block: the transaction is abandoned inside DATA."""

    def read(self, size: int = -1) -> bytes:
        if self.tell():
            raise OSError(errno.EIO, "Input/output error")
        return super().read(size)


@pytest.mark.parametrize("extensions", [EXTENSIONS, WITHOUT_PIPELINING],
                         ids=["pipelining", "no-pipelining"])
def test_a_transaction_abandoned_in_data_is_not_quit_inside_the_content(extensions):
    """In DATA the hop answers nothing before the final dot: a QUIT there is
    a line of content and waits QUIT_TIMEOUT for a reply that cannot come.
    Without PIPELINING, DATA's 354 never marked the session `in_data`."""
    with NextHop(extensions=extensions) as hop:
        fwd = forwarder(hop.spec, 10.0, helo="filter.test")
        spool = SpoolFailingMidway(b"Subject: x\r\n\r\n" + b"line\r\n" * 100_000)
        started = time.monotonic()
        with pytest.raises(ForwardError) as said:
            fwd.hand_over("a@x.test", ["b@x.test"], spool)
        took = time.monotonic() - started
        assert said.value.temporary
        assert settled(lambda: hop.aborted_in_data == 1) and not hop.messages
    assert took < QUIT_TIMEOUT / 2, f"{took:.2f}s: QUIT sent inside DATA"


def test_the_clamd_scanners_own_default_timeout_is_the_settings():
    """clamd_timeout went to 100 s (below clamd's MaxScanTime, 120 s); the
    scanner's own default, which tests and any caller without the config
    get, still said 120 s."""
    assert ClamdScanner("unix:/nonexistent/clamd.sock").timeout == \
        configuration.load(None, {})["clamd_timeout"]
