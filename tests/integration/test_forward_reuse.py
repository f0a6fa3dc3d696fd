"""Sessions to the next hop kept open between messages (`forward_keep_idle`).

One worker, so every message goes out through the same kept session; the
next hop (tests/rigs/nexthop.py) counts connections and records commands.
What must hold: each message arrives exactly once with its own envelope and
XFORWARD; a session the hop closed meanwhile is replaced before anything is
sent (no tempfail, no duplicate); idle sessions and a retiring worker QUIT.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.test_smtp_filter import notices, start_filter, transaction  # noqa: F401
from tests.rigs.nexthop import NextHop
from tests.rigs.smtptalk import clean

pytestmark = pytest.mark.integration


def send(flt, n: int, tag: str) -> list[tuple[int, str]]:
    """`n` messages, each on its own inbound connection, with its own XFORWARD."""
    answers = []
    for i in range(n):
        with flt.talk() as talk:
            assert talk.command("EHLO mta.test")[0] == 250
            assert talk.command(f"XFORWARD NAME=c{i}.example ADDR=192.0.2.{i + 1} "
                                f"IDENT={tag}{i}")[0] == 250
            transaction(talk, f"s{i}@example.test", [f"r{i}@example.test"],
                        clean(f"{tag} {i}"), helo="NOOP")
            answers.append(talk.reply())
    return answers


def quit_sent(hop: NextHop) -> bool:
    return any(c.upper() == "QUIT" for c in hop.commands)


def test_one_session_carries_successive_messages_each_with_its_own_xforward(
        short_tmp, clamd_nodecomp, notices):  # noqa: F811
    with NextHop() as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, workers=1)
        try:
            answers = send(flt, 3, "Q")
            got = hop.wait(3)
        finally:
            flt.daemon.stop()
    assert [code for code, _ in answers] == [250, 250, 250]
    assert hop.connections == 1  # one connect, greeting and EHLO for three messages
    verbs = [c.split(" ", 1)[0].upper() for c in hop.commands]
    assert verbs.count("EHLO") == 1 and verbs.count("RSET") == 2 and verbs.count("DATA") == 3
    assert verbs[-1] == "QUIT"  # the worker quit its kept session on the way out
    assert [m.rcpt_tos for m in got] == [["r0@example.test"], ["r1@example.test"],
                                         ["r2@example.test"]]
    assert [(m.xforward["NAME"], m.xforward["IDENT"]) for m in got] == [
        ("c0.example", "Q0"), ("c1.example", "Q1"), ("c2.example", "Q2")]


def test_a_session_the_hop_closed_is_replaced_before_anything_is_sent(
        short_tmp, clamd_nodecomp, notices):  # noqa: F811
    with NextHop(hang_up_after_message=True) as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, workers=1)
        try:
            answers = send(flt, 3, "H")
            got = hop.wait(3)
            time.sleep(0.3)
        finally:
            flt.daemon.stop()
    assert [code for code, _ in answers] == [250, 250, 250]  # no tempfail for a dead session
    assert len(hop.messages) == 3 and len({m.rcpt_tos[0] for m in got}) == 3  # each once
    assert hop.connections == 3


def test_keep_idle_zero_quits_after_every_message(short_tmp, clamd_nodecomp, notices):  # noqa: F811
    with NextHop() as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, workers=1,
                           forward_keep_idle=0)
        try:
            assert [code for code, _ in send(flt, 2, "Z")] == [250, 250]
            hop.wait(2)
        finally:
            flt.daemon.stop()
    verbs = [c.split(" ", 1)[0].upper() for c in hop.commands]
    assert hop.connections == 2 and verbs.count("QUIT") == 2 and "RSET" not in verbs


def test_a_session_idle_past_keep_idle_is_quit_by_the_waiting_worker(
        short_tmp, clamd_nodecomp, notices):  # noqa: F811
    with NextHop() as hop:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, workers=1,
                           forward_keep_idle=0.5)
        try:
            assert [code for code, _ in send(flt, 1, "I")] == [250]
            hop.wait(1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not quit_sent(hop):
                time.sleep(0.1)
            quit_seen = quit_sent(hop)
            assert flt.daemon.proc.poll() is None  # the daemon is still running
        finally:
            flt.daemon.stop()
    assert quit_seen
