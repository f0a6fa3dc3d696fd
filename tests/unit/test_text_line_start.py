"""`textual.line_start` finds what re.M's `^literal` finds.

The uuencode and MIME-reading searches find their candidate lines with
bytes.find instead of the regex engine; a candidate they miss is an
encoded block never decoded, so the answers must be the regex's own, on
crafted and random texts, at every start and end, in memory and mapped.
"""

from __future__ import annotations

import random
import re

import pytest

from amavisd.decode import textual, window
from amavisd.decode.parts import Part

CRAFTED = [b"", b"begin", b"xbegin", b"\nbegin", b"\rbegin", b"\r\nbegin", b"begi", b"\n",
           b"--", b"a\n--b", b"a\r--", b"----", b"x--\n--", b"begin\nbegin", b"\n\nbegi\nbegin"]
PIECES = [b"\n", b"\r", b"\r\n", b"b", b"begin", b"egin", b"-", b"--", b"x", b" ", b"\0"]


def regex_start(data: bytes, literal: bytes, pos: int, end: int) -> int:
    found = re.compile(b"^" + re.escape(literal), re.M).search(data, pos, end)
    return found.start() if found else -1


def texts():
    rng = random.Random(25)
    yield from CRAFTED
    for _ in range(1500):
        yield b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 30)))


@pytest.mark.parametrize("literal", [b"begin", b"--"])
def test_line_start_is_the_regex_start_everywhere(literal):
    for data in texts():
        for pos in range(len(data) + 2):
            for end in range(pos, len(data) + 1):
                assert textual.line_start(data, literal, pos, end) == \
                    regex_start(data, literal, pos, end), (data, pos, end)


def test_a_mapped_text_finds_the_same_lines(tmp_path):
    """Past a window: the candidate straddles the mapping's window edges."""
    path = tmp_path / "big"
    body = b"x" * (window.WINDOW - 3) + b"\nbegin 644 a\n" + b"y" * 100 + b"\n--b\n"
    path.write_bytes(body)
    data = window.map_file(str(path))
    try:
        for literal in (b"begin", b"--"):
            for pos in (0, window.WINDOW - 10, window.WINDOW - 2, window.WINDOW + 5):
                assert textual.line_start(data, literal, pos, len(body)) == \
                    regex_start(body, literal, pos, len(body))
    finally:
        window.close(data)


def test_an_embedded_uuencode_block_is_still_found_after_a_bare_begin():
    """A `begin` inside a line, then a real begin line: the block is found."""
    block = b"begin 644 x.bin\n#86)C\n`\nend\n"
    text = b"please begin here\nxbegin 644 no\n" + block
    assert textual.has_embedded(Part(id="t", data=text))
    assert not textual.has_embedded(Part(id="t", data=b"please begin here\nxbegin 644 no\n"))


def test_first_lines_are_splitlines_first_lines():
    """looks_like_base64 splits a prefix only: the same lines as the whole."""
    from amavisd.decode.detect import first_lines

    rng = random.Random(26)
    pieces = [b"\n", b"\r", b"\r\n", b"QUJD" * 5, b"a", b" ", b"=" ]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 900)))
        for count in (1, 20):
            assert first_lines(data, count) == data.splitlines()[:count]
    edge = b"x" * 511 + b"\r\n" + b"y\n" * 30  # CR LF across the first prefix's end
    for cut in (*range(500, 530), *range(2030, 2060)):
        data = b"a\n" * 10 + b"z" * (cut - 20) + b"\r\n" + b"b\n" * 30
        assert first_lines(data, 20) == data.splitlines()[:20]
    assert first_lines(edge, 20) == edge.splitlines()[:20]
