"""sniff() trying only the signatures a part's first byte leaves finds the
type the scan of every signature in order finds: each signature's every
prefix, at its offset and at 0, two signatures overlaid, and random heads."""

from __future__ import annotations

import random

from amavisd.decode import detect
from amavisd.decode.detect import HEAD_PROBES, SIGNATURES, sniff


def sniff_every_signature(head: bytes) -> str:
    """sniff before 62c6564: every signature in order, then the rest as it is."""
    for offset, magic, kind in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return kind
    for probe, kind in HEAD_PROBES:
        if probe(head):
            return kind
    if detect.looks_like_mail(head):
        return "mail"
    if detect._BINHEX.search(head):
        return "binhex"
    if detect.looks_like_text(head):
        return "base64" if detect.looks_like_base64(head) else "text"
    return "data"


def heads() -> list[bytes]:
    rng = random.Random(9)
    out = [b"", b"\x00", b"\xff"]
    for offset, magic, _ in SIGNATURES:
        for size in range(len(magic) + 1):
            for pad in (b"\x00" * offset, rng.randbytes(offset)):
                out += [pad + magic[:size], pad + magic[:size] + b"\r\nrest", magic[:size]]
        for other_offset, other, _ in rng.sample(SIGNATURES, 4):  # two signatures overlaid
            head = bytearray(max(offset + len(magic), other_offset + len(other)))
            head[other_offset:other_offset + len(other)] = other
            head[offset:offset + len(magic)] = magic
            out.append(bytes(head))
    firsts = bytes({magic[0] for offset, magic, _ in SIGNATURES if not offset})
    for _ in range(3000):
        out.append(rng.randbytes(rng.randrange(64)))
        out.append(bytes(rng.choice(firsts + b"PK\x03\x04MZ%!<?") for _ in range(rng.randrange(40))))
    return out


def test_sniff_finds_what_every_signature_in_order_finds():
    for head in heads():
        assert sniff(head) == sniff_every_signature(head), head
        assert sniff(bytearray(head)) == sniff_every_signature(head), head
