"""The AM.PDP codec: round trips, the protocol's own examples, hostile input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from amavisd_client.wire.ampdp import MAX_LINE, Decoder, decode, encode_block, encode_field


def test_round_trip_of_every_byte_in_values():
    value = "".join(chr(c) for c in range(256))
    blocks = Decoder().feed(encode_block([("request", "AM.PDP"), ("x", value)]))
    assert len(blocks) == 1
    assert blocks[0].get("x") == value


def test_encoding_leaves_printable_ascii_alone_and_escapes_the_rest():
    assert encode_field("<a@b.c>") == b"<a@b.c>"
    assert encode_field("a b%c=d\r\n\0") == b"a%20b%25c=d%0D%0A%00"


def test_multi_field_values_split_only_on_unencoded_spaces():
    wire = encode_block([("insheader", ["0", "X-Virus-Scanned", "by amavisd 1.0 at host"])])
    assert wire == b"insheader=0 X-Virus-Scanned by%20amavisd%201.0%20at%20host\r\n\r\n"
    (block,) = Decoder().feed(wire)
    assert block.fields("insheader", 3) == [["0", "X-Virus-Scanned", "by amavisd 1.0 at host"]]


def test_repeated_attributes_keep_their_order():
    wire = b"request=AM.PDP\r\nrecipient=<a@x>\r\nrecipient=<b@x>\r\nrecipient=<c@x>\r\n\r\n"
    (block,) = Decoder().feed(wire)
    assert block.getall("recipient") == ["<a@x>", "<b@x>", "<c@x>"]
    assert block.first_name == "request"


def test_readme_protocol_example_reply_parses():
    wire = (b"setreply=250 2.5.0 Ok,%20id=MWZmu9Di,%20continue%20delivery\r\n"
            b"return_value=continue\r\nexit_code=0\r\n\r\n")
    (block,) = Decoder().feed(wire)
    assert block.get("setreply") == "250 2.5.0 Ok, id=MWZmu9Di, continue delivery"
    assert block.fields("setreply", 3)[0][2] == "Ok, id=MWZmu9Di, continue delivery"


def test_bad_percent_escapes_stay_literal():
    assert decode(b"%zz") == "%zz"
    assert decode(b"100%") == "100%"
    assert decode(b"%4") == "%4"
    assert decode(b"%4g%41") == "%4gA"
    assert decode(b"%%41") == "%A"


def test_several_blocks_in_one_read_and_one_block_over_many_reads():
    wire = encode_block([("request", "AM.PDP"), ("a", "1")]) * 3
    assert len(Decoder().feed(wire)) == 3
    decoder = Decoder()
    out = []
    for i in range(len(wire)):
        out.extend(decoder.feed(wire[i:i + 1]))
    assert [b.get("a") for b in out] == ["1", "1", "1"]


def test_bare_lf_is_accepted():
    (block,) = Decoder().feed(b"request=AM.PDP\nsender=<a@b>\n\n")
    assert block.get("sender") == "<a@b>"


def test_stray_empty_lines_do_not_make_empty_requests():
    assert Decoder().feed(b"\r\n\r\n\r\n") == []


def test_line_without_equals_and_empty_names_are_errors_not_exceptions():
    (block,) = Decoder().feed(b"request=AM.PDP\r\ngarbage\r\n%00odd=1\r\n=x\r\n\r\n")
    assert block.get("request") == "AM.PDP"
    assert block.get("\0odd") == "1"  # an encoded NUL in a name is legal, just unknown
    assert len(block.errors) == 2


def test_one_megabyte_line_is_dropped_and_framing_survives():
    decoder = Decoder()
    hostile = b"request=AM.PDP\r\nsender=" + b"A" * (1024 * 1024) + b"\r\n\r\n"
    good = encode_block([("request", "AM.PDP"), ("sender", "<ok@x>")])
    blocks = []
    for start in range(0, len(hostile), 8192):  # as a socket would deliver it
        blocks.extend(decoder.feed(hostile[start:start + 8192]))
        assert len(decoder._buffer) <= MAX_LINE + 8192  # memory stays bounded
    blocks.extend(decoder.feed(good))
    assert len(blocks) == 2
    assert blocks[0].errors and "longer than" in blocks[0].errors[0]
    assert blocks[0].get("sender") is None
    assert blocks[1].errors == [] and blocks[1].get("sender") == "<ok@x>"


def test_too_many_attributes_is_an_error():
    decoder = Decoder(max_attributes=10)
    (block,) = decoder.feed(b"".join(b"recipient=<r%d@x>\r\n" % i for i in range(50)) + b"\r\n")
    assert len(block.pairs) == 10
    assert block.errors == ["too many attributes (> 10)"]


names = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=1,
                max_size=20)
values = st.text(max_size=200)


@given(st.lists(st.tuples(names, values), min_size=1, max_size=20))
def test_round_trip_property(attrs):
    (block,) = Decoder().feed(encode_block(attrs))
    assert [(k, block_value) for (k, _), block_value in
            zip(block.pairs, [decode(v) for _, v in block.pairs], strict=True)] == attrs


@settings(max_examples=300)
@given(st.binary(max_size=4000), st.integers(min_value=1, max_value=700))
def test_arbitrary_bytes_never_raise(data, chunk):
    decoder = Decoder(max_line=512)
    for start in range(0, len(data), chunk):
        for block in decoder.feed(data[start:start + chunk]):
            block.as_dict()
            for name, _ in block.pairs:
                assert name
        assert len(decoder._buffer) <= 512 + chunk


def test_megabytes_of_bad_lines_keep_a_bounded_error_list():
    """4 MB of lines without '=' once made 2 million error strings (+180 MB)."""
    decoder = Decoder()
    blocks = []
    for _ in range(64):
        blocks.extend(decoder.feed(b"x\n" * 32768))
    blocks.extend(decoder.feed(b"\n"))
    (block,) = blocks
    assert len(block.errors) <= 32
    assert block.error_count == 64 * 32768


def test_the_tail_of_a_long_line_and_what_follows_it_in_one_read():
    decoder = Decoder(max_line=16)
    assert decoder.feed(b"request=AM.PDP\r\nsender=" + b"A" * 40) == []
    (block,) = decoder.feed(b"AAAA\r\nrecipient=<r@x>\r\n\r\n")  # the tail, then more lines
    assert block.errors == ["line longer than 16 bytes"]
    assert block.pairs == [("request", b"AM.PDP"), ("recipient", b"<r@x>")]


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "%", "c d", "\0"]), values), max_size=12))
def test_firsts_is_get_for_every_name(attrs):
    (block,) = Decoder().feed(encode_block([("request", "x"), *attrs]))
    firsts = block.firsts()
    assert set(firsts) == {name for name, _ in block.pairs}
    for name in firsts:
        assert firsts[name] == block.get(name)
