"""MIME ends at OUR limits: any nesting, iteratively, in bounded memory.

Nested message/rfc822 is one layer deeper each and meets `max_depth` through
the engine's own stack; multipart nesting inside one message (which adds no
depth) meets its own bound, past which the rest is scanned raw. Either way
the message is UNCHECKED of kind `limit`, never CLEAN and never a decoder
failure; and a big message of short lines costs a small constant factor of
its size in memory (the stdlib parser took 30 times it).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.testing.eicar import EICAR
from tests.unit.test_decode_engine import forward_nest

MiB = 1 << 20
EICAR_B64 = base64.encodebytes(EICAR)
MAX_NESTING = 100  # multiparts inside one message (mimesplit.MAX_NESTING)
MAX_FIELDS = 100  # Content-* fields in one entity (mimesplit.MAX_FIELDS)


def multipart_nest(levels: int, payload: bytes = EICAR) -> bytes:
    """`levels` multiparts, each the only part of the one around it, with
    `payload` base64-attached in the innermost. The boundaries b1, b10,
    b100... are prefixes of each other."""
    parts = [b"From: a@example.test\nSubject: deep\nMIME-Version: 1.0\n"]
    parts += (b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (n, n)
              for n in range(levels))
    parts.append(b"Content-Type: application/octet-stream; name=eicar.com\n"
                 b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(payload))
    parts += (b"--b%d--\n" % n for n in reversed(range(levels)))
    return b"".join(parts)


def limits_only(dec) -> list[str]:
    assert dec.unchecked, "must not be CLEAN"
    assert {reason.kind for reason in dec.unchecked} == {"limit"}, dec.unchecked
    return list(dec.unchecked)


@pytest.mark.parametrize("levels", [250, 2000])
def test_deep_message_rfc822_nest_stops_at_max_depth(levels):
    dec = decompose(forward_nest(levels, EICAR))
    reasons = limits_only(dec)
    assert any("nested deeper than 20 levels" in r for r in reasons)
    assert not [p for p in dec.root.walk() if p.read() == EICAR]  # never reached
    assert max(p.depth for p in dec.root.walk()) == Limits().max_depth
    (stopped,) = [p for p in dec.scannable() if "too-deep" in p.flags]
    assert stopped.detected == "mail"  # the message we did not open is scanned raw
    dec.cleanup()


@pytest.mark.parametrize("levels", [1000, 100_000])
def test_deep_multipart_nest_stops_at_its_own_bound(levels):
    raw = multipart_nest(levels)
    dec = decompose(raw, Limits(max_time=20))
    reasons = limits_only(dec)
    assert any(f"multiparts nested deeper than {MAX_NESTING} levels" in r for r in reasons)
    assert not [p for p in dec.root.walk() if p.read() == EICAR]
    # the rest is scanned raw: the multipart past the bound, with all it holds
    (rest,) = [p for p in dec.scannable() if "too-deep" in p.flags]
    assert rest.read().startswith(b'Content-Type: multipart/mixed; boundary="b%d"' % MAX_NESTING)
    assert EICAR_B64 in rest.read() and rest.detected == "multipart"
    assert max(p.depth for p in dec.root.walk()) == 1  # multipart nesting adds no depth
    dec.cleanup()


def test_multiparts_up_to_the_bound_are_all_opened():
    dec = decompose(multipart_nest(MAX_NESTING))
    (found,) = [p for p in dec.scannable() if p.read() == EICAR]
    assert found.depth == 1 and found.name == "eicar.com"
    assert dec.unchecked == []


def test_nothing_after_an_early_close_delimiter_is_lost():
    """The stdlib drops everything after a close delimiter that comes before
    any other: EICAR attached behind one passed as CLEAN."""
    raw = (b'Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n\n'
           b"--B--\n--B\nContent-Type: application/octet-stream\n"
           b"Content-Transfer-Encoding: base64\n\n" + EICAR_B64 + b"--B--\n")
    dec = decompose(raw)
    assert [p for p in dec.scannable() if p.read() == EICAR]


def test_a_multipart_cut_short_by_an_outer_boundary_is_also_read_on():
    """A reader that only looks for the innermost boundary reads the inner
    multipart past the outer boundary line: that reading is decoded too."""
    raw = (b'Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="out"\n\n'
           b'--out\nContent-Type: multipart/mixed; boundary="in"\n\n'
           b"--in\nContent-Type: text/plain\n\nhello\n--out\nContent-Type: text/plain\n\nbye\n"
           b"--in\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
           + EICAR_B64 + b"--in--\n--out--\n")
    dec = decompose(raw)
    (reading,) = [p for p in dec.root.walk() if p.name == "(read past an outer boundary)"]
    assert "ambiguous" in reading.parent.flags and reading.depth == 2
    (inner,) = reading.children  # its own multipart, with the attachment in it
    assert [p.read() for p in inner.children] == [b"hello\n--out\nContent-Type: text/plain"
                                                  b"\n\nbye", EICAR]
    assert dec.unchecked == []


def test_too_many_content_fields_in_one_entity_is_unchecked():
    raw = b"Subject: x\n" + b"Content-Type: text/plain\n" * (MAX_FIELDS + 1) + b"\nbody\n"
    reasons = limits_only(decompose(raw))
    assert any(f"more than {MAX_FIELDS} Content-* header fields" in r for r in reasons)


def test_a_content_field_of_thousands_of_parameters_is_unchecked_not_parsed():
    """The stdlib's parameter parser is quadratic: 64k parameters (3.8 MB)
    took 17 s in one decoder call, out of the decode deadline's reach."""
    params = "".join(f"; name=a{i}.txt" for i in range(64_000))
    raw = (b"Subject: x\nMIME-Version: 1.0\nContent-Type: application/octet-stream"
           + params.encode() + b"\n\nWScript.Echo 1\n")
    started = time.monotonic()
    reasons = limits_only(decompose(raw))
    assert time.monotonic() - started < 5
    assert any("one over 16384 bytes, in one entity" in r for r in reasons), reasons


# -- memory: a small constant factor of the message ---------------------------

PEAK = textwrap.dedent("""
    import sys, tempfile
    from amavisd.decode.engine import decompose
    from amavisd.decode.limits import Limits

    def hwm():  # peak RSS of this process, in bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024

    raw = open(sys.argv[1], "rb").read()
    dec = decompose(raw, Limits(), tempbase=tempfile.mkdtemp(dir=sys.argv[2]))
    assert len(list(dec.scannable())) >= 1
    dec.cleanup()
    print(hwm())
""")


def write_message(path: Path, kind: str, size: int) -> None:
    head = b"From: a@example.test\nSubject: big\nMIME-Version: 1.0\n"
    with open(path, "wb") as fh:
        if kind == "short lines":
            fh.write(head + b'Content-Type: multipart/mixed; boundary="B"\n\n'
                     b"--B\nContent-Type: text/plain\n\n")
            fh.write(b"ab\n" * (size // 3))
            fh.write(b"--B--\n")
        elif kind == "base64 attachment":
            fh.write(head + b'Content-Type: multipart/mixed; boundary="B"\n\n--B\n\nhi\n--B\n'
                     b"Content-Type: application/octet-stream; name=big.bin\n"
                     b"Content-Transfer-Encoding: base64\n\n")
            fh.write(base64.encodebytes(os.urandom(size * 3 // 4)))
            fh.write(b"--B--\n")
        elif kind == "header lines":
            fh.write(head + b"X-Short: y\n" * (size // 11) + b"Content-Type: text/plain\n\nhi\n")


@pytest.mark.parametrize("kind, size", [("short lines", 64 * MiB),
                                        ("base64 attachment", 64 * MiB),
                                        ("header lines", 16 * MiB)])
def test_peak_memory_is_a_small_factor_of_the_message(tmp_path, kind, size):
    """Peak RSS of a fresh interpreter that reads and decomposes the message:
    under 4 x the message + 60 MiB (the stdlib parser took 2 GiB for 64 MiB
    of short lines, 600 MiB for the base64 attachment)."""
    path = tmp_path / "big.eml"
    write_message(path, kind, size)
    message = path.stat().st_size
    proc = subprocess.run([sys.executable, "-c", PEAK, str(path), str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.split()[-1])
    assert peak < 4 * message + 60 * MiB, f"peak {peak / MiB:.0f} MiB for {message / MiB:.0f} MiB"
