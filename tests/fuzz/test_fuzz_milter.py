"""Fuzzing the milter: the codec and the per-connection state machine take
hostile bytes from the MTA side and hostile replies from the daemon side.

Properties: nothing but ProtocolError escapes the decoder, and nothing at
all escapes the state machine; what is held stays bounded by the packet
limit; whatever we send is well framed; every end of message gets exactly
one final verdict, and never an accept unless the daemon said so (or the
postmaster configured on_error=accept); every spool is discarded or handed
to the driver, never leaked.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from amavisd_client.milter import codec
from amavisd_client.milter.state import Ask, MilterSession
from amavisd_client.milter.verdicts import Policy, reply_text
from amavisd_client.wire.ampdp import Block, decode_blocks, encode_block

SMALL_LIMIT = 2048

text = st.text(alphabet=st.characters(blacklist_characters="\0", max_codepoint=0x3FF),
               max_size=30)
name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_{}", min_size=1, max_size=12).filter(
    lambda n: not (n.startswith("{") and n.endswith("}")) and "{" not in n[1:-1])
raw = st.binary(max_size=200).map(lambda b: b.replace(b"\0", b""))

commands = st.one_of(
    st.builds(codec.OptNeg, st.integers(0, 8), st.integers(0, 0x1FF), st.integers(0, 0x3FFFFF)),
    st.builds(codec.Macro, st.sampled_from("CHMRTLNBE"), st.dictionaries(
        name.filter(lambda n: "{" not in n and "}" not in n), text, max_size=4)),
    st.builds(codec.Connect, text, st.sampled_from("46LU"), st.integers(0, 65535), text)
    .map(lambda c: codec.Connect(c.hostname, "U") if c.family == "U" else c),
    st.builds(codec.Helo, text),
    st.builds(codec.Mail, st.lists(text, max_size=3).map(tuple)),
    st.builds(codec.Rcpt, st.lists(text, max_size=3).map(tuple)),
    st.just(codec.Data()),
    st.builds(codec.Header, raw.filter(bool), raw),
    st.just(codec.EndOfHeaders()),
    st.builds(codec.Body, st.binary(max_size=300)),
    st.builds(codec.EndOfMessage, st.binary(max_size=50)),
    st.builds(codec.Unknown, raw),
    st.just(codec.Abort()),
    st.just(codec.QuitNewConnection()),
)

FINAL_CODES = set(b"cayrtd")


@given(st.lists(commands, max_size=30), st.lists(st.integers(1, 50), max_size=20))
def test_commands_survive_encoding_and_any_split(sequence, cuts):
    wire = b"".join(codec.encode_command(c) for c in sequence)
    decoder, got, pos = codec.Decoder(), [], 0
    for cut in cuts:
        got.extend(decoder.feed(wire[pos:pos + cut]))
        pos += cut
    got.extend(decoder.feed(wire[pos:]))
    assert got == list(sequence)


@given(st.lists(st.binary(max_size=300), max_size=30))
def test_junk_raises_only_protocol_errors_and_stays_bounded(chunks):
    decoder = codec.Decoder(max_packet=SMALL_LIMIT)
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except codec.ProtocolError:
            return
        assert decoder.framer.pending <= SMALL_LIMIT + 4 + len(chunk)


class Sink:
    def __init__(self, log: list, fail: bool):
        self.path, self.dir = "/tb/x/email.txt", "/tb/x"
        self.size, self.fail, self.discarded = 0, fail, False
        log.append(self)

    def write(self, data: bytes) -> None:
        if self.fail and self.size > 100:
            raise OSError(28, "No space left on device")
        self.size += len(data)

    def discard(self) -> None:
        self.discarded = True


replies = st.one_of(
    st.builds(lambda rv, edits, code: encode_block(
        [("return_value", rv)] + edits + [("setreply", code)]),
        st.sampled_from(["continue", "accept", "reject", "discard", "tempfail", "x", ""]),
        st.lists(st.tuples(st.sampled_from(["insheader", "addheader", "chgheader",
                                            "delheader", "delrcpt", "addrcpt",
                                            "quarantine"]),
                           st.lists(text, min_size=1, max_size=3)), max_size=4),
        st.lists(text, min_size=0, max_size=3)),
    st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
)


@given(st.lists(st.one_of(commands.map(codec.encode_command), st.binary(max_size=40)),
                max_size=40),
       st.lists(st.one_of(replies, st.none()), max_size=10),
       st.booleans(), st.sampled_from(["tempfail", "reject"]),
       st.frozensets(st.sampled_from(["discard", "reject"])))
def test_the_state_machine_never_raises_and_never_accepts_by_accident(
        pieces, answers, failing_sink, on_error, quarantine):
    sinks: list[Sink] = []
    session = MilterSession(lambda: Sink(sinks, failing_sink), Policy(on_error, quarantine),
                            "{daemon_name},X", max_packet=SMALL_LIMIT)
    out = bytearray()
    answers = list(answers)
    handed = []
    asked = 0
    for piece in [*pieces, b""]:
        events = session.feed(piece)
        while events:
            event = events.pop(0)
            if isinstance(event, Ask):
                asked += 1
                handed.append(event.sink)
                assert dict(event.attrs)["request"] == "AM.PDP"
                answer = answers.pop(0) if answers else None
                if answer is None:
                    verdict = session.fail("no daemon")
                    said = None
                else:
                    block = (decode_blocks(answer) or [Block()])[0]
                    verdict = session.answer(block)
                    said = block.get("return_value") if not block.errors else None
                codes = [chr(code) for code, _ in codec.Framer().feed(verdict)]
                finals = [code for code in codes if ord(code) in FINAL_CODES]
                assert len(finals) == 1 and codes[-1] == finals[0]
                held = "q" in codes and said in quarantine  # accepted into the MTA's hold
                if finals[0] in "ca" and not held:
                    assert said in ("continue", "accept"), (said, verdict)
                out += verdict
                events.extend(session.feed(b""))
            elif hasattr(event, "data"):
                out += event.data
        if session.closed:
            break
    session.close()
    for packet_code, _ in codec.Framer(max_packet=1 << 21).feed(bytes(out)):
        assert packet_code in b"Ocayrtdpihmq+-"
    for sink in sinks:
        assert sink.discarded or sink in handed  # no spool left behind


POSTFIX_LINE = re.compile(r"^([45])\d\d[ -]([45])\.\d{1,3}\.\d{1,3} [ -~]+$")


@given(text, text, st.text(max_size=600), st.sampled_from(["45", "4"]))
def test_reply_texts_always_pass_postfix_checks(code, xcode, body, classes):
    reply = reply_text(code, xcode, body, classes, ("554", "5.7.0", "default")
                       if classes == "45" else ("451", "4.5.0", "default"))
    assert "\0" not in reply
    lines = reply.split("\r\n")
    assert 1 <= len(lines) <= 8
    for n, line in enumerate(lines):
        match = POSTFIX_LINE.match(line)
        assert match and match.group(1) == match.group(2), line
        assert line[0] in classes
        assert line[3] == ("-" if n < len(lines) - 1 else " ")
        assert re.sub("%%", "", line).count("%") == 0  # every % doubled
        assert len(line) <= 512
