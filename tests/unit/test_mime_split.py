"""The MIME splitter (mimesplit.py) on tricky shapes, and against the stdlib.

The splitter must read structure as the stdlib's compat32 parser does (the
part tree the rest of the code knows), except where the module docstring
says it departs to lose nothing. The differential tests generate hostile
MIME and compare, bytes for bytes, with `email.parser`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email
import email.policy
import hashlib
import mmap
import random
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amavisd.decode import mimesplit, window
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.mimesplit import Body, Close, Open, Reread, Text, TooDeep
from amavisd.decode.transfer import NotStreamable, decode_base64, decode_body, stream_body
from amavisd.testing.eicar import EICAR

WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def shape(data: bytes, max_nesting: int = mimesplit.MAX_NESTING) -> list[tuple]:
    """The splitter's events, compactly: what the tests compare."""
    out: list[tuple] = []
    for event in mimesplit.Splitter(data, max_nesting).walk():
        if isinstance(event, Open):
            out.append(("open", event.entity.content_type))
        elif isinstance(event, Close):
            out.append(("close", event.closed))
        elif isinstance(event, Text):
            out.append(("text", event.name, data[event.start:event.end]))
        elif isinstance(event, Body):
            out.append(("body", event.entity.content_type, data[event.start:event.end]))
        elif isinstance(event, Reread):
            out.append(("reread", data[event.start:event.end]))
        elif isinstance(event, TooDeep):
            out.append(("too-deep", data[event.start:event.end]))
    return out


def mp(boundary: str, *parts: str, close: bool = True, preamble: str = "",
       epilogue: str = "", ctype: str = "multipart/mixed") -> str:
    body = preamble + "".join(f"--{boundary}\n{part}\n" for part in parts)
    if close:
        body += f"--{boundary}--\n" + epilogue
    return f'Content-Type: {ctype}; boundary="{boundary}"\n\n{body}'


def test_a_plain_message_is_one_body_with_its_last_line_end():
    assert shape(b"Subject: x\n\nhello\n") == [("body", "text/plain", b"hello\n")]


def test_boundaries_that_are_prefixes_of_each_other():
    # "b" and "bb"; "x" and "x--", where "--x--" closes the outer "x" (the
    # outermost multipart a line belongs to takes it), not opens "x--"
    raw = mp("b", mp("bb", "Content-Type: text/plain\n\ninner\n--b-\n--bbb"), "\nouter").encode()
    assert shape(raw) == [
        ("open", "multipart/mixed"), ("open", "multipart/mixed"),
        ("body", "text/plain", b"inner\n--b-\n--bbb"), ("close", True),
        ("body", "text/plain", b"outer"), ("close", True)]
    assert_as_stdlib(raw)
    raw = mp("x", mp("x--", "\nin", close=False), "\nlater").encode()
    assert ("close", True) in shape(raw) and ("body", "text/plain", b"later") not in shape(raw)
    assert_as_stdlib(raw)


def test_boundary_text_in_the_preamble_is_not_a_boundary():
    raw = mp("B", "\nbody", preamble="--Bogus\nx--B\n --B\n").encode()
    assert shape(raw)[:3] == [("open", "multipart/mixed"),
                              ("text", "(preamble)", b"--Bogus\nx--B\n --B"),
                              ("body", "text/plain", b"body")]
    assert_as_stdlib(raw)


def test_crlf_lf_and_bare_cr_give_the_same_structure():
    raw = mp("B", "Content-Type: text/plain\n\none\ntwo", "\nthree", preamble="pre\n").encode()
    for eol in (b"\n", b"\r\n", b"\r"):
        events = shape(raw.replace(b"\n", eol))
        assert [e[:2] for e in events] == [
            ("open", "multipart/mixed"), ("text", "(preamble)"), ("body", "text/plain"),
            ("body", "text/plain"), ("close", True)]
        # the line end before a boundary belongs to the boundary
        assert events[2][2] == b"one" + eol + b"two" and events[1][2] == b"pre"
        assert_as_stdlib(raw.replace(b"\n", eol))


def test_whitespace_after_a_boundary_but_nothing_else():
    raw = b'Content-Type: multipart/mixed; boundary="B"\n\n--B \t\n\none\n--B x\n--B--\t \n'
    assert shape(raw) == [("open", "multipart/mixed"), ("body", "text/plain", b"one\n--B x"),
                          ("close", True)]
    assert_as_stdlib(raw)


def test_missing_final_boundary_runs_to_the_end():
    raw = mp("B", "\none", "\ntwo\n", close=False).encode()
    assert shape(raw) == [("open", "multipart/mixed"), ("body", "text/plain", b"one"),
                          ("body", "text/plain", b"two\n"), ("close", False)]
    assert_as_stdlib(raw)


def test_consecutive_delimiters_open_one_part():
    raw = b'Content-Type: multipart/mixed; boundary="B"\n\n--B\n--B\n--B\n\none\n--B--\n'
    assert [e for e in shape(raw) if e[0] == "body"] == [("body", "text/plain", b"one")]
    assert_as_stdlib(raw)


def test_nested_multiparts_sharing_a_boundary_are_read_both_ways():
    """The stdlib gives the inner multipart nothing (the outer takes every
    "--B" line); a reader that looks at the innermost boundary first sees a
    nested multipart: both readings are handed on."""
    inner = mp("B", "Content-Type: text/plain\n\nin one", "\nin two")
    raw = mp("B", "\nfirst", inner).encode()
    events = shape(raw)
    assert ("body", "multipart/mixed", b"") in events  # the stdlib's reading
    assert ("body", "text/plain", b"in one") in events
    assert_as_stdlib(raw)
    (reread,) = [e[1] for e in events if e[0] == "reread"]
    assert reread.startswith(b'Content-Type: multipart/mixed; boundary="B"\n\n--B\n')
    assert shape(reread) == [("open", "multipart/mixed"), ("body", "text/plain", b"in one"),
                             ("body", "text/plain", b"in two"), ("close", True)]


def test_an_outer_boundary_cuts_an_inner_part_and_the_other_reading_is_kept():
    inner = mp("in", "Content-Type: text/plain\n\nhello\n--out\nstill inner?", "\nlast")
    raw = mp("out", inner, "\nouter part").encode()
    events = shape(raw)
    assert ("body", "text/plain", b"hello") in events  # cut, as the stdlib does
    assert ("body", "text/plain", b"still inner?\n--in\n\nlast\n--in--\n") in events
    assert_as_stdlib(raw)
    (reread,) = [e[1] for e in events if e[0] == "reread"]
    assert ("body", "text/plain", b"hello\n--out\nstill inner?") in shape(reread)


def test_a_close_delimiter_before_any_other_keeps_what_follows():
    """The stdlib drops everything after it: here it is kept, as text."""
    raw = b'Content-Type: multipart/mixed; boundary="B"\n\npre\n--B--\n--B\n\nhidden\n--B--\n'
    assert shape(raw) == [("body", "multipart/mixed", b"pre\n"),
                          ("text", "(after the close delimiter)", b"--B\n\nhidden\n--B--\n")]


def test_a_boundary_line_that_looks_like_a_header_field_ends_the_header_block():
    raw = (b'Content-Type: multipart/mixed; boundary="B: x"\n\n--B: x\n'
           b"Content-Type: text/html\n--B: x\nContent-Type: text/plain\n\nbody\n--B: x--\n")
    assert [e for e in shape(raw) if e[0] == "body"] == [("body", "text/html", b""),
                                                         ("body", "text/plain", b"body")]
    assert_as_stdlib(raw)


def test_digest_parts_default_to_message_rfc822():
    raw = mp("D", "\nSubject: one\n\nbody", ctype="multipart/digest").encode()
    assert ("body", "message/rfc822", b"Subject: one\n\nbody") in shape(raw)
    assert_as_stdlib(raw)


def test_a_last_header_line_from_starts_the_body_with_the_blank_line_after_it():
    # (the stdlib drops that blank line; we keep every byte)
    assert shape(b"Subject: x\nFrom nobody\n\nbody\n") == [
        ("body", "text/plain", b"From nobody\n\nbody\n")]


def test_nesting_past_the_limit_is_handed_back_raw():
    raw = mp("a", mp("b", mp("c", "\ndeep"))).encode()
    events = shape(raw, max_nesting=2)
    (too_deep,) = [e[1] for e in events if e[0] == "too-deep"]
    assert too_deep.startswith(b'Content-Type: multipart/mixed; boundary="c"')
    assert too_deep.endswith(b"--c--\n")  # the whole entity, up to the boundary around it
    assert events.count(("open", "multipart/mixed")) == 2


# -- against the stdlib --------------------------------------------------------


def assert_as_stdlib(data: bytes) -> None:
    expected = stdlib_shape(email.message_from_bytes(data, policy=email.policy.compat32), [])
    assert splitter_shape(data) == expected


def stdlib_shape(message, out: list) -> list:
    """The stdlib's tree in the terms of `splitter_shape`."""
    content_type = message.get_content_type()
    if message.is_multipart() and not content_type.startswith("message/"):
        out.append(("open", content_type))
        if message.preamble and message.preamble.strip():
            out.append(("text", message.preamble.encode("utf-8", "surrogateescape")))
        for sub in message.get_payload():
            stdlib_shape(sub, out)
        if message.epilogue and message.epilogue.strip():
            out.append(("text", message.epilogue.encode("utf-8", "surrogateescape")))
        out.append(("close",))
    elif content_type.startswith("message/"):
        out.append(("message", content_type))
    else:
        payload = message._payload  # the bytes as read (get_payload() re-decodes them)
        out.append(("body", content_type, payload.encode("utf-8", "surrogateescape")))
    return out


def splitter_shape(data: bytes) -> list:
    out: list = []
    for event in mimesplit.Splitter(data).walk():
        if isinstance(event, Open):
            out.append(("open", event.entity.content_type))
        elif isinstance(event, Close):
            out.append(("close",))
        elif isinstance(event, Text) and event.name != "(after the close delimiter)":
            if data[event.start:event.end].strip(WHITESPACE):
                out.append(("text", data[event.start:event.end]))
        elif isinstance(event, Body):
            content_type = event.entity.content_type
            if content_type.startswith("message/"):
                out.append(("message", content_type))
            else:
                out.append(("body", content_type, data[event.start:event.end]))
    return out


POOL = [b"B", b"BB", b"B-", b"B--", b"a b", b"x", b"=_"]


def hostile_mime(rng: random.Random, depth: int = 0, bounds: tuple = ()) -> bytes:
    """Nested multiparts with boundaries that are prefixes of each other or
    shared, odd line ends, doubled and missing delimiters, stray "--" lines."""
    def eol() -> bytes:
        return rng.choice([b"\n", b"\n", b"\n", b"\r\n", b"\r"])

    if depth < 4 and rng.random() < 0.5:
        boundary = rng.choice(POOL + list(bounds))
        kind = rng.choice([b"mixed", b"digest", b"alternative"])
        head = b"Content-Type: multipart/" + kind + b'; boundary="' + boundary + b'"' + eol()
        body = b"preamble" + eol() if rng.random() < 0.3 else b""
        if rng.random() < 0.1:
            body += b"--" + rng.choice(POOL) + eol()
        for _ in range(rng.randint(0, 3)):
            body += b"--" + boundary + (b" \t" if rng.random() < 0.1 else b"") + eol()
            if rng.random() < 0.1:
                body += b"--" + boundary + eol()
            body += hostile_mime(rng, depth + 1, bounds + (boundary,)) + eol()
        if rng.random() < 0.7:
            body += b"--" + boundary + b"--" + eol()
        if rng.random() < 0.3:
            body += b"epilogue" + eol()
        if rng.random() < 0.1:
            body += b"--" + rng.choice(POOL) + b"--" + eol()
        return head + (eol() if rng.random() < 0.95 else b"") + body
    head = b""
    if rng.random() < 0.15 and depth < 4:
        return b"Content-Type: message/rfc822" + eol() + eol() + hostile_mime(rng, depth + 1)
    if rng.random() < 0.6:
        head = b"Content-Type: text/plain" + eol()
    lines = [b"line", b"--", b"-- sig", b"", b"x:y", b" indented"]
    body = b"".join(rng.choice(lines) + eol() for _ in range(rng.randint(0, 4)))
    return head + (eol() if rng.random() < 0.9 else b"") + body


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        pos = rng.randint(0, len(buf))
        junk = bytes(rng.choice(b"-\r\n:Bx =\"\t\x00\xe9;*'") for _ in range(rng.randint(1, 4)))
        buf[pos:pos + (len(junk) if rng.random() < 0.5 else 0)] = junk
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.booleans())
def test_same_structure_as_the_stdlib(seed, mutated):
    rng = random.Random(seed)
    data = hostile_mime(rng)
    if mutated:
        data = mutate(rng, data)
    if b"From " not in data:  # our one documented departure at a header's end
        assert_as_stdlib(data)


# -- transfer encodings -------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60), st.lists(st.tuples(st.integers(0, 200), st.sampled_from(
    [b"=", b"\r\n", b"\n", b" ", b"!", b"-", b"A", b"==", b"\x00"])), max_size=4),
    st.integers(0, 3))
def test_base64_decodes_as_the_stdlib_does_and_flags_the_same_bodies(payload, edits, cut):
    body = bytearray(base64.encodebytes(payload))
    for pos, junk in edits:
        body[pos:pos] = junk
    body = bytes(body[:len(body) - cut])
    message = email.message_from_bytes(b"Content-Transfer-Encoding: base64\n\n" + body,
                                       policy=email.policy.compat32)
    expected = message.get_payload(decode=True)
    expected_clean = not any(type(d).__name__.startswith("InvalidBase64")
                             for d in message.defects)
    assert decode_base64(b"..." + body + b"...", 3, 3 + len(body)) == (expected, expected_clean)


def test_quoted_printable_and_unknown_encodings():
    data = b"xx=41=\nB\nyy"
    assert decode_body(data, 2, 9, "quoted-printable", 1000) == (b"AB\n", True)
    assert decode_body(data, 2, 9, "7bit", 1000) == (b"=41=\nB\n", True)
    # the stdlib does not take "base64 " (a trailing space) as base64, nor do we
    assert decode_body(b"QUJD", 0, 4, "base64 ", 1000) == (b"QUJD", True)


# -- big messages: mapped, a window at a time -----------------------------------------
# The same bytes read from a mapping with tiny windows (so every window edge,
# carried base64 quantum and line-aligned cut is exercised on small input)
# must give the same events, the same decoded bodies and the same part tree.


@pytest.fixture
def tiny_windows(monkeypatch):
    monkeypatch.setattr(window, "WINDOW", 97)
    monkeypatch.setattr(window, "LINES", 61)
    monkeypatch.setattr(window, "OVERLAP", 40)
    monkeypatch.setattr(window, "MAP_ABOVE", 0)


@contextlib.contextmanager
def mapping(data: bytes):
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield mm
        finally:
            window.close(mm)


def test_splitting_a_mapping_by_windows_gives_the_same_events(tiny_windows):
    rng = random.Random(1405)
    for _ in range(300):
        data = hostile_mime(rng)
        if rng.random() < 0.5:
            data = mutate(rng, data)
        if not data:
            continue
        with mapping(data) as mm:
            assert shape(mm) == shape(data), data


def _stream(data, encoding: str) -> tuple[bytes, bool] | None:
    with mapping(b"..." + data + b"...") as mm:
        streamed = stream_body(mm, 3, 3 + len(data), encoding, 1 << 30)
        if streamed is None:
            return None
        try:
            out = b"".join(streamed)
        except NotStreamable:
            return None
        return out, streamed.clean


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([76, 60, 61, 4, 1]),
       st.sampled_from([b"\n", b"\r\n"]), st.integers(0, 3))
def test_streamed_base64_decodes_as_the_whole_body_path(payload, width, eol, cut):
    digits = base64.b64encode(payload)
    body = eol.join(digits[i:i + width] for i in range(0, len(digits), width)) + eol
    body = body[:len(body) - cut]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window, "LINES", 61)
        mp.setattr(window, "WINDOW", 97)
        got = _stream(body, "base64")
    whole = decode_base64(body, 0, len(body))
    assert got is None or got == whole
    if digits and len(body) == len(digits) + body.count(eol) and len(digits) % 4 == 0:
        assert got == whole  # clean and whole: always streamed


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["quoted-printable", "x-uuencode", "7bit"]))
def test_streamed_qp_uuencode_and_plain_decode_as_the_whole_body_path(payload, encoding):
    if encoding == "quoted-printable":
        body = binascii.b2a_qp(payload, istext=False)
    elif encoding == "x-uuencode":
        body = b"begin 644 f\n" + b"".join(binascii.b2a_uu(payload[i:i + 45])
                                           for i in range(0, len(payload), 45)) + b"`\nend\n"
    else:
        body = payload
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window, "LINES", 61)
        mp.setattr(window, "WINDOW", 97)
        assert _stream(body, encoding) == decode_body(body, 0, len(body), encoding, 1 << 30)


def _tree(dec) -> list[tuple]:
    # depth, not the path: a Sink that spills takes a part number of its own
    return [(p.depth, p.detected, p.mime_type, p.name, p.size, sorted(p.flags),
             hashlib.sha256(b"".join(p.chunks())).hexdigest() if p.depth or p.parent else "")
            for p in dec.root.walk()]


def test_a_mapped_message_streamed_to_files_decomposes_as_in_memory(tiny_windows, tmp_path,
                                                                     corpus):
    """Every body streamed (spill_threshold 0), from a mapping read by tiny
    windows: the same tree, the same bytes in every part, the same reasons.
    (The heuristic searches in text are exact only for matches shorter than
    OVERLAP: 64 KiB in use, 4 KiB here.)"""
    window.WINDOW, window.OVERLAP, window.LINES = 16384, 4096, 997  # restored by tiny_windows
    rng = random.Random(77)
    real = sorted(p for p in (corpus / "mail" / "real").rglob("*") if p.is_file())
    samples = [p.read_bytes() for p in real[::10] if p.stat().st_size < 64 * 1024]
    samples += [hostile_mime(rng) for _ in range(100)]
    samples += [big_shapes() for _ in range(3)]
    for data in samples:
        if not data:
            continue
        reference = decompose(data, Limits(), str(tmp_path))
        with mapping(data) as mm:
            streamed = decompose(mm, Limits(spill_threshold=0, max_memory=0), str(tmp_path))
            try:
                assert _tree(streamed) == _tree(reference), data[:200]
                assert streamed.unchecked == reference.unchecked
            finally:
                streamed.root.detach()
                streamed.cleanup()
                reference.cleanup()


def big_shapes() -> bytes:
    """Each encoding the streaming path takes, with EICAR inside, in one message."""
    payload = random.randbytes(5000) + EICAR
    uu = b"".join(binascii.b2a_uu(payload[i:i + 45]) for i in range(0, len(payload), 45))
    return (b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="zz"\n\npre\n'
            b"--zz\nContent-Type: text/plain\n\n" + b"plain text line\n" * 300 +
            b"--zz\nContent-Transfer-Encoding: base64\n\n" + base64.encodebytes(payload) +
            b"--zz\nContent-Transfer-Encoding: quoted-printable\n\n" +
            binascii.b2a_qp(payload, istext=False) + b"\n"
            b"--zz\nContent-Type: text/plain\n\nsee:\nbegin 644 x.bin\n" + uu + b"`\nend\n"
            b"--zz\nContent-Type: message/rfc822\n\nSubject: inner\n\n" + b"inner\n" * 200 +
            b"--zz--\nepilogue\n")
