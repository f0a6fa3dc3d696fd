"""A kept next-hop session whose replies come out of step (smtpout `in_step`).

The next hop (tests/rigs/nexthop.py) writes a stray line on a kept session
after our check for unread bytes (its named fake fault `stray_on_reuse`):
every reply we read then answers the command before. What must hold: a
refusal read one place off never bounces good mail (the message goes again,
whole, on a fresh session, whose replies are final), the hop keeps nothing
of the abandoned attempt, and no message arrives twice.
"""

from __future__ import annotations

import time

import pytest

from amavisd.actions.forward import ForwardError, forwarder
from tests.rigs.nexthop import EXTENSIONS, NextHop

MESSAGE = b"Subject: test\r\n\r\nbody\r\n"
STRAY_250 = ("RSET", "250 2.0.0 stray")  # every reply one place late, RSET's "proof" the stray
STRAY_550 = ("MAIL", "550 5.7.1 stray")  # a 5xx read as MAIL's reply
WITHOUT_PIPELINING = tuple(e for e in EXTENSIONS if e != "PIPELINING")


def kept(hop: NextHop):
    """A forwarder keeping its session, which has carried one message."""
    fwd = forwarder(hop.spec, 10.0, helo="filter.test", keep_idle=30.0)
    assert list(fwd.hand_over("a@x.test", ["first@x.test"], MESSAGE).accepted) == \
        ["first@x.test"]
    return fwd


def settled(predicate, timeout: float = 5.0) -> bool:
    """The hop's threads see our hang-up a moment after we made it."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("options", [
    {"stray_on_reuse": STRAY_250},
    {"stray_on_reuse": STRAY_550},
    {"stray_on_reuse": STRAY_250, "lmtp": True},
    {"stray_on_reuse": STRAY_250, "extensions": WITHOUT_PIPELINING},
    {"stray_on_reuse": STRAY_550, "extensions": WITHOUT_PIPELINING},
], ids=["250-before-rset", "550-before-mail", "lmtp", "no-pipelining-250", "no-pipelining-550"])
def test_a_kept_session_out_of_step_delivers_on_a_fresh_one(options):
    """Today's failures: a 250 where DATA's 354 belongs was a tempfail, a
    stray 550 read as MAIL's reply a bounce."""
    with NextHop(**options) as hop:
        handed = kept(hop).hand_over("a@x.test", ["b@x.test"], MESSAGE)
        assert list(handed.accepted) == ["b@x.test"] and not handed.refused
        assert hop.strays == 1 and hop.connections == 2
        assert [m.rcpt_tos for m in hop.messages] == [["first@x.test"], ["b@x.test"]]


def test_a_refusal_read_one_place_off_does_not_bounce_the_others():
    """c@ is refused for good; shifted, its 550 was read as DATA's reply and
    bounced b@ too. On a fresh session b@ is taken, c@ refused with the hop's
    own 550, and the abandoned attempt (the hop said 354) gets no content."""
    with NextHop(stray_on_reuse=STRAY_250,
                 rcpt_replies={"c@x.test": "550 5.1.1 no such user"}) as hop:
        handed = kept(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)
        assert list(handed.accepted) == ["b@x.test"]
        assert handed.refused == {"c@x.test": "550 5.1.1 no such user"}
        assert [m.rcpt_tos for m in hop.messages] == [["first@x.test"], ["b@x.test"]]
        assert settled(lambda: hop.aborted_in_data == 1)  # left in DATA: kept nothing
        assert hop.connections == 2


def test_the_refusal_of_the_fresh_session_is_final():
    """One more attempt, no more: the fresh session's 550 is the answer."""
    with NextHop(stray_on_reuse=STRAY_250,
                 rcpt_replies={"c@x.test": "550 5.1.1 no such user"}) as hop:
        with pytest.raises(ForwardError) as caught:
            kept(hop).hand_over("a@x.test", ["c@x.test"], MESSAGE)
        assert not caught.value.temporary and caught.value.reply == "550 5.1.1 no such user"
        assert hop.connections == 2 and len(hop.messages) == 1


def test_a_fresh_session_is_believed_even_out_of_step():
    """Only a kept session is doubted: a stray on a new one (here a 550 read
    as MAIL's reply) is its answer, as before."""
    with NextHop(replies={"MAIL": "550 5.7.1 go away"}) as hop:
        fwd = forwarder(hop.spec, 10.0, helo="filter.test", keep_idle=30.0)
        with pytest.raises(ForwardError) as caught:
            fwd.hand_over("a@x.test", ["b@x.test"], MESSAGE)
        assert not caught.value.temporary and caught.value.reply == "550 5.7.1 go away"
        assert hop.connections == 1 and not hop.messages


def test_a_tempfail_on_a_kept_session_stays_a_tempfail_there():
    """A 4xx loses nothing (the MTA retries), so it is not asked again: a
    fresh session for every 4xx would double the hop's load when it is
    asking us to back off."""
    with NextHop(rcpt_replies={"c@x.test": "452 4.2.2 mailbox full"}) as hop:
        with pytest.raises(ForwardError) as caught:
            kept(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)
        assert caught.value.temporary
        assert hop.connections == 1 and len(hop.messages) == 1


def test_a_kept_session_in_step_carries_on():
    """No stray: the kept session takes the next messages, one connection."""
    with NextHop() as hop:
        fwd = kept(hop)
        for rcpt in ("b@x.test", "c@x.test"):
            assert list(fwd.hand_over("a@x.test", [rcpt], MESSAGE).accepted) == [rcpt]
        assert hop.connections == 1 and len(hop.messages) == 3
