"""Fuzzing the AM.PDP codec and request parsing: hostile bytes from local
clients never raise, never desynchronise framing, never grow without bound."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from amavisd.protocol.ampdp import RequestError, parse_message_request
from amavisd_client.wire.ampdp import Decoder, decode_blocks, encode_block

line = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, v: n + b"=" + v,
              st.sampled_from([b"request", b"sender", b"recipient", b"tempdir", b"mail_file",
                               b"tempdir_removed_by", b"delivery_care_of", b"%00", b"x%ZZ"]),
              st.binary(max_size=120)),
    st.sampled_from([b"", b"request=AM.PDP", b"=", b"%", b"\r", b"a=b c d"]),
)
stream = st.lists(line, max_size=40).map(lambda lines: b"\r\n".join(lines) + b"\r\n\r\n")


@given(stream, st.lists(st.integers(1, 64), max_size=20))
def test_any_split_of_the_bytes_gives_the_same_blocks(data, cuts):
    whole = [(b.pairs, b.errors) for b in decode_blocks(data)]
    decoder, pieces, pos = Decoder(), [], 0
    for cut in cuts:
        pieces.extend(decoder.feed(data[pos:pos + cut]))
        pos += cut
    pieces.extend(decoder.feed(data[pos:]))
    assert [(b.pairs, b.errors) for b in pieces] == whole


@given(st.lists(st.tuples(st.text(min_size=1, max_size=20),
                          st.one_of(st.text(max_size=50),
                                    st.lists(st.text(max_size=20), min_size=1, max_size=4))),
                min_size=1, max_size=15))
def test_encode_then_decode_gives_the_attributes_back(attrs):
    (block,) = decode_blocks(encode_block(attrs))
    assert block.errors == []
    for (name, value), (got_name, raw) in zip(attrs, block.pairs, strict=True):
        assert got_name == name
        fields = [value] if isinstance(value, str) else value
        assert len(raw.split(b" ")) == len(fields)


@given(stream)
def test_requests_are_refused_cleanly_or_parsed(data):
    for block in decode_blocks(data):
        try:
            request = parse_message_request(block, "/nonexistent/tempbase", "f-1")
        except RequestError as err:
            assert str(err)
        else:
            assert request.job.mail_path.startswith("/nonexistent/tempbase/")


@given(st.binary(min_size=1, max_size=4096), st.integers(1, 40))
def test_endless_junk_keeps_the_decoder_small(junk, repeats):
    decoder = Decoder(max_line=1024)
    for _ in range(repeats):
        decoder.feed(junk)
    assert len(decoder._buffer) <= 1024 + len(junk)
    assert len(decoder._block.errors) <= 32
