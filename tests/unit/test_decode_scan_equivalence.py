"""The decoders' find-based line and field searches against the regexes they replaced.

Commit 02fa093 replaced three regex scans of the decoders by bytes.find-based
searches and claims exact equivalence. A difference is a detection gap: a
missed `begin`/`--` line start is an embedded uuencoded or MIME-in-text part
never decoded, a missed or different Content-* field a part decoded other
than a mail client does it, a different line list a base64 body not opened.
So the old definitions (copied here from 02fa093^) are run beside the new
ones on hostile shapes (CR-only, LF-only, mixed line ends, bytes that
str.splitlines would split at, non-ASCII case pairs, NUL), at every start and
end, on bytes and on mappings with windows a few bytes long.
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
import re
from pathlib import Path

import pytest

from amavisd.decode import detect, mimesplit, textual, window
from amavisd.decode.mimesplit import _CONTENT_FIELD, content_fields
from amavisd.decode.textual import _MIME_BOUNDARY, _UU_BEGIN, line_start

# --- the old definitions (02fa093^), verbatim but for names -----------------

OLD_STARTS = {_UU_BEGIN: re.compile(rb"^begin", re.M), _MIME_BOUNDARY: re.compile(rb"^--", re.M)}


def old_search(pattern, data, pos=0, end=None):
    end = len(data) if end is None else end
    starts = OLD_STARTS[pattern]
    while (start := (window.search(starts, data, pos, end, 8) if window.mapped(data)
                     else starts.search(data, pos, end))) is not None:
        at = start.start()
        if (match := pattern.match(data, at, end)) is not None:
            return match
        pos = at + 1
        if pattern is _MIME_BOUNDARY and (line := textual._BOUNDARY_LINE.match(data, at, end)):
            pos = max(pos, textual._HEADER_LINES.match(data, line.end(), end).end())
    return None


def old_looks_like_base64(head: bytes) -> bool:
    lines = [ln for ln in head.strip().splitlines()[:20] if ln.strip()]
    return len(lines) >= 2 and all(detect._BASE64_LINE.fullmatch(ln.strip()) for ln in lines[:-1])


def span(match):
    return None if match is None else (match.span(), match.groups())


def old_fields(data, pos, end):
    return [(m.span(), m.group()) for m in _CONTENT_FIELD.finditer(data, pos, end)]


def new_fields(data, pos, end):
    return [(m.span(), m.group()) for m in content_fields(data, pos, end)]


# --- hostile alphabets -----------------------------------------------------

ENDS = [b"\n", b"\r", b"\r\n", b"\n\r", b"\r\r\n"]
ODD = [b"\x00", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\x85", b"\xa0", b"\xc3", b"\xe9",
       b"\xff", b" ", b"\t", b"x"]
LINE_PIECES = ENDS + ODD + [b"begin", b"begi", b"egin", b"BEGIN", b"-", b"--", b"--b", b"begin 644 a",
                            b"begin-base64 644 f", b"Content-Type:", b"content-type :", b"X: y",
                            b" fold", b"\tfold"]
FIELD_PIECES = ENDS + ODD + [b"content-", b"Content-", b"CONTENT-", b"cOnTeNt-", b"type", b"Type",
                             b"TRANSFER-encoding", b"disposition", b":", b" ", b"\t", b"text/plain",
                             b"content-type:", b"Content-Transfer-Encoding: base64",
                             b"X-Content-Type: a", b"content", b"-", b"\xc3ontent-type:"]


def random_texts(rng, pieces, count, longest):
    for _ in range(count):
        yield b"".join(rng.choice(pieces) for _ in range(rng.randint(0, longest)))


def regex_start(data, literal, pos, end):
    found = re.compile(b"^" + re.escape(literal), re.M).search(data, pos, end)
    return found.start() if found else -1


# --- textual.line_start / _search --------------------------------------------

@pytest.mark.parametrize("literal", [b"begin", b"--"])
def test_line_start_at_every_pos_and_end_including_out_of_range(literal):
    rng = random.Random(301)
    texts = list(random_texts(rng, LINE_PIECES, 900, 18))
    texts += [odd + literal for odd in ODD + ENDS] + [literal + odd for odd in ODD + ENDS]
    checked = 0
    for data in texts:
        for pos in range(len(data) + 3):
            for end in range(max(0, pos - 2), len(data) + 3):
                assert line_start(data, literal, pos, end) == regex_start(data, literal, pos, end), \
                    (data, pos, end)
                checked += 1
    assert checked > 100_000


@pytest.mark.parametrize("pattern", [_UU_BEGIN, _MIME_BOUNDARY], ids=["uu", "mime"])
def test_search_is_the_old_search_on_bytes(pattern):
    rng = random.Random(302)
    for data in random_texts(rng, LINE_PIECES, 2500, 24):
        for pos in range(0, len(data) + 2):
            assert span(textual._search(pattern, data, pos)) == span(old_search(pattern, data, pos)), \
                (data, pos)
        for end in range(0, len(data) + 1, 3):
            assert span(textual._search(pattern, data, 0, end)) == \
                span(old_search(pattern, data, 0, end)), (data, end)


def mapped(tmp_path, data):
    path = tmp_path / "m"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


@pytest.mark.parametrize("size", [5, 8, 13, 32])
def test_search_and_line_start_on_mappings_with_tiny_windows(tmp_path, monkeypatch, size):
    """Every `\\nbegin` / `\\n--` straddles some window edge at some start."""
    monkeypatch.setattr(window, "WINDOW", size)
    rng = random.Random(303 + size)
    for data in random_texts(rng, LINE_PIECES, 120, 40):
        if not data:
            continue
        buf = mapped(tmp_path, data)
        try:
            for pos in range(len(data) + 1):
                for literal in (b"begin", b"--"):
                    assert line_start(buf, literal, pos, len(data)) == \
                        regex_start(data, literal, pos, len(data)), (data, pos)
                for pattern in (_UU_BEGIN, _MIME_BOUNDARY):
                    assert span(textual._search(pattern, buf, pos)) == span(old_search(pattern, data, pos))
                    assert span(textual._search(pattern, buf, pos)) == span(old_search(pattern, buf, pos))
        finally:
            buf.close()


def test_a_begin_line_straddling_a_real_window_edge(tmp_path):
    for shift in range(-8, 3):
        lead = b"x" * (window.WINDOW + shift) + b"\n"
        for emb in (b"begin 644 a.bin\nM\nend\n", b"--b\nX: y\nContent-Type: a/b\n\n"):
            data = lead + emb
            buf = mapped(tmp_path, data)
            try:
                for pattern in (_UU_BEGIN, _MIME_BOUNDARY):
                    assert span(textual._search(pattern, buf)) == span(old_search(pattern, buf))
                    assert span(textual._search(pattern, buf, len(lead) - 3)) == \
                        span(old_search(pattern, data, len(lead) - 3))
                assert textual._search(_UU_BEGIN if emb[0] == ord("b") else _MIME_BOUNDARY, buf)
            finally:
                buf.close()


# --- mimesplit.content_fields ------------------------------------------------

def test_content_fields_at_every_pos_and_end():
    rng = random.Random(304)
    checked = 0
    for data in random_texts(rng, FIELD_PIECES, 1500, 16):
        for pos in range(len(data) + 2):
            for end in range(max(0, pos - 1), len(data) + 2, 2):
                assert new_fields(data, pos, end) == old_fields(data, pos, end), (data, pos, end)
                checked += 1
    assert checked > 50_000


def test_content_fields_every_byte_in_every_letter_and_before_the_field():
    """Case folding: bytes.lower is ASCII only; so is re.I on bytes. Any byte
    in place of a letter of the name, and any byte before it."""
    base = b"content-transfer-encoding: base64\r\n\tmore\rcontent-type: a\n"
    for at in itertools.chain(range(0, 27), range(41, 54)):
        for byte in range(256):
            data = base[:at] + bytes([byte]) + base[at + 1:]
            for pos in (0, 1, at, at + 1):
                assert new_fields(data, pos, len(data)) == old_fields(data, pos, len(data)), (data, pos)
    for byte in range(256):
        data = b"X: y" + bytes([byte]) + b"Content-Type: a\n"
        for pos in range(6):
            assert new_fields(data, pos, len(data)) == old_fields(data, pos, len(data)), (data, pos)


def test_content_fields_on_a_mapping(tmp_path):
    rng = random.Random(305)
    for data in random_texts(rng, FIELD_PIECES, 150, 30):
        if not data:
            continue
        buf = mapped(tmp_path, data)
        try:
            for pos in range(len(data) + 1):
                assert new_fields(buf, pos, len(data)) == old_fields(data, pos, len(data)), (data, pos)
        finally:
            buf.close()


@pytest.mark.parametrize("limit", [0, 1, 7, 8, 9, 20])
def test_content_fields_either_side_of_the_copy_limit(monkeypatch, limit):
    monkeypatch.setattr(mimesplit, "FIELD_SCAN_COPY", limit)
    rng = random.Random(306 + limit)
    for data in random_texts(rng, FIELD_PIECES, 400, 10):
        for pos in range(len(data) + 1):
            for end in range(pos, len(data) + 1):
                assert new_fields(data, pos, end) == old_fields(data, pos, end)


def test_content_fields_of_a_real_one_mib_block_cut_at_the_limit():
    fields = b"Content-Type: application/zip\r\n content-disposition: x\rCONTENT-transfer-encoding: b\n"
    pad = b"X-Pad: " + b"p" * 60 + b"\n"
    block = pad * (mimesplit.FIELD_SCAN_COPY // len(pad)) + fields * 2
    for end in range(mimesplit.FIELD_SCAN_COPY - 70, mimesplit.FIELD_SCAN_COPY + len(fields) * 2, 17):
        for pos in (0, 1, 60):
            assert new_fields(block, pos, end + pos) == old_fields(block, pos, end + pos)


def test_more_fields_than_a_splitter_reads():
    data = b"".join(b"content-type: t%d\r\n" % i if i % 2 else b"Content-Disposition: d\n"
                    for i in range(mimesplit.MAX_FIELDS * 2))
    assert new_fields(data, 0, len(data)) == old_fields(data, 0, len(data))
    assert len(new_fields(data, 0, len(data))) == mimesplit.MAX_FIELDS * 2


# --- detect.first_lines / looks_like_base64 --------------------------------

def test_first_lines_is_splitlines_prefix_across_the_prefix_sizes():
    rng = random.Random(307)
    pieces = ENDS + ODD + [b"QUJD" * 5, b"QUJDRA==", b"=", b"a" * 100, b"a" * 511]
    for _ in range(1200):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 400)))
        for count in (0, 1, 2, 19, 20, 21):
            assert detect.first_lines(data, count) == data.splitlines()[:count], (data, count)
    for size in (512, 2048, 8192, 32768):  # a line end on each side of each prefix's end
        for cut in range(size - 3, size + 3):
            for end in ENDS:
                for lines in (1, 19, 20, 21):
                    data = b"a\n" * (lines - 1) + b"z" * (cut - 2 * (lines - 1)) + end + b"b\n" * 25
                    for count in (19, 20, 21):
                        assert detect.first_lines(data, count) == data.splitlines()[:count]


def test_looks_like_base64_is_the_old_check():
    rng = random.Random(308)
    pieces = ENDS + [b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"QUJD" * 19, b"QUJDRA==", b"x y",
                     b"\n\n\n"]
    for _ in range(3000):
        head = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        assert detect.looks_like_base64(head) == old_looks_like_base64(head), head


# --- the corpus ------------------------------------------------------------

def corpus_mails():
    root = Path(os.environ.get("AMAVISD_CORPUS", "/work/shared/corpus")) / "mail"
    return [p for p in sorted(root.rglob("*")) if p.is_file()] if root.is_dir() else []


def all_matches(search, pattern, data):
    found, pos = [], 0
    while (match := search(pattern, data, pos)) is not None and len(found) < 500:
        found.append(span(match))
        pos = match.end()
    return found


@pytest.mark.skipif(not corpus_mails(), reason="no corpus")
def test_the_corpus_as_text_and_as_one_header_block(tmp_path, monkeypatch):
    """Every corpus mail searched whole as a text (bytes, and mapped with
    4 KiB windows) and read whole as one header block."""
    monkeypatch.setattr(window, "WINDOW", 4096)
    files = corpus_mails()
    hits = 0
    for path in files:
        data = path.read_bytes()
        for pattern in (_UU_BEGIN, _MIME_BOUNDARY):
            old = all_matches(old_search, pattern, data)
            assert all_matches(textual._search, pattern, data) == old, path
            hits += len(old)
        if len(data) > 64 * 1024 and data:
            buf = mapped(tmp_path, data)
            try:
                for pattern in (_UU_BEGIN, _MIME_BOUNDARY):
                    assert all_matches(textual._search, pattern, buf) == \
                        all_matches(old_search, pattern, data), path
            finally:
                buf.close()
        assert new_fields(data, 0, len(data)) == old_fields(data, 0, len(data)), path
        assert detect.first_lines(data, 20) == data.splitlines()[:20]
        assert detect.looks_like_base64(data[:36 * 1024]) == old_looks_like_base64(data[:36 * 1024])
    assert len(files) > 1000 and hits > 100
