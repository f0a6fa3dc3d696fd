"""The milter's per-connection state machine, driven with the bytes an MTA sends."""

from __future__ import annotations

import pytest

from amavisd_client.milter import codec
from amavisd_client.milter.codec import Framer
from amavisd_client.milter.state import Ask, Close, MilterSession, Send
from amavisd_client.milter.verdicts import Policy
from amavisd_client.wire.ampdp import decode_blocks, encode_block

POSTFIX_OFFER = codec.OptNeg(6, 0x1FF, 0x1FFFFF)  # what Postfix 3.7 and Sendmail 8.17 send
V2_OFFER = codec.OptNeg(2, 0x3F, 0x7F)
DEFAULT = Policy()


class MemorySink:
    """The spool, in memory: the machine only writes and discards."""

    opened: list[MemorySink] = []

    def __init__(self, fail_after: int | None = None):
        self.path, self.dir = "/tb/m/email.txt", "/tb/m"
        self.data = bytearray()
        self.discarded = False
        self.fail_after = fail_after
        MemorySink.opened.append(self)

    def write(self, data: bytes) -> None:
        if self.fail_after is not None and len(self.data) + len(data) > self.fail_after:
            raise OSError(28, "No space left on device")
        self.data += data

    def discard(self) -> None:
        self.discarded = True


@pytest.fixture(autouse=True)
def _fresh_sinks():
    MemorySink.opened = []


def session(policy: Policy = DEFAULT, policy_bank: str = "", sink=MemorySink, **kw):
    return MilterSession(sink, policy, policy_bank, **kw)


def feed(s: MilterSession, *commands) -> list:
    return s.feed(b"".join(codec.encode_command(c) for c in commands))


def packets(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(code), payload) for code, payload in Framer().feed(data)]


def sent(events) -> list[tuple[str, bytes]]:
    return packets(b"".join(e.data for e in events if isinstance(e, Send)))


def optneg(events) -> bytes:
    ((code, payload),) = sent(events)
    assert code == "O"
    return payload


def reply(**attrs) -> object:
    return decode_blocks(encode_block(list(attrs.items())))[0]


MESSAGE = [
    codec.Macro("C", {"j": "mx.example", "daemon_name": "ORIGINATING", "_": "c [192.0.2.1]"}),
    codec.Connect("client.example", "4", 40000, "192.0.2.1"),
    codec.Helo("helo.example"),
    codec.Macro("M", {"auth_authen": "alice", "auth_type": "PLAIN"}),
    codec.Mail(("<a@example.test>", "BODY=8BITMIME")),
    codec.Rcpt(("<b@example.test>",)),
    codec.Rcpt(("<c@example.test>", "NOTIFY=NEVER")),
    codec.Data(),
    codec.Macro("L", {"i": "4XyZ1"}),
    codec.Header(b"Subject", b"hello"),
    codec.Header(b"X-Folded", b"one\n\ttwo"),
    codec.EndOfHeaders(),
    codec.Body(b"line 1\r\n"),
    codec.Body(b"line 2\r\n"),
    codec.Macro("E", {"i": "4XyZ1"}),
]


def test_version_6_negotiates_a_subset_and_asks_for_no_replies_before_the_end():
    s = session()
    events = feed(s, POSTFIX_OFFER)
    payload = optneg(events)
    version, actions, protocol = (int.from_bytes(payload[i:i + 4], "big") for i in (0, 4, 8))
    assert version == 6
    assert actions == (codec.SMFIF_ADDHDRS | codec.SMFIF_CHGHDRS | codec.SMFIF_QUARANTINE
                       | codec.SMFIF_ADDRCPT | codec.SMFIF_DELRCPT)
    assert actions & ~POSTFIX_OFFER.actions == 0 and protocol & ~POSTFIX_OFFER.protocol == 0
    for flag in (codec.SMFIP_NR_HDR, codec.SMFIP_NR_BODY, codec.SMFIP_NR_RCPT,
                 codec.SMFIP_NOUNKNOWN, codec.SMFIP_NODATA, codec.SMFIP_HDR_LEADSPC):
        assert protocol & flag
    assert not protocol & (codec.SMFIP_NOHELO | codec.SMFIP_NOBODY | codec.SMFIP_NOHDRS)
    events = feed(s, *MESSAGE, codec.EndOfMessage())
    assert sent(events) == []  # not one reply until the end of the message
    (ask,) = events
    assert isinstance(ask, Ask)


def test_version_2_answers_every_event():
    s = session()
    payload = optneg(feed(s, V2_OFFER))
    assert payload == (2).to_bytes(4, "big") + (0x3D).to_bytes(4, "big") + bytes(4)
    events = feed(s, *MESSAGE)
    replied = [c for c in MESSAGE if not isinstance(c, codec.Macro)]
    assert sent(events) == [("c", b"")] * len(replied)


@pytest.mark.parametrize("version", [3, 4, 5])
def test_an_mta_between_versions_gets_version_2(version):
    payload = optneg(feed(session(), codec.OptNeg(version, 0x3F, 0x7F)))
    assert payload[:4] == (2).to_bytes(4, "big")


def test_version_1_is_refused():
    s = session()
    (close,) = feed(s, codec.OptNeg(1, 0x0F, 0x0F))
    assert isinstance(close, Close) and "version 1" in close.reason and s.closed


def test_an_mta_offering_little_gets_only_that_and_its_events_get_replies():
    s = session()
    payload = optneg(feed(s, codec.OptNeg(6, codec.SMFIF_ADDHDRS, 0)))
    assert payload[4:] == codec.SMFIF_ADDHDRS.to_bytes(4, "big") + bytes(4)
    assert sent(feed(s, codec.Header(b"Subject", b"x"))) == [("c", b"")]


def test_the_spool_gets_the_header_as_the_mta_saw_it_then_the_body():
    s = session()
    feed(s, POSTFIX_OFFER, *MESSAGE, codec.EndOfMessage())
    (sink,) = MemorySink.opened
    # LEADSPC negotiated: values come with their own leading space (here none)
    assert bytes(sink.data) == (b"Subject:hello\r\nX-Folded:one\r\n\ttwo\r\n\r\n"
                                b"line 1\r\nline 2\r\n")
    s2 = session()
    feed(s2, V2_OFFER, *MESSAGE, codec.EndOfMessage())
    assert bytes(MemorySink.opened[1].data).startswith(b"Subject: hello\r\nX-Folded: one\r\n\t")


def test_the_request_carries_the_envelope_and_what_the_macros_give():
    s = session(policy_bank="AMAVIS_MILTER, {daemon_name}")
    feed(s, POSTFIX_OFFER)
    (ask,) = feed(s, *MESSAGE, codec.EndOfMessage())
    attrs = dict(a for a in ask.attrs if a[0] != "recipient")
    assert ask.attrs[0] == ("request", "AM.PDP")
    assert [v for k, v in ask.attrs if k == "recipient"] == ["<b@example.test>",
                                                              "<c@example.test>"]
    assert attrs == {
        "request": "AM.PDP", "sender": "<a@example.test>",
        "tempdir": "/tb/m", "tempdir_removed_by": "client", "mail_file": "/tb/m/email.txt",
        "delivery_care_of": "client", "queue_id": "4XyZ1", "client_address": "192.0.2.1",
        "client_name": "client.example", "helo_name": "helo.example",
        "protocol_name": "ESMTP",
        "policy_bank": "AMAVIS_MILTER,ORIGINATING,SMTP_AUTH,SMTP_AUTH_PLAIN",
    }
    assert "4XyZ1: <a@example.test> -> <b@example.test>,<c@example.test>" == ask.summary


def test_missing_events_are_tolerated():
    s = session()
    feed(s, POSTFIX_OFFER)
    (ask,) = feed(s, codec.EndOfMessage())  # nothing at all but the end
    attrs = dict(ask.attrs)
    assert attrs["sender"] == "<>" and "recipient" not in attrs
    assert bytes(MemorySink.opened[0].data) == b"\r\n"
    s = session()  # no negotiation, no EOH: a header then the body
    events = feed(s, codec.Rcpt(("<b@x>",)), codec.Header(b"A", b"1"), codec.Body(b"b\r\n"),
                  codec.EndOfMessage())
    assert isinstance(events[-1], Ask)
    assert bytes(MemorySink.opened[1].data) == b"A: 1\r\n\r\nb\r\n"


def test_a_last_chunk_on_the_end_of_message_is_spooled():
    s = session()
    feed(s, POSTFIX_OFFER, codec.Body(b"a\r\n"), codec.EndOfMessage(b"b\r\n"))
    assert bytes(MemorySink.opened[0].data) == b"\r\na\r\nb\r\n"


def test_abort_mid_body_drops_the_message_and_keeps_the_connection():
    s = session()
    feed(s, POSTFIX_OFFER, *MESSAGE[:13])
    assert feed(s, codec.Abort()) == []
    first = MemorySink.opened[0]
    assert first.discarded
    assert s.macro("j") == "mx.example" and s.macro("auth_authen") == ""
    (ask,) = feed(s, codec.Mail(("<d@example.test>",)), codec.Rcpt(("<e@example.test>",)),
                  codec.Body(b"x\r\n"), codec.EndOfMessage())
    attrs = dict(ask.attrs)
    assert attrs["sender"] == "<d@example.test>" and attrs["recipient"] == "<e@example.test>"
    assert attrs["client_address"] == "192.0.2.1" and attrs["helo_name"] == "helo.example"
    assert bytes(MemorySink.opened[1].data) == b"\r\nx\r\n"


def test_the_request_bytes_are_the_attributes_encoded():
    """`Ask.encoded` (the spool's lines encoded once a spool) sends exactly
    `attrs`, whatever the spool's path and the message's fields."""
    s = session()
    feed(s, POSTFIX_OFFER)
    (ask,) = feed(s, *MESSAGE, codec.EndOfMessage())
    assert ask.encoded() == encode_block(ask.attrs)
    s.answer(reply(return_value="continue"))
    (ask,) = feed(s, codec.Mail(("<\u00e9@x>",)), codec.EndOfMessage())
    ask.sink.path, ask.sink.dir = "/tb/%n =x/email.txt", "/tb/%n =x"  # another spool
    assert ask.encoded() == encode_block(ask.attrs)
    assert decode_blocks(ask.encoded())[0].get("tempdir") == "/tb/%n =x"


def test_every_abort_forgets_the_message_stages_only():
    """An MTA ends each message with abort, abort, quit: each leaves the
    connection's macros (C, H) and drops the message's, however often."""
    s = session()
    feed(s, POSTFIX_OFFER, *MESSAGE[:9])
    for _ in range(3):
        assert feed(s, codec.Abort()) == []
        assert set(s.macros) == {"C"} and s.macro("i") == "" and s.macro("j") == "mx.example"
    feed(s, codec.Macro("R", {"rcpt_addr": "<r@x>"}), codec.Abort())
    assert s.macro("rcpt_addr") == ""
    (ask,) = feed(s, codec.Macro("T", {"i": "Q2"}), codec.Mail(("<d@x>",)),
                  codec.EndOfMessage())
    assert dict(ask.attrs)["queue_id"] == "Q2" and "recipient" not in dict(ask.attrs)


def test_quit_new_connection_forgets_the_client_too():
    s = session()
    feed(s, POSTFIX_OFFER, *MESSAGE[:3])
    assert feed(s, codec.QuitNewConnection()) == []
    (ask,) = feed(s, codec.Mail(("<a@x>",)), codec.EndOfMessage())
    assert "client_address" not in dict(ask.attrs) and "helo_name" not in dict(ask.attrs)


def test_quit_closes_and_an_oversize_packet_closes_with_the_reason():
    s = session()
    assert feed(s, POSTFIX_OFFER, codec.Quit(), codec.Abort())[-1] == Close("")
    assert s.closed and s.feed(b"more") == []
    s = session(max_packet=4096)
    feed(s, POSTFIX_OFFER, codec.Header(b"A", b"1"))
    events = feed(s, codec.Body(b"x" * 5000))
    assert isinstance(events[-1], Close) and "over 4096" in events[-1].reason
    assert MemorySink.opened[0].discarded


def test_commands_after_the_end_wait_for_the_answer():
    s = session()
    events = feed(s, POSTFIX_OFFER, *MESSAGE, codec.EndOfMessage(), codec.Abort(),
                  codec.Mail(("<z@x>",)), codec.EndOfMessage())
    asks = [e for e in events if isinstance(e, Ask)]
    assert len(asks) == 1 and s.waiting
    assert feed(s, codec.Quit()) == []  # still held
    out = s.answer(reply(return_value="continue"))
    assert packets(out) == [("c", b"")]
    later = s.feed(b"")
    assert isinstance(later[0], Ask) and dict(later[0].attrs)["sender"] == "<z@x>"
    s.answer(reply(return_value="continue"))
    assert s.feed(b"") == [Close("")]


def test_a_spool_failure_gives_the_on_error_action_without_asking():
    s = session(sink=lambda: MemorySink(fail_after=10))
    feed(s, POSTFIX_OFFER)
    events = feed(s, *MESSAGE, codec.EndOfMessage())
    assert not any(isinstance(e, Ask) for e in events)
    ((code, text),) = sent(events)
    assert code == "y" and text.startswith(b"451 4.3.0 ")
    assert MemorySink.opened[0].discarded
    s = session(sink=lambda: (_ for _ in ()).throw(PermissionError(13, "denied")))
    feed(s, POSTFIX_OFFER)
    assert sent(feed(s, *MESSAGE, codec.EndOfMessage()))[0][0] == "y"


# -- the daemon's answer -----------------------------------------------------------------


def answered(block, policy: Policy = DEFAULT, offer=POSTFIX_OFFER):
    s = session(policy)
    feed(s, offer, *MESSAGE, codec.EndOfMessage())
    return packets(s.answer(block))


def test_clean_mail_gets_the_daemons_header_then_continue():
    out = answered(reply(version_server="2", log_id="1-01",
                         insheader=["0", "X-Virus-Scanned", "by amavisd at x"],
                         return_value="continue",
                         setreply=["250", "2.5.0", "Ok, id=1-01, CLEAN"]))
    # LEADSPC was negotiated: we give the one space ourselves
    assert out == [("i", b"\0\0\0\0X-Virus-Scanned\0 by amavisd at x\0"), ("c", b"")]
    out = answered(reply(insheader=["0", "X-Virus-Scanned", "by amavisd"],
                         addheader=["X-Amavis-Alert", "a\nb"], return_value="accept"),
                   offer=V2_OFFER)
    assert out == [("i", b"\0\0\0\0X-Virus-Scanned\0by amavisd\0"),
                   ("h", b"X-Amavis-Alert\0a\n\tb\0"), ("a", b"")]


def test_edits_come_in_milter_order_and_header_edits_not_allowed_are_left_out():
    block = reply(addheader=["X-A", "1"], chgheader=["1", "Subject", "new"],
                  delheader=["2", "X-B"], return_value="continue")
    out = answered(block)
    assert [p[0] for p in out] == ["m", "m", "h", "c"]
    assert out[0] == ("m", b"\0\0\0\x02X-B\0\0")
    out = answered(block, offer=codec.OptNeg(6, codec.SMFIF_ADDHDRS, 0x1FFFFF))
    assert out == [("h", b"X-A\0 1\0"), ("c", b"")]


def test_reject_and_tempfail_carry_the_daemons_code_and_text():
    out = answered(reply(return_value="reject",
                         setreply=["554", "5.7.0", "Reject, id=1 - INFECTED: Eicar 100%"]))
    assert out == [("y", b"554 5.7.0 Reject, id=1 - INFECTED: Eicar 100%%\0")]
    out = answered(reply(return_value="tempfail",
                         setreply=["451", "4.5.0", "Temporary failure, id=1 - busy"]))
    assert out == [("y", b"451 4.5.0 Temporary failure, id=1 - busy\0")]


def test_reply_codes_that_disagree_with_the_verdict_are_replaced():
    out = answered(reply(return_value="tempfail", setreply=["554", "5.7.0", "no"]))
    assert out == [("y", b"451 4.5.0 no\0")]
    out = answered(reply(return_value="reject", setreply=["250", "2.0.0", "Ok"]))
    assert out == [("y", b"554 5.7.0 Ok\0")]
    out = answered(reply(return_value="reject", setreply=["550", "4.1.1", "x"]))
    assert out == [("y", b"550 5.7.0 x\0")]
    out = answered(reply(return_value="reject"))
    assert out == [("y", b"554 5.7.0 Rejected by the virus scanner\0")]


def test_a_multi_line_text_becomes_continuation_lines():
    out = answered(reply(return_value="reject",
                         setreply=["554", "5.7.1", "first\r\nsecond\x01\nthird"]))
    assert out == [("y", b"554-5.7.1 first\r\n554-5.7.1 second?\r\n554 5.7.1 third\0")]


def test_discard_and_quarantine_where_configured():
    infected = reply(return_value="discard",
                     setreply=["250", "2.7.0", "Ok, discarded, id=1 - INFECTED: Eicar"])
    assert answered(infected) == [("d", b"")]
    held = Policy(quarantine=frozenset({"discard"}))
    assert answered(infected, held) == [("q", b"Ok, discarded, id=1 - INFECTED: Eicar\0"),
                                        ("c", b"")]
    # an MTA that offers no quarantine: the verdict stands
    no_q = codec.OptNeg(6, 0x1FF & ~codec.SMFIF_QUARANTINE, 0x1FFFFF)
    assert answered(infected, held, offer=no_q) == [("d", b"")]
    rejected = reply(return_value="reject", setreply=["554", "5.7.0", "Reject"])
    assert answered(rejected, Policy(quarantine=frozenset({"reject"})))[-2:] == [
        ("q", b"Reject\0"), ("c", b"")]


def test_a_quarantine_the_daemon_asks_for_keeps_its_verdict():
    out = answered(reply(quarantine="held by policy", return_value="discard"))
    assert out == [("q", b"held by policy\0"), ("d", b"")]


def test_recipient_edits_are_carried_out_or_fail_closed():
    block = reply(delrcpt="<b@example.test>", addrcpt="<b+x@example.test>",
                  return_value="continue")
    assert answered(block) == [("-", b"<b@example.test>\0"), ("+", b"<b+x@example.test>\0"),
                               ("c", b"")]
    no_rcpt = codec.OptNeg(6, codec.SMFIF_ADDHDRS, 0x1FFFFF)
    assert answered(block, offer=no_rcpt)[0][0] == "y"  # tempfail, not a wrong delivery


@pytest.mark.parametrize("block", [
    reply(log_id="1"),  # no return_value
    reply(return_value="maybe"),
    reply(return_value="continue", insheader=["x", "X-A", "1"]),
    reply(return_value="continue", addheader=["Bad Name", "1"]),
    decode_blocks(b"garbage\r\nreturn_value=continue\r\n\r\n")[0],
], ids=["missing", "unknown", "bad-index", "bad-name", "malformed"])
def test_a_reply_that_cannot_be_carried_out_is_the_on_error_action(block):
    assert answered(block) == [("y", b"451 4.3.0 Virus scanner unavailable, try again later\0")]
    assert answered(block, Policy(on_error="reject"))[0][1].startswith(b"554 5.7.0 ")
    assert answered(block, Policy(on_error="accept")) == [("c", b"")]


def test_fail_gives_the_on_error_action_and_the_next_message_starts_clean():
    s = session()
    feed(s, POSTFIX_OFFER, *MESSAGE, codec.EndOfMessage())
    assert packets(s.fail("amavisd is down"))[0][0] == "y"
    assert not s.waiting and s.message.recipients == []
    with pytest.raises(RuntimeError):
        s.fail("twice")
