"""yEnc blocks in text bodies (Thunderbird decodes them into attachments):
round trips through an encoder written here, the size and crc checks, cut-off
blocks, multi-part sets, the banned rules and EICAR seeing the decoded file,
in memory and streamed from a mapped text."""

from __future__ import annotations

import binascii
import random
import tracemalloc
import zlib

import pytest

from amavisd.decode import window, yenc
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.parts import Part
from amavisd.policy.banned import BannedRules
from amavisd.testing.eicar import EICAR

# Bytes whose encoding has no C0 control but TAB: a body of them sniffs as
# text; a body of other bytes sniffs as "data" (test_a_binary_looking_body_sniffed_as_data_is_decoded_too).
TEXTY = bytes(b for b in range(256) if not (215 <= b <= 222 or 228 <= b <= 245))
PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"\0" * 200


def yencode(data: bytes, line: int = 128) -> bytes:
    """The inverse rules: plus 42; NUL, LF, CR and "=" escaped, and TAB,
    SPACE at a line's ends and "." at its start (the escape: "=", plus 64)."""
    out, cur = [], bytearray()
    for i, byte in enumerate(data):
        c = (byte + 42) & 255
        first, last = not cur, len(cur) >= line - 1 or i == len(data) - 1
        if c in (0, 10, 13, 61) or (c in (9, 32) and (first or last)) or (c == 46 and first):
            cur += bytes((61, (c + 64) & 255))
        else:
            cur.append(c)
        if len(cur) >= line:
            out.append(bytes(cur))
            cur = bytearray()
    if cur:
        out.append(bytes(cur))
    return b"".join(x + b"\r\n" for x in out)


def block(data: bytes, name: str = "a.exe", size: int | None = None,
          crc: int | None = None, end: bool = True) -> bytes:
    size = len(data) if size is None else size
    crc = zlib.crc32(data) if crc is None else crc
    head = f"=ybegin line=128 size={size} name={name}\r\n".encode("latin-1")
    tail = f"=yend size={size} crc32={crc:08x}\r\n".encode() if end else b""
    return head + yencode(data) + tail


def message(body: bytes) -> bytes:
    return (b"From: alice@example.com\nTo: bob@example.org\nSubject: files\n"
            b"MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
            b"Content-Transfer-Encoding: 8bit\n\nsee below\n" + body + b"\nbye\n")


def decoded(raw: bytes, **kw) -> list[tuple[str, bytes, set[str]]]:
    """(name, bytes, flags) of every application/octet-stream part."""
    result = decompose(raw, **kw)
    try:
        return [(p.name, p.read(), set(p.flags)) for p in result.root.walk()
                if p.mime_type == "application/octet-stream"]
    finally:
        result.cleanup()


def decode(encoded: bytes) -> tuple[bytes, yenc.Decoder]:
    decoder = yenc.Decoder()
    return decoder.feed(encoded), decoder


def test_round_trips_of_random_bytes_every_value_lines_of_128():
    rng = random.Random(7)
    samples = [bytes(range(256)) * 3, b"", b"\0", b"=" * 300, bytes([214, 224, 227, 19]) * 99]
    samples += [rng.randbytes(rng.randint(1, 3000)) for _ in range(200)]
    for data in samples:
        encoded = yencode(data)
        assert all(len(x) <= 129 for x in encoded.split(b"\r\n"))  # 128 and an escape
        out, decoder = decode(encoded)
        assert out == data and decoder.ok
        assert decoder.crc == zlib.crc32(data) and decoder.size == len(data)
        # fed a line at a time (windows end at line ends) as at once
        pieces = yenc.Decoder()
        assert b"".join(pieces.feed(x) for x in encoded.splitlines(keepends=True)) == data
        assert not pieces.problems({}, None, {"size": str(len(data)).encode(),
                                              "crc32": b"%08x" % zlib.crc32(data)})


def test_a_truncated_escape_is_a_problem():
    for cut in (b"=", b"abc=\r\nxyz\r\n", b"abc=\nx"):
        _, decoder = decode(cut)
        assert not decoder.ok
    assert decode(b"==\r\n")[0] == bytes([(61 - 106) & 255])  # "=" escaped by "="


def reference(encoded: bytes) -> tuple[bytes, bool]:
    """The rules a byte at a time: the decoder's fast path must agree."""
    out, ok, i = bytearray(), True, 0
    while i < len(encoded):
        byte = encoded[i]
        if byte == 61 and i + 1 < len(encoded) and encoded[i + 1] not in b"\r\n":
            out.append((encoded[i + 1] - 106) & 255)
            i += 2
            continue
        if byte == 61:
            ok = False
        elif byte not in b"\r\n":
            out.append((byte - 42) & 255)
        i += 1
    return bytes(out), ok


def test_hostile_escapes_decode_as_the_rules_say():
    rng = random.Random(11)
    for _ in range(3000):
        encoded = bytes(rng.choice(b"===\r\nJMa}\xfd\x00") for _ in range(rng.randint(0, 40)))
        out, decoder = decode(encoded)
        assert (out, decoder.ok) == reference(encoded), encoded


def test_header_fields_and_a_name_with_spaces():
    fields = yenc.keywords(b"=ybegin part=1 line=128 size=9 name=  my file.pdf.exe \r\n")
    assert fields["name"] == b"  my file.pdf.exe " and fields["part"] == b"1"
    assert yenc.number(fields, "size") == 9 and yenc.number(fields, "line") == 128
    assert yenc.number({"size": b"x"}, "size") is None


def test_a_block_in_a_text_body_is_a_child_named_by_its_name_line():
    data = TEXTY * 4
    body = b"text before\n" + block(data, name=" my \x01file.bin ") + b"text after\n"
    [(name, payload, flags)] = decoded(message(body))
    assert (name, payload) == ("my ?file.bin", data)
    assert "decode-error" not in flags


def test_several_blocks_in_one_body():
    blocks = block(b"one", name="one.txt") + b"middle\n" + block(PE, name="two.dat")
    assert [(n, p) for n, p, _ in decoded(message(blocks))] == [("one.txt", b"one"),
                                                                  ("two.dat", PE)]


@pytest.mark.parametrize("spoil", ["size", "crc", "no-end", "cut-escape", "cut-block"])
def test_failed_checks_flag_the_child_decode_error(spoil):
    data = b"payload \x00\x13=\r\n" * 20
    if spoil == "size":
        body = block(data, size=len(data) + 1)
    elif spoil == "crc":
        body = block(data, crc=zlib.crc32(data) ^ 1)
    elif spoil == "no-end":
        body = block(data, end=False)
    elif spoil == "cut-escape":
        body = block(data).replace(b"\r\n=yend", b"=\r\n=yend")
    else:  # a block cut in the middle of its data: no =yend, fewer bytes
        body = block(data)[:200]
    [(name, payload, flags)] = decoded(message(body))
    assert name == "a.exe" and "decode-error" in flags
    if spoil != "cut-block":  # without =yend the block runs to the text's end
        assert payload[:len(data)] == data


def test_a_block_without_yend_stops_at_the_next_block():
    body = block(b"first", name="x.bin", end=False) + block(b"second", name="y.bin")
    found = decoded(message(body))
    assert [(n, p) for n, p, _ in found] == [("x.bin", b"first"), ("y.bin", b"second")]
    assert "decode-error" in found[0][2] and "decode-error" not in found[1][2]


def test_a_mere_mention_of_ybegin_is_no_part():
    body = (b"our yEnc blocks start with =ybegin line=128 size=3 name=a.exe\n"
            b" =ybegin line=128 size=3 name=b.exe\n=ybeginning\n")
    assert decoded(message(body)) == []


def test_multi_part_sets_each_part_a_child_flagged_partial():
    data = TEXTY * 2
    first, second = data[:300], data[300:]
    parts = b""
    for number, (lo, piece) in enumerate(((1, first), (301, second)), 1):
        parts += (f"=ybegin part={number} total=2 line=128 size={len(data)} name=set.bin\r\n"
                  f"=ypart begin={lo} end={lo + len(piece) - 1}\r\n").encode()
        parts += yencode(piece)
        parts += f"=yend size={len(piece)} part={number} pcrc32={zlib.crc32(piece):08x}\r\n".encode()
    result = decompose(message(parts))
    try:
        found = [p for p in result.root.walk() if p.name == "set.bin"]
        assert [p.read() for p in found] == [first, second]
        assert all("partial" in p.flags and "decode-error" not in p.flags for p in found)
        assert [u.kind for u in result.unchecked] == ["partial", "partial"]
    finally:
        result.cleanup()
    spoiled = parts.replace(b"pcrc32=", b"pcrc32=1", 1)
    assert "decode-error" in decoded(message(spoiled))[0][2]


@pytest.mark.parametrize("name", ["a.exe", "invoice.pdf.vbs", "x" * 9000 + ".scr",
                                  " " * 9000 + "name=" + "y" * 9000 + ".pif"])
def test_the_banned_rules_see_the_name(name):
    result = decompose(message(block(b"WScript.Echo 1\n" if name.endswith("vbs") else PE,
                                     name=name)))
    try:
        hits = BannedRules.default().check(result.root)
    finally:
        result.cleanup()
    assert len(hits) == 1 and hits[0].part_name.endswith(name[-8:])


def test_eicar_is_its_own_part_for_the_scanners():
    result = decompose(message(block(EICAR, name="eicar.com")))
    try:
        [part] = [p for p in result.scannable() if p.name == "eicar.com"]
        assert part.read() == EICAR and not part.flags
    finally:
        result.cleanup()


def test_a_big_mapped_text_streams_its_blocks(tmp_path):
    data = random.Random(3).randbytes(300_000)
    body = b"filler line\n" * 30_000 + block(data, name="big.bin") + block(EICAR, name="e.com")
    raw = message(body)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(window, "MAP_ABOVE", 0)
        mp.setattr(window, "LINES", 4096)
        found = decoded(raw, limits=Limits(spill_threshold=0, max_memory=0),
                        tempbase=str(tmp_path))
    assert [(n, p, f) for n, p, f in found] == [("big.bin", data, set()), ("e.com", EICAR, set())]


def test_the_output_is_bounded_by_the_budget():
    """As uuencode: past the allowance LimitExceeded (the message is then
    UNCHECKED: a file we did not see), and never more out than in."""
    from amavisd.decode.limits import LimitExceeded
    from amavisd.decode.textual import y_blocks

    text = b"hi\n" + block(b"x" * 5000) + block(b"\0" * 5000, name="b")
    first, second = y_blocks(text, 0, len(text))
    assert len(b"".join(first.decoding(text, 5000))) == 5000
    assert sum(map(len, second.decoding(text, 1 << 30))) <= second.stop - second.start
    with pytest.raises(LimitExceeded):
        list(second.decoding(text, 4999))


def test_a_binary_looking_body_sniffed_as_data_is_decoded_too():
    data = random.Random(5).randbytes(5000)
    assert [(n, p) for n, p, _ in decoded(message(block(data)))] == [("a.exe", data)]


def test_probe_finds_a_block_only_at_a_line_start():
    from amavisd.decode.textual import has_embedded

    assert has_embedded(Part(id="t", data=b"hi\n" + block(b"x")))
    assert not has_embedded(Part(id="t", data=b"hi =ybegin line=1 size=1 name=a\n"))


# -- found by the hostile review of stop 27 -----------------------------------------------


def test_a_bare_yend_line_is_data_as_thunderbird_reads_it():
    """Thunderbird ends a block only at "=yend size=": a bare "=yend" line
    before it is data, and the file behind it must be ours to scan."""
    body = (b"=ybegin line=128 size=72 name=readme.txt\r\n=yend\r\n" + yencode(EICAR)
            + b"=yend size=72\r\n")
    [(name, data, _)] = decoded(message(body))
    assert name == "readme.txt" and EICAR in data


@pytest.mark.parametrize("encoded", ["yenc", "uuencode"])
def test_a_block_past_the_expansion_quota_leaves_the_message_unchecked(encoded: str):
    """Once a decode error (so CLEAN, with the file never scanned): now a limit."""

    payload = EICAR + bytes(300_000)
    body = block(payload) if encoded == "yenc" else (
        b"begin 644 a.com\n" + b"".join(binascii.b2a_uu(payload[i:i + 45])
                                        for i in range(0, len(payload), 45)) + b"`\nend\n")
    result = decompose(message(body), Limits(min_quota=200_000, quota_factor=1))
    try:
        assert result.unchecked and "over the expansion quota" in str(result.unchecked[0])
    finally:
        result.cleanup()


def test_a_long_line_of_escapes_is_decoded_a_piece_at_a_time():
    line = b"=A" * 2_000_000 + b"x=" + b"=" * 99_999  # odd runs across piece ends too
    whole = yenc.Decoder()
    expected = whole._feed(line)
    tracemalloc.start()
    try:
        pieces = yenc.Decoder()
        assert pieces.feed(line) == expected and pieces.crc == whole.crc
        assert tracemalloc.get_traced_memory()[1] < 4 * len(line)  # whole: ~50 x
    finally:
        tracemalloc.stop()
