"""SMTP/LMTP clients get SMTP's timeouts, AM.PDP clients keep their own.

The real daemon with AM.PDP's timeouts cut short (client_idle_timeout 1 s,
request_timeout 2 s) and SMTP's own (smtp_idle_timeout, smtp_data_timeout);
real slow clients: smtplib pausing between commands, and a raw client
trickling its DATA a line a second, as a busy MTA on a slow link does.
Before SMTP had its own settings, the first pause cost the connection.
"""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from tests.integration.test_smtp_filter import start_filter
from tests.rigs.nexthop import NextHop
from tests.rigs.smtpsink import SMTPSink
from tests.rigs.smtptalk import Talk, clean

pytestmark = pytest.mark.integration

SMTP_IDLE = 6.0
SMTP_DATA = 10.0
AMPDP = {"client_idle_timeout": 1.0, "request_timeout": 2.0}


@pytest.fixture
def slow_filter(short_tmp, clamd_nodecomp):
    with NextHop() as hop, SMTPSink() as notices:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices,
                           smtp_idle_timeout=SMTP_IDLE, smtp_data_timeout=SMTP_DATA, **AMPDP)
        try:
            yield flt
        finally:
            flt.daemon.stop()


def held_until_hung_up(talk: Talk) -> float:
    """Seconds until the server closes the connection (reads what it says meanwhile)."""
    started = time.monotonic()
    while talk.reply()[0] != 0:
        pass
    return time.monotonic() - started


def test_a_client_slower_than_ampdp_allows_but_within_smtp_s_timeouts_is_served(slow_filter):
    with smtplib.SMTP("127.0.0.1", slow_filter.smtp_port, timeout=60) as client:
        time.sleep(3)  # past client_idle_timeout
        assert client.ehlo("slow.mta.test")[0] == 250
        time.sleep(3)
        assert client.mail("alice@example.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.putcmd("DATA") is None and client.getreply()[0] == 354
        for line in clean("slow").splitlines(keepends=True):  # about 5 s, past request_timeout
            client.sock.sendall(line)
            time.sleep(5 / len(clean("slow").splitlines()))
        client.sock.sendall(b".\r\n")
        code, text = client.getreply()
        assert code == 250, text
    [message] = slow_filter.hop.wait(1)
    assert b"Subject: slow" in message.data


def test_smtp_idle_and_data_timeouts_end_the_connection_and_nothing_goes_on(slow_filter):
    with Talk("127.0.0.1", slow_filter.smtp_port) as talk:  # silent after EHLO
        assert talk.command("EHLO mta.test")[0] == 250
        held = held_until_hung_up(talk)
    assert SMTP_IDLE - 0.5 <= held < SMTP_IDLE + 30, held
    with Talk("127.0.0.1", slow_filter.smtp_port) as talk:  # a DATA that never ends
        assert talk.command("EHLO mta.test")[0] == 250
        talk.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [code for code, _ in talk.replies(3)] == [250, 250, 354]
        started = time.monotonic()
        try:
            while time.monotonic() - started < SMTP_DATA + 30:
                talk.send(b"Subject: trickle\r\n")  # a line a second: never idle
                time.sleep(1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        held = time.monotonic() - started
    assert SMTP_DATA - 0.5 <= held < SMTP_DATA + 30, held
    log = slow_filter.daemon.log_text()
    assert "client idle for smtp_idle_timeout (6s)" in log
    assert "request not complete within smtp_data_timeout (10s)" in log
    time.sleep(1)
    assert slow_filter.hop.messages == [] and slow_filter.work_files() == []


def test_ampdp_keeps_its_own_short_timeouts_beside_smtp_s(slow_filter):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ampdp:
        ampdp.settimeout(60)
        ampdp.connect(slow_filter.daemon.socket_path)
        started = time.monotonic()
        assert ampdp.recv(100) == b""  # hung up on, silent
        held = time.monotonic() - started
    assert 0.5 <= held < SMTP_IDLE - 1, held
    assert "AM.PDP client idle for client_idle_timeout (1s)" in slow_filter.daemon.log_text()
