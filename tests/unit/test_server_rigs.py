"""The test servers (tests/rigs/smtpsink.py, nexthop.py) share one life and one DATA reader."""

from __future__ import annotations

import io
import smtplib

import pytest

from tests.rigs.nexthop import NextHop
from tests.rigs.smtpsink import ServerRig, SMTPSink, TooBig, read_data

MESSAGE = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nlast\r\n"


@pytest.mark.parametrize("rig", [SMTPSink, NextHop])
def test_each_rig_keeps_what_smtplib_sent_dot_unstuffed(rig):
    with rig() as server:
        assert isinstance(server, ServerRig)
        with smtplib.SMTP(*server.address, timeout=30) as client:
            assert client.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
        [kept] = server.wait(1)
    assert (kept.mail_from, kept.rcpt_tos, kept.data) == ("a@example.test", ["b@example.test"],
                                                          MESSAGE)
    assert server.messages == [kept]  # readable after stop()


def test_the_data_reader():
    assert read_data(io.BytesIO(b"a\r\n..b\r\n.\r\nNEXT\r\n")) == b"a\r\n.b\r\n"
    assert read_data(io.BytesIO(b"a\n.\n")) == b"a\n"
    assert read_data(io.BytesIO(b"a\r\nno end")) is None  # the client left mid-message
    with pytest.raises(TooBig):
        read_data(io.BytesIO(b"x" * 20 + b"\r\n.\r\n"), limit=10)
