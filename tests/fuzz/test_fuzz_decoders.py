"""Fuzzing the decoders through `decompose`: real archives made by the real
tools, then mutated (bytes flipped, cut, repeated, spliced), and random MIME.

For every input: decompose returns (never raises: a broken decoder is an
UNCHECKED reason, not an exception), within the time limit plus slack, every
byte it kept on disk lies in its own work dir (which cleanup empties), and a
decoder's failure never leaves the message without a problem flag or reason
(nothing fails silently).
"""

from __future__ import annotations

import base64
import os
import resource
import signal
import tempfile
import time
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR

FORMATS = ["zip", "7z", "tar", "gz", "bz2", "xz", "zst", "lz4", "lz", "Z", "cpio", "ar", "cab",
           "arj", "lha", "arc", "iso"]
LIMITS = Limits(max_time=10.0, min_quota=16 * 1024 * 1024, max_parts=500, tool_timeout=5.0)
MEMORY_CEILING = 1536 * 1024 * 1024  # VmHWM of the whole test process


@cache
def sample(fmt: str) -> bytes | None:
    if archivers.available(fmt):
        return None
    files = {"eicar.com": EICAR} if fmt in archivers.SINGLE_STREAM else {
        "eicar.com": EICAR, "readme.txt": b"hello " * 50}
    return archivers.build(fmt, files)


@st.composite
def mutated(draw):
    fmt = draw(st.sampled_from(FORMATS))
    data = sample(fmt)
    if data is None:
        return fmt, draw(st.binary(max_size=512))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "dup", "insert", "zero"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "dup":
            span = draw(st.integers(1, 64))
            data[at:at] = data[at:at + span] * draw(st.integers(1, 8))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            data[at:at + draw(st.integers(1, 16))] = b"\0" * 4
    return fmt, bytes(data)


def as_message(payload: bytes, name: str) -> bytes:
    return (b"From: a@example.test\nTo: b@example.test\nSubject: fuzz\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="B"\n\n--B\nContent-Type: '
            b"application/octet-stream\nContent-Transfer-Encoding: base64\n"
            + f'Content-Disposition: attachment; filename="{name}"\n\n'.encode()
            + base64.encodebytes(payload) + b"--B--\n")


class Hang(Exception):
    pass


def _hang(signum, frame):
    raise Hang(f"decompose ran past {LIMITS.max_time + HANG_SLACK:g}s")


HANG_SLACK = 20


def check(raw: bytes, bare: bool = False) -> None:
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(int(LIMITS.max_time + HANG_SLACK))
    try:
        _check(raw, bare)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check(raw: bytes, bare: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="amfz") as base:
        sentinel = Path(base) / "outside"
        sentinel.mkdir()
        work = Path(base) / "work"
        work.mkdir(mode=0o700)
        started = time.monotonic()
        dec = decompose(raw, LIMITS, tempbase=str(work), bare_file=bare)
        try:
            assert time.monotonic() - started < LIMITS.max_time + HANG_SLACK
            for part in dec.root.walk():
                if part.spill_path:
                    assert Path(part.spill_path).resolve().is_relative_to(work.resolve())
                if part.flags & {"internal-error", "undecipherable"}:
                    assert dec.unchecked, f"{part.path} failed without an UNCHECKED reason"
            for reason in dec.unchecked:
                assert reason.kind  # every reason carries a kind policy can act on
            assert not any(sentinel.iterdir())
            assert set(os.listdir(base)) == {"outside", "work"}
        finally:
            dec.cleanup()
        assert not any(work.iterdir()), "cleanup left files behind"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak < MEMORY_CEILING


@given(mutated())
def test_mutated_archives_as_bare_files(case):
    fmt, data = case
    check(data, bare=True)


@given(mutated())
def test_mutated_archives_attached_to_mail(case):
    fmt, data = case
    check(as_message(data, f"a.{archivers.EXTENSIONS.get(fmt, fmt)}"))


header = st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=B", b"Content-Type: multipart/mixed; boundary=C",
    b"Content-Type: message/rfc822", b"Content-Type: text/plain",
    b"Content-Type: application/zip", b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable", b"Content-Transfer-Encoding: x-uuencode",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.exe",
    b"Content-Type: message/partial; id=1; number=1", b"MIME-Version: 1.0", b"X: y",
])
body_line = st.one_of(st.sampled_from([b"--B", b"--B--", b"--C", b"--C--", b"", b"begin 644 x",
                                       b"end", b"=", b"TVqQAAMAAAAEAAAA//8AALgA", b"\r"]),
                      st.binary(max_size=80))


@st.composite
def mime(draw):
    lines = []
    for _ in range(draw(st.integers(1, 60))):
        if draw(st.booleans()):
            lines.extend(draw(st.lists(header, max_size=4)))
            lines.append(b"")
        lines.extend(draw(st.lists(body_line, max_size=8)))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    return newline.join(lines)


@given(mime())
def test_random_mime(raw):
    check(raw)


@pytest.mark.parametrize("depth", [30, 300])
def test_deep_nests_of_mutated_shapes_end_at_the_limits(depth):
    raw = b"Subject: inner\n\n" + EICAR
    for level in range(depth):
        raw = (b"Content-Type: message/rfc822\n\n" if level % 2 else
               b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (level, level)) + raw
    check(raw)
