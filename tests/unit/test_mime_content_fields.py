"""`mimesplit.content_fields` finds what the regex alone finds.

The Content-* fields of each entity's header block decide how it is split
and decoded: a field the faster search missed would be a part read as
another type. So the answers must be `_CONTENT_FIELD.finditer`'s own, on
crafted, random and corpus header blocks, at every start and end.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from amavisd.decode import mimesplit
from amavisd.decode.mimesplit import _CONTENT_FIELD, content_fields

PIECES = [b"\n", b"\r", b"\r\n", b" ", b"\t", b"content-", b"Content-", b"CONTENT-",
          b"type", b"Type", b"transfer-encoding", b"disposition", b":", b"x", b"text/plain",
          b"content-type:", b"Content-Transfer-Encoding: base64", b"X-Content-Type: a"]


def regex(data: bytes, pos: int, end: int) -> list[tuple[int, int]]:
    return [m.span() for m in _CONTENT_FIELD.finditer(data, pos, end)]


def fast(data: bytes, pos: int, end: int) -> list[tuple[int, int]]:
    return [m.span() for m in content_fields(data, pos, end)]


def test_the_same_fields_as_the_regex_on_random_blocks_at_every_start_and_end():
    rng = random.Random(27)
    for _ in range(700):
        data = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
        for pos in range(0, len(data) + 1, max(1, len(data) // 12)):
            for end in range(pos, len(data) + 1, max(1, len(data) // 12)):
                assert fast(data, pos, end) == regex(data, pos, end), (data, pos, end)
            assert fast(data, pos, len(data)) == regex(data, pos, len(data))


def test_crafted_blocks():
    for data in (b"", b"content-type: a", b"x\rcontent-type: a\r\n b\r\ncontent-disposition: c",
                 b"Content-Type: multipart/mixed;\n boundary=x\nX: content-type: no\n",
                 b"content-type: a\n\tcontent-type: folded, not a field\ncontent-type: b",
                 b"\r\n\r\nCONTENT-TRANSFER-ENCODING: base64"):
        for pos in range(len(data) + 1):
            assert fast(data, pos, len(data)) == regex(data, pos, len(data)), (data, pos)


def test_a_block_too_big_to_copy_is_searched_by_the_regex_alone(monkeypatch):
    monkeypatch.setattr(mimesplit, "FIELD_SCAN_COPY", 10)
    data = b"From: a\ncontent-type: text/plain\ncontent-disposition: inline\n"
    assert fast(data, 0, len(data)) == regex(data, 0, len(data)) and len(regex(data, 0, len(data))) == 2


def test_the_same_fields_on_the_corpus_header_blocks():
    root = Path(os.environ.get("AMAVISD_CORPUS", "/work/shared/corpus")) / "mail"
    files = [p for p in sorted(root.rglob("*")) if p.is_file()][:2000] if root.is_dir() else []
    for path in files:
        data = path.read_bytes()[:256 * 1024]
        end = data.find(b"\n\n")
        end = len(data) if end < 0 else end
        assert fast(data, 0, end) == regex(data, 0, end), path
