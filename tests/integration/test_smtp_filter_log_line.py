"""The real daemon's SMTP/LMTP filter writes one line a message, amavisd-new's,
with the next hop's queue id (`queued_as: ID`) or why the forward failed:
no second "forwarded to" line, and a line even for a worker killed mid-forward."""

from __future__ import annotations

import re

import pytest

from tests.integration.test_smtp_filter import notices as notices  # noqa: F401 (fixture)
from tests.integration.test_smtp_filter import start_filter, transaction
from tests.rigs.nexthop import NextHop
from tests.rigs.smtptalk import clean

pytestmark = pytest.mark.integration

LOG_ID = re.compile(r"\((\d+-\d+)\) (?:Passed|Blocked|Tempfailed) ")


def message_lines(log: str) -> dict[str, list[str]]:
    """Each message's log id -> every line that names it."""
    ids = LOG_ID.findall(log)
    return {i: [line for line in log.splitlines() if f"({i})" in line] for i in ids}


def test_smtp_writes_one_line_a_message_with_queued_as(short_tmp, clamd_nodecomp,
                                                       notices):  # noqa: F811
    with NextHop(data_reply="250 2.0.0 Ok: queued as 4QXone") as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices)
        try:
            with flt.talk() as talk:
                for helo in ("EHLO mta.test", "RSET"):
                    transaction(talk, "alice@example.test", ["bob@example.test"], clean(),
                                helo=helo)
                    assert talk.reply()[0] == 250
            log = flt.daemon.log_text()
        finally:
            flt.daemon.stop()
    lines = message_lines(log)
    assert len(lines) == 2 and len(hop.messages) == 2, log[-3000:]
    for named in lines.values():
        [line] = named  # one line names the message, no other
        assert re.search(r" INFO \(\d+-\d+\) Passed CLEAN .*, size: \d+, queued_as: 4QXone, "
                         r"\d+ ms$", line), line
    assert "forwarded to" not in log


def test_lmtp_with_several_recipients_one_line_their_ids_and_the_refused(
        short_tmp, clamd_nodecomp, notices):  # noqa: F811
    with NextHop(lmtp=True, rcpt_replies={"carol@example.test": "550 5.1.1 unknown user"},
                 data_replies={"bob@example.test": "250 2.0.0 Ok: queued as 4QXbob",
                               "dave@example.test": "250 2.0.0 Ok: queued as 4QXdave"}) as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices)
        try:
            with flt.talk(lmtp=True) as talk:
                transaction(talk, "alice@example.test",
                            ["bob@example.test", "carol@example.test", "dave@example.test"],
                            clean(), helo="LHLO mta.test")
                assert [c for c, _ in talk.replies(3)] == [250, 550, 250]
            log = flt.daemon.log_text()
        finally:
            flt.daemon.stop()
    [named] = message_lines(log).values()
    [line] = named
    assert re.search(r" WARNING \(\d+-\d+\) Passed CLEAN .*, queued_as: 4QXbob/4QXdave, "
                     r"refused: <carol@example\.test>: 550 5\.1\.1 unknown user, \d+ ms$",
                     line), line


def test_a_next_hop_down_is_said_in_the_one_line(short_tmp, clamd_nodecomp, notices):  # noqa: F811
    with NextHop() as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices)
        try:
            hop.stop()
            with flt.talk() as talk:
                transaction(talk, "alice@example.test", ["bob@example.test"], clean())
                code, _ = talk.reply()
            log = flt.daemon.log_text()
        finally:
            flt.daemon.stop()
    assert code == 451
    [named] = message_lines(log).values()
    [line] = named
    assert re.search(rf" WARNING \(\d+-\d+\) Passed CLEAN .*, size: \d+, forwarding failed "
                     rf"\(temporary\): {re.escape(hop.spec)}: cannot connect: .*, \d+ ms$",
                     line), line


def test_a_worker_killed_mid_forward_still_writes_its_line(short_tmp, clamd_nodecomp,
                                                           notices):  # noqa: F811
    with NextHop(data_delay=30.0) as hop:  # takes the data and says nothing
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices,
                           child_timeout=3.0, forward_timeout=60.0)
        try:
            with flt.talk() as talk:
                transaction(talk, "a@example.test", ["b@example.test"], clean())
                assert talk.reply()[0] == 451
        finally:
            flt.daemon.stop()  # the line is written after the client's 451
        log = flt.daemon.log_text()
    [line] = [t for t in log.splitlines() if "Passed CLEAN" in t] or [log[-3000:]]
    assert re.search(r", interrupted: worker aborted after child_timeout, \d+ ms$", line), line
