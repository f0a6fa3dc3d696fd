"""The milter codec: golden bytes for every packet we read and send, framing, limits."""

from __future__ import annotations

import pytest

from amavisd_client.milter import codec
from amavisd_client.milter.codec import Decoder, Framer, ProtocolError, encode

# -- commands: what Postfix and Sendmail send (bytes as on the wire) ----------------------

GOLDEN_COMMANDS = [
    (b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff",
     codec.OptNeg(6, 0x1FF, 0x1FFFFF)),
    (b"\x00\x00\x00\x23DCj\x00mx.example\x00{daemon_name}\x00smtpd\x00",
     codec.Macro("C", {"j": "mx.example", "daemon_name": "smtpd"})),
    (b"\x00\x00\x00\x1dCclient.example\x004\x04\xd2192.0.2.1\x00",
     codec.Connect("client.example", "4", 1234, "192.0.2.1")),
    (b"\x00\x00\x00\x0aCunknown\x00U", codec.Connect("unknown", "U")),
    (b"\x00\x00\x00\x0eHhelo.example\x00", codec.Helo("helo.example")),
    (b"\x00\x00\x00\x20M<a@example.test>\x00BODY=8BITMIME\x00",
     codec.Mail(("<a@example.test>", "BODY=8BITMIME"))),
    (b"\x00\x00\x00\x12R<b@example.test>\x00", codec.Rcpt(("<b@example.test>",))),
    (b"\x00\x00\x00\x01T", codec.Data()),
    (b"\x00\x00\x00\x0cLSubject\x00hi\x00", codec.Header(b"Subject", b"hi")),
    (b"\x00\x00\x00\x01N", codec.EndOfHeaders()),
    (b"\x00\x00\x00\x07Bbody\r\n", codec.Body(b"body\r\n")),
    (b"\x00\x00\x00\x01E", codec.EndOfMessage()),
    (b"\x00\x00\x00\x06UHELP\x00", codec.Unknown(b"HELP")),
    (b"\x00\x00\x00\x01A", codec.Abort()),
    (b"\x00\x00\x00\x01Q", codec.Quit()),
    (b"\x00\x00\x00\x01K", codec.QuitNewConnection()),
]


@pytest.mark.parametrize("wire,command", GOLDEN_COMMANDS,
                         ids=[type(c).__name__ + str(i) for i, (_, c) in
                              enumerate(GOLDEN_COMMANDS)])
def test_golden_commands_decode_and_encode(wire, command):
    assert Decoder().feed(wire) == [command]
    assert codec.encode_command(command) == wire


def test_macro_names_lose_their_braces_and_a_last_string_may_lack_its_nul():
    (macro,) = Decoder().feed(codec.frame(b"D", b"E{msg_id}\x00<x@y>\x00i\x00QID"))
    assert macro == codec.Macro("E", {"msg_id": "<x@y>", "i": "QID"})


def test_a_repeated_macro_packet_is_taken_again_and_a_changed_one_is_seen():
    """Postfix sends the same "D L {i}" before every header: the decoder parses
    a repeat once, but every packet still yields its own macros, in order."""
    first = codec.Macro("L", {"i": "QID1"})
    other = codec.Macro("L", {"i": "QID2", "x": "\udcff"})  # an 8-bit value survives
    stream = [first, first, other, other, first, codec.Macro("E", {}), first]
    wire = b"".join(codec.encode_command(m) for m in stream)
    decoder = Decoder()
    got = decoder.feed(wire[:30]) + decoder.feed(wire[30:])
    assert got == stream
    assert Decoder().feed(codec.frame(b"D", b"")) == [codec.Macro("")]
    # a name without its value is dropped, a duplicate name keeps its last value
    (macro,) = Decoder().feed(codec.frame(b"D", b"Mi\x00A\x00i\x00B\x00{lone}\x00"))
    assert macro == codec.Macro("M", {"i": "B"})


def test_a_last_body_chunk_may_ride_on_end_of_message():
    assert Decoder().feed(codec.frame(b"E", b"tail\r\n")) == [codec.EndOfMessage(b"tail\r\n")]


def test_eight_bit_strings_survive_the_round_trip():
    mail = codec.Mail(("<j\xc3\xb6rg@example.test>".encode("latin-1").decode(
        "utf-8", "surrogateescape"),))
    wire = codec.encode_command(mail)
    assert Decoder().feed(wire) == [mail]
    header = codec.Header(b"Subject", b"\xff\xfe raw")
    assert Decoder().feed(codec.encode_command(header)) == [header]


# -- replies: golden bytes for every packet we send ------------------------------------------

GOLDEN_REPLIES = [
    (codec.OptNegReply(6, 0x3D, 0x1FF3C0),
     b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x00\x3d\x00\x1f\xf3\xc0"),
    (codec.Continue(), b"\x00\x00\x00\x01c"),
    (codec.Accept(), b"\x00\x00\x00\x01a"),
    (codec.Reject(), b"\x00\x00\x00\x01r"),
    (codec.Tempfail(), b"\x00\x00\x00\x01t"),
    (codec.Discard(), b"\x00\x00\x00\x01d"),
    (codec.Progress(), b"\x00\x00\x00\x01p"),
    (codec.ReplyCode("554 5.7.0 Reject, 100%% sure"),
     b"\x00\x00\x00\x1ey554 5.7.0 Reject, 100%% sure\x00"),
    (codec.AddHeader("X-Virus-Scanned", "by amavisd"),
     b"\x00\x00\x00\x1chX-Virus-Scanned\x00by amavisd\x00"),
    (codec.InsertHeader(0, "X-Virus-Scanned", "by amavisd"),
     b"\x00\x00\x00\x20i\x00\x00\x00\x00X-Virus-Scanned\x00by amavisd\x00"),
    (codec.ChangeHeader(1, "Subject", "new"),
     b"\x00\x00\x00\x11m\x00\x00\x00\x01Subject\x00new\x00"),
    (codec.ChangeHeader(2, "X-Old", ""), b"\x00\x00\x00\x0cm\x00\x00\x00\x02X-Old\x00\x00"),
    (codec.Quarantine("INFECTED"), b"\x00\x00\x00\x0aqINFECTED\x00"),
    (codec.AddRcpt("<c@example.test>"), b"\x00\x00\x00\x12+<c@example.test>\x00"),
    (codec.DelRcpt("<b@example.test>"), b"\x00\x00\x00\x12-<b@example.test>\x00"),
]


@pytest.mark.parametrize("reply,wire", GOLDEN_REPLIES,
                         ids=[type(r).__name__ + str(i) for i, (r, _) in
                              enumerate(GOLDEN_REPLIES)])
def test_golden_replies(reply, wire):
    assert encode(reply) == wire
    ((code, payload),) = Framer().feed(wire)
    assert bytes((code,)) + payload == wire[4:]


def test_a_nul_inside_a_reply_string_is_refused():
    with pytest.raises(ValueError):
        encode(codec.AddHeader("X-A", "a\0b"))
    with pytest.raises(ValueError):
        encode(codec.InsertHeader(-1, "X-A", "b"))


# -- framing ------------------------------------------------------------------------------------


def test_packets_are_reassembled_from_any_split():
    wire = b"".join(w for w, _ in GOLDEN_COMMANDS)
    expected = [c for _, c in GOLDEN_COMMANDS]
    for size in (1, 2, 3, 5, 7, 64):
        decoder, got = Decoder(), []
        for pos in range(0, len(wire), size):
            got.extend(decoder.feed(wire[pos:pos + size]))
        assert got == expected, size


def test_an_oversize_packet_is_refused_before_its_data_is_kept():
    decoder = Decoder(max_packet=1024)
    with pytest.raises(ProtocolError, match="over 1024"):
        decoder.feed(b"\x00\x00\x04\x01B")  # 1025 bytes announced, 1 sent
    assert decoder.framer.pending == 0
    with pytest.raises(ProtocolError):  # and it stays broken: no resynchronising
        decoder.feed(codec.encode_command(codec.Abort()))


def test_the_default_limit_takes_a_full_body_chunk_and_refuses_a_huge_length():
    chunk = codec.Body(b"x" * codec.BODY_CHUNK)
    assert Decoder().feed(codec.encode_command(chunk)) == [chunk]
    with pytest.raises(ProtocolError):
        Decoder().feed(b"\x7f\xff\xff\xffB")


def test_an_empty_packet_and_an_unknown_command_are_protocol_errors():
    with pytest.raises(ProtocolError, match="empty"):
        Decoder().feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="unknown command"):
        Decoder().feed(codec.frame(b"Z"))


def test_a_short_negotiation_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="12 expected"):
        Decoder().feed(codec.frame(b"O", b"\x00\x00\x00\x06"))


def test_short_packets_of_other_commands_are_taken_as_they_are():
    decoder = Decoder()
    assert decoder.feed(codec.frame(b"C", b"host")) == [codec.Connect("host")]
    assert decoder.feed(codec.frame(b"C", b"host\x004\x00")) == [codec.Connect("host", "4")]
    assert decoder.feed(codec.frame(b"L", b"Subject")) == [codec.Header(b"Subject", b"")]
    assert decoder.feed(codec.frame(b"M")) == [codec.Mail(())]
    assert decoder.feed(codec.frame(b"D")) == [codec.Macro("")]
