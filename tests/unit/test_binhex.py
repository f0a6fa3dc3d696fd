# SPDX-License-Identifier: MIT
"""BinHex 4.0 decoder: real encoder output (macutils), the corpus, hostile input."""

from __future__ import annotations

import base64
import binascii
import os
import random
import shutil
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amavisd.decode.binhex import (
    ALPHABET,
    BinHexError,
    _Expander,
    decode_binhex,
    find_binhex,
)
from amavisd.testing.eicar import CLAM_EXE_PATH, EICAR

LIMIT = 1 << 20
MARKER = b"(This file must be converted with BinHex 4.0)"
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# --- a small reference encoder, for hostile streams macutils would never write ---


def rle(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        j = i
        while j < len(raw) and raw[j] == raw[i] and j - i < 255:
            j += 1
        lit = b"\x90\x00" if raw[i] == 0x90 else raw[i : i + 1]
        out += lit + b"\x90" + bytes([j - i]) if j - i >= 3 else lit * (j - i)
        i = j
    return bytes(out)


def six(raw: bytes) -> bytes:
    return base64.b64encode(raw).rstrip(b"=").translate(bytes.maketrans(B64, ALPHABET))


def frame(encoded: bytes, eol: bytes = b"\n", close: bool = True) -> bytes:
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)] or [b""]
    return MARKER + eol + b":" + eol.join(lines) + (b":" if close else b"") + eol


def crc(data: bytes) -> bytes:
    return binascii.crc_hqx(data, 0).to_bytes(2, "big")


def stream(
    data: bytes, rsrc: bytes = b"", name: bytes = b"f.bin", dlen=None, rlen=None, bad: str = ""
) -> bytes:
    """The decoded byte stream (before RLE); ``bad`` names a CRC to spoil."""
    head = bytes([len(name)]) + name + b"\0" + b"TEXTMACA" + b"\x01\x00"
    head += (len(data) if dlen is None else dlen).to_bytes(4, "big")
    head += (len(rsrc) if rlen is None else rlen).to_bytes(4, "big")

    def sect(body: bytes, which: str) -> bytes:
        check = crc(body)
        return body + (bytes([check[0] ^ 1, check[1]]) if bad == which else check)

    return sect(head, "header") + sect(data, "data") + sect(rsrc, "resource")


def encode(data: bytes, rsrc: bytes = b"", **kw) -> bytes:
    return frame(six(rle(stream(data, rsrc, **kw))))


# --- the CRC as the spec defines it ---


def crc_bitserial(data: bytes) -> int:
    """Lewis/Fukuda: shift each data bit in at the bottom, xor 0x1021 on carry-out."""
    reg = 0
    for byte in data:
        for bit in range(7, -1, -1):
            carry = reg & 0x8000
            reg = ((reg << 1) | ((byte >> bit) & 1)) & 0xFFFF
            if carry:
                reg ^= 0x1021
    return reg


@given(st.binary(max_size=300))
def test_crc_is_bitserial_over_section_plus_two_zero_bytes(data):
    assert crc_bitserial(data + b"\0\0") == binascii.crc_hqx(data, 0)
    assert crc_bitserial(data + crc(data)) == 0  # stored CRC makes the register zero


def test_crc_check_value():
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3  # CRC-16/XMODEM check value


# --- real encoder: macutils binhex ---

BINHEX = shutil.which("binhex")
needs_macutils = pytest.mark.skipif(BINHEX is None, reason="macutils `binhex` not installed")

SAMPLES = {
    "text.txt": b"Hello, BinHex!\nThe quick brown fox jumps over the lazy dog.\n" * 50,
    "all256.bin": bytes(range(256)) * 64 + bytes(reversed(range(256))) * 3,
    "empty.dat": b"",
    "runs.bin": b"A" * 1000
    + b"\x90" * 700
    + b"\x00" * 5000
    + b"\x90\x90"
    + b"xy" * 3
    + b"\xff" * 256,
    "eicar.com": EICAR,
    "random.bin": random.Random(1741).randbytes(50_000),
}


def macutils_hqx(tmp_path: Path, name: str, content: bytes) -> bytes:
    path = tmp_path / name
    path.write_bytes(content)
    done = subprocess.run([BINHEX, "-d", name], cwd=tmp_path, capture_output=True, check=True)
    return done.stdout


@needs_macutils
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_macutils_round_trip(tmp_path, name):
    content = SAMPLES[name]
    hqx = macutils_hqx(tmp_path, name, content)
    assert hqx.startswith(b"(This file must be converted; you knew that already.)")
    assert find_binhex(hqx) == [(0, hqx.rindex(b":") + 1)]
    result = decode_binhex(hqx, LIMIT)
    assert result.data == content
    assert (result.resource, result.crc_ok, result.truncated) == (b"", True, False)
    assert (result.name, result.file_type, result.creator) == (name, b"TEXT", b"MACA")


@needs_macutils
def test_macutils_really_used_rle(tmp_path):
    """macutils' streams hold runs and escaped 0x90s, or those paths were never exercised."""

    def unsix(hqx: bytes) -> bytes:
        body = hqx.split(b":")[1].translate(None, b"\r\n").translate(bytes.maketrans(ALPHABET, B64))
        return base64.b64decode(body[: len(body) // 4 * 4])

    assert b"\x90\xff" in unsix(macutils_hqx(tmp_path, "runs.bin", SAMPLES["runs.bin"]))
    assert b"\x90\x00" in unsix(macutils_hqx(tmp_path, "all256.bin", SAMPLES["all256.bin"]))


@needs_macutils
@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
@pytest.mark.parametrize("quote", [b"", b"> ", b"  "])
def test_macutils_in_a_mail_body(tmp_path, eol, quote):
    hqx = macutils_hqx(tmp_path, "all256.bin", SAMPLES["all256.bin"])
    pasted = eol.join(quote + line for line in hqx.splitlines())
    body = eol.join([b"Hi,", b"here it is: see below.", b"", pasted, b"", b"-- ", b"Bob: bye", b""])
    spans = find_binhex(body)
    assert len(spans) == 1
    start, end = spans[0]
    assert body[start:end].lstrip(quote).startswith(b"(This file must be converted")
    assert body[end - 1 : end] == b":"
    assert decode_binhex(body[start:end], LIMIT).data == SAMPLES["all256.bin"]


@needs_macutils
def test_eicar_round_trip_is_exact(tmp_path):
    result = decode_binhex(macutils_hqx(tmp_path, "eicar.com", EICAR), LIMIT)
    assert result.data == EICAR and result.crc_ok


# --- the corpus ---

EXPECTED = {  # (data fork, resource fork) lengths from MANIFEST.md
    "clamav__clam.exe.hqx": (544, 1),
    "convert-binhex__eyeball.gif.hqx": (2755, 0),
    "convert-binhex__hands_m.eps.hqx": (49731, 23096),
}


def test_corpus_samples(corpus):
    folder = corpus / "archives" / "binhex"
    samples = sorted(folder.glob("*.hqx"))
    if not samples:
        pytest.skip(f"no BinHex samples in {folder}")
    for sample in samples:
        text = sample.read_bytes()
        assert len(find_binhex(text)) == 1, sample.name
        result = decode_binhex(text, LIMIT)
        assert result.crc_ok and not result.truncated, sample.name
        if sample.name in EXPECTED:
            assert (len(result.data), len(result.resource)) == EXPECTED[sample.name]
    gif = decode_binhex((folder / "convert-binhex__eyeball.gif.hqx").read_bytes(), LIMIT)
    assert gif.data.startswith(b"GIF8") and gif.name == "eyeball.gif"


def test_corpus_clam_exe_matches_clamav_testfile(corpus):
    hqx = corpus / "archives" / "binhex" / "clamav__clam.exe.hqx"
    if not hqx.exists() or not os.path.exists(CLAM_EXE_PATH):
        pytest.skip("clam.exe.hqx or clamav-testfiles missing")
    result = decode_binhex(hqx.read_bytes(), LIMIT)
    assert result.data == Path(CLAM_EXE_PATH).read_bytes()
    assert (result.name, result.file_type, result.creator) == ("clam.exe", b"EXE\0", b"Clam")


@pytest.mark.skipif(shutil.which("hexbin") is None, reason="macutils `hexbin` not installed")
def test_corpus_forks_match_macutils_hexbin(corpus, tmp_path):
    """A second, independent decoder agrees on both forks (resource forks included)."""
    samples = sorted((corpus / "archives" / "binhex").glob("*.hqx"))
    if not samples:
        pytest.skip("no BinHex samples in the corpus")
    for number, sample in enumerate(samples):
        out = tmp_path / str(number)
        out.mkdir()
        subprocess.run(["hexbin", "-3", str(sample)], cwd=out, capture_output=True, check=True)
        result = decode_binhex(sample.read_bytes(), LIMIT)
        assert [p.read_bytes() for p in out.glob("*.data")] == [result.data], sample.name
        assert [p.read_bytes() for p in out.glob("*.rsrc")] == [result.resource], sample.name


# --- find_binhex ---


def test_find_two_blocks_with_crlf_and_surrounding_text():
    one, two = encode(b"first" * 100, name=b"one"), encode(b"\x90" * 9, b"rsrc", name=b"two")
    body = b"Hello:\r\n" + one.replace(b"\n", b"\r\n") + b"middle: text\r\n" + two + b"bye:\r\n"
    spans = find_binhex(body)
    assert len(spans) == 2
    results = [decode_binhex(body[s:e], LIMIT) for s, e in spans]
    assert [(r.name, r.data, r.resource) for r in results] == [
        ("one", b"first" * 100, b""),
        ("two", b"\x90" * 9, b"rsrc"),
    ]
    assert all(r.crc_ok for r in results)


def test_find_without_the_first_line():
    block = encode(b"payload" * 40, name=b"bare.txt").split(b"\n", 1)[1]
    body = b"Some text: with a colon\n:-) smiley line\n" + block + b"trailer\n"
    spans = find_binhex(body)
    assert len(spans) == 1
    assert decode_binhex(body[slice(*spans[0])], LIMIT).data == b"payload" * 40


def test_find_nothing_in_ordinary_text():
    assert find_binhex(b"Subject: hi\n\n:-)\nTo: x\n(This file must be converted)\nno\n") == []
    assert find_binhex(b"") == []


def test_find_cut_block_spans_to_last_line():
    hqx = encode(random.Random(2).randbytes(500))
    cut = hqx[: len(hqx) // 2].rsplit(b"\n", 1)[0] + b"\n"
    spans = find_binhex(cut + b"\nsigned, me\n")
    assert spans == [(0, len(cut) - 1)]
    assert decode_binhex(cut, LIMIT).truncated


# --- hostile input ---


@pytest.mark.parametrize("which", ["header", "data", "resource"])
def test_bad_crc_is_flagged_not_fatal(which):
    result = decode_binhex(encode(b"data" * 10, b"res", bad=which), LIMIT)
    assert not result.crc_ok and not result.truncated
    assert (result.data, result.resource) == (b"data" * 10, b"res")


def test_flipped_character_breaks_crc():
    hqx = bytearray(encode(b"abcdefgh" * 30))
    at = hqx.index(b":") + 100
    hqx[at] = ALPHABET[(ALPHABET.index(hqx[at]) + 1) % 64]
    try:
        assert not decode_binhex(bytes(hqx), LIMIT).crc_ok
    except BinHexError:
        pass  # the flip may land on a length or RLE byte


def test_every_truncation_is_flagged_or_refused():
    data = random.Random(3).randbytes(300) + b"\x90" * 50
    encoded = six(rle(stream(data, b"resource")))
    for cut in range(len(encoded)):
        try:
            result = decode_binhex(frame(encoded[:cut], close=False), LIMIT)
        except BinHexError:
            continue
        assert result.truncated and not result.crc_ok, cut


def test_bad_alphabet_character_names_its_offset():
    hqx = encode(b"x" * 100)
    at = hqx.index(b":") + 10
    with pytest.raises(BinHexError, match=rf"invalid character b'~' at offset {at}"):
        decode_binhex(hqx[:at] + b"~" + hqx[at + 1 :], LIMIT)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"no colon here",
        b"(This file must be converted with BinHex 4.0)\n::",
        b":\x90\x05:",
        MARKER + b"\n:" + six(b"\x90\x03ABC") + b":",
    ],
)
def test_garbage_raises_binhex_error(bad):
    with pytest.raises(BinHexError):
        decode_binhex(bad, LIMIT)


def test_huge_declared_length_refused_before_expanding():
    hqx = frame(six(stream(b"", dlen=0xFFFFFFFF)[:-4] + b"A" + b"\x90\xff" * 200_000))
    started = time.perf_counter()
    with pytest.raises(BinHexError, match="output limit"):
        decode_binhex(hqx, LIMIT)
    assert time.perf_counter() - started < 1.0


def test_rle_bomb_is_bounded_and_fast():
    """Header within the limit, then a 0x90 0xFF chain worth ~254 MB."""
    head = stream(b"", dlen=LIMIT - 100)[:-4]
    hqx = frame(six(head + b"A" + b"\x90\xff" * 1_000_000))
    assert find_binhex(hqx) == [(0, len(hqx) - 1)]
    started = time.perf_counter()
    try:
        result = decode_binhex(hqx, LIMIT)
        assert len(result.data) == LIMIT - 100 and not result.crc_ok
    except BinHexError as err:
        assert "output limit" in str(err)
    assert time.perf_counter() - started < 1.0


def test_rle_bomb_stops_at_limit_while_expanding():
    started = time.perf_counter()
    expander = _Expander(b"A" + b"\x90\xff" * 10_000_000, LIMIT)
    with pytest.raises(BinHexError, match="output limit"):
        expander.fill(LIMIT)
    assert len(expander.out) <= LIMIT
    with pytest.raises(BinHexError, match="output limit"):
        _Expander(b"", 10).fill(11)
    assert time.perf_counter() - started < 1.0


def test_max_output_must_not_be_negative():
    with pytest.raises(ValueError):
        decode_binhex(encode(b""), -1)


# --- properties ---

TIMED = settings(max_examples=300, deadline=timedelta(seconds=2))
TOKENS = st.sampled_from(
    [
        b":",
        b"\n",
        b"\r\n",
        b"\r",
        b"> ",
        b" ",
        MARKER,
        b"(This file must be converted; x)",
        b"\x90",
        b"~",
        b"!!!!",
        b"rrrr",
        b"#'0XB@dZCAKP!%9B43",
        b"C",
    ]
)
STRUCTURED = st.lists(
    st.one_of(
        TOKENS,
        st.binary(max_size=8),
        st.text(alphabet=ALPHABET.decode(), max_size=80).map(str.encode),
    ),
    max_size=60,
).map(b"".join)


def decode_quietly(text: bytes, limit: int = LIMIT) -> None:
    try:
        result = decode_binhex(text, limit)
    except BinHexError:
        return
    assert len(result.data) + len(result.resource) <= limit


@TIMED
@given(st.one_of(st.binary(max_size=3000), STRUCTURED))
def test_arbitrary_bytes_only_binhex_error(text):
    for start, end in find_binhex(text):
        assert 0 <= start < end <= len(text)
        decode_quietly(text[start:end])
    decode_quietly(text)


@TIMED
@given(st.binary(max_size=3000), st.integers(0, 4096))
def test_arbitrary_wrapped_streams_only_binhex_error(raw, limit):
    decode_quietly(b":" + raw + b":", limit)
    decode_quietly(frame(six(raw)), limit)  # valid 6-bit layer, arbitrary RLE and header


@TIMED
@given(st.binary(max_size=2000), st.binary(max_size=500), st.binary(min_size=1, max_size=63))
def test_reference_round_trip(data, rsrc, name):
    result = decode_binhex(encode(data, rsrc, name=name), LIMIT)
    assert (result.data, result.resource, result.crc_ok, result.truncated) == (
        data,
        rsrc,
        True,
        False,
    )
