"""Fuzzing the decoders through `decompose`: real archives made by the real
tools, then mutated (tests/fuzz/mutate.py), random MIME, and the corpus' real
mails mutated. What each input must satisfy: harness.check. The direct driver
(tests/fuzz/direct.py) runs each target: CI_INPUTS here, the same every run,
and 100,000 from a fresh seed in `make fuzz-mutate`.

For every input: decompose returns (never raises: a broken decoder is an
UNCHECKED reason, not an exception), within the time limit plus slack, every
byte it kept on disk lies in its own work dir (which cleanup empties), and a
decoder's failure never leaves the message without a problem flag or reason
(nothing fails silently).
"""

from __future__ import annotations

import base64
from functools import cache

import pytest

from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from tests.fuzz import direct
from tests.fuzz.harness import ARCHIVES, MAX_SEED, check
from tests.fuzz.mutate import mutate
from tests.fuzz.repair import FIXUPS

FORMATS = ["zip", "7z", "tar", "gz", "bz2", "xz", "zst", "lz4", "lz", "Z", "cpio", "ar", "cab",
           "arj", "lha", "arc", "iso"]


@cache
def sample(fmt: str) -> bytes | None:
    if archivers.available(fmt):
        return None
    files = {"eicar.com": EICAR} if fmt in archivers.SINGLE_STREAM else {
        "eicar.com": EICAR, "readme.txt": b"hello " * 50}
    return archivers.build(fmt, files)


def warm_up() -> None:
    """Every sample made before `make fuzz` caps the address space."""
    for fmt in FORMATS:
        sample(fmt)
    corpus_mail()


def mutated(rng) -> tuple[str, bytes]:
    fmt = rng.choice(FORMATS)
    data = sample(fmt)
    if data is None:
        return fmt, rng.randbytes(rng.randrange(513))
    return fmt, mutate(rng, [data], FIXUPS.get(fmt))


def as_message(payload: bytes, name: str) -> bytes:
    return (b"From: a@example.test\nTo: b@example.test\nSubject: fuzz\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="B"\n\n--B\nContent-Type: '
            b"application/octet-stream\nContent-Transfer-Encoding: base64\n"
            + f'Content-Disposition: attachment; filename="{name}"\n\n'.encode()
            + base64.encodebytes(payload) + b"--B--\n")


def attached(rng) -> bytes:
    fmt, data = mutated(rng)
    return as_message(data, f"a.{archivers.EXTENSIONS.get(fmt, fmt)}")


HEADERS = [
    b"Content-Type: multipart/mixed; boundary=B", b"Content-Type: multipart/mixed; boundary=C",
    b"Content-Type: message/rfc822", b"Content-Type: text/plain",
    b"Content-Type: application/zip", b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable", b"Content-Transfer-Encoding: x-uuencode",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.exe",
    b"Content-Type: message/partial; id=1; number=1", b"MIME-Version: 1.0", b"X: y",
]
LINES = HEADERS + [b"--B", b"--B--", b"--C", b"--C--", b"", b"begin 644 x", b"end", b"=",
                   b"TVqQAAMAAAAEAAAA//8AALgA", b"\r"]


def mime(rng) -> bytes:
    """A message as a script of bytes, one a line: a header or boundary line
    from LINES, a header block, or the next up to 80 bytes of junk."""
    script = rng.randbytes(1 + rng.randrange(400))
    junk = rng.randbytes(rng.randrange(4097))
    lines, pos = [], 0
    for op in script[1:]:
        if op < 8 * len(LINES):  # two thirds of the lines
            lines.append(LINES[op % len(LINES)])
        elif op < 8 * len(LINES) + 48:  # a part's headers, then its body
            lines += [HEADERS[op % len(HEADERS)], HEADERS[op * 7 % len(HEADERS)], b""]
        else:
            lines.append(junk[pos:pos + op % 81])
            pos += op % 81
    return (b"\r\n" if script[0] & 1 else b"\n").join(lines)


@cache
def corpus_mail() -> tuple[bytes, ...]:
    """The shared corpus' real mails (MIME, uuencode, BinHex, TNEF inside)."""
    folder = ARCHIVES.parent / "mail"
    return tuple(p.read_bytes() for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.stat().st_size <= MAX_SEED) if folder.is_dir() else ()


def direct_targets() -> list[direct.Target]:
    """Real mails mutated ("mail") reach the MIME splitter and transfer
    decoders behind a valid start, where random MIME ("mime") rarely gets."""
    return [
        direct.Target("archive-bare", lambda rng: mutated(rng)[1], bare=True, warm=warm_up),
        direct.Target("archive-mail", attached, bare=False, warm=warm_up),
        direct.Target("mime", mime, bare=False),
        direct.Target("mail", lambda rng: mutate(rng, corpus_mail()), bare=False,
                      warm=corpus_mail),
    ]


CI_INPUTS = 150  # a target, in the default run


@pytest.mark.parametrize("target", ["archive-bare", "archive-mail", "mime", "mail"])
def test_mutated_and_random_mail(target):
    if target == "mail" and not corpus_mail():
        pytest.skip("no corpus/mail here")
    result = direct.fuzz(direct.targets()[target], CI_INPUTS, seed=0)
    # "passed" only: a decoder that raised on an input (kept UNCHECKED, so
    # fail-closed, but a bug) says "passed, decoders raised"
    assert result.outcome == "passed", f"{result.detail}; replay: {result.finding}"
    assert result.inputs == CI_INPUTS


@pytest.mark.parametrize("depth", [30, 300])
def test_deep_nests_of_mutated_shapes_end_at_the_limits(depth):
    raw = b"Subject: inner\n\n" + EICAR
    for level in range(depth):
        raw = (b"Content-Type: message/rfc822\n\n" if level % 2 else
               b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (level, level)) + raw
    check(raw)
