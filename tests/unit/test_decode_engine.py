"""The decomposition engine: content-driven decoding, limits, broken and hostile MIME."""

from __future__ import annotations

import base64
import gzip
import os
import resource
import shutil
import subprocess
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message


def holding(dec, data: bytes):
    """Parts whose decoded bytes contain `data`."""
    return [p for p in dec.root.walk() if data in p.read()]


def attach(payload: bytes, content_type: str, filename: str | None = None,
           encoding: str = "base64") -> bytes:
    disposition = f'Content-Disposition: attachment; filename="{filename}"\n' if filename else ""
    body = base64.encodebytes(payload).decode() if encoding == "base64" else payload.decode()
    return (f"From: a@example.test\nTo: b@example.test\nSubject: t\nMIME-Version: 1.0\n"
            f'Content-Type: multipart/mixed; boundary="XYZ"\n\n--XYZ\nContent-Type: text/plain\n\n'
            f"hello\n--XYZ\nContent-Type: {content_type}\n{disposition}"
            f"Content-Transfer-Encoding: {encoding}\n\n{body}--XYZ--\n").encode()


def test_leaves_are_transfer_decoded_and_text_is_kept():
    dec = decompose(eicar_message())
    (found,) = [p for p in dec.scannable() if p.read() == EICAR]
    assert found.name == "eicar.com" and found.depth == 1
    assert any(p.read().startswith(b"Please see") for p in dec.scannable())
    assert dec.unchecked == []
    assert dec.context._workdir is None  # all in memory: no temp file at all


@pytest.mark.parametrize("content_type, filename", [
    ("image/jpeg", "holiday.jpg"), ("text/plain", "notes.txt"), ("application/pdf", None)])
def test_decoding_is_driven_by_content_not_labels(content_type, filename):
    dec = decompose(attach(gzip.compress(EICAR), content_type, filename))
    (gz,) = [p for p in dec.root.walk() if p.detected == "gzip"]
    assert gz.mime_type == content_type
    assert [c.read() for c in gz.children] == [EICAR]
    assert gz.children[0] in dec.scannable()


def test_base64_body_without_content_type_is_opened():
    raw = (b"From: a@example.test\nSubject: x\nContent-Transfer-Encoding: base64\n\n"
           + base64.encodebytes(gzip.compress(EICAR)))
    assert holding(decompose(raw), EICAR)
    headless = b"\n".join(base64.encodebytes(EICAR * 3).splitlines())  # no header at all
    assert holding(decompose(b"Subject: x\nMIME-Version: 1.0\n\n" + headless), EICAR)


def forward_nest(levels: int, payload: bytes) -> bytes:
    """`levels` messages, each attached (message/rfc822) inside the next."""
    message = attach(payload, "application/octet-stream", "eicar.com")
    for n in range(levels - 1):
        message = (f"From: f{n}@example.test\nSubject: fwd {n}\nMIME-Version: 1.0\n"
                   f'Content-Type: multipart/mixed; boundary="L{n}"\n\n--L{n}\n'
                   f"Content-Type: message/rfc822\n\n").encode() + message + \
            f"\n--L{n}--\n".encode()
    return message


def test_depth_20_is_decoded_and_25_is_unchecked():
    # n nested messages put the attachment at depth n: 19 -> 19, 20 -> 20.
    dec = decompose(forward_nest(20, EICAR))
    (found,) = [p for p in dec.scannable() if p.read() == EICAR]
    assert found.depth == 20 and dec.unchecked == []
    dec = decompose(forward_nest(25, EICAR))
    assert not [p for p in dec.scannable() if p.read() == EICAR]
    assert any("nested deeper than 20 levels" in r for r in dec.unchecked)
    assert max(p.depth for p in dec.root.walk()) == 20


def gzip_of_zeros(total: int, member: int = 64 << 20) -> bytes:
    """A multi-member gzip stream of `total` zero bytes, built from one member."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    one = c.compress(bytes(member)) + c.flush()
    return one * (total // member)


def test_four_gib_of_zeros_is_stopped_fast_in_bounded_memory(tmp_path):
    bomb = gzip_of_zeros(4 << 30)
    raw = attach(bomb, "application/gzip", "zeros.gz")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    dec = decompose(raw, Limits(), tempbase=str(tmp_path))
    elapsed = time.monotonic() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    try:
        assert elapsed < 2.0, f"took {elapsed:.2f}s"
        # whichever limit comes first: the quota (50 x size) or one part's maximum
        assert any("over the quota" in r or "larger than" in r for r in dec.unchecked)
        (gz,) = [p for p in dec.root.walk() if p.detected == "gzip"]
        (partial,) = gz.children
        assert "truncated" in partial.flags and partial.spill_path  # spilled, not held
        assert partial.size <= min(Limits().quota(len(raw)), Limits().max_part_size) + (1 << 20)
        assert grown_mib < 64, f"memory grew by {grown_mib:.0f} MiB"
    finally:
        dec.cleanup()
    assert os.listdir(tmp_path) == []  # the work dir is gone


def test_part_count_limit():
    parts = "".join(f"--B\nContent-Type: text/plain\n\npart {n}\n" for n in range(3100))
    raw = f"Subject: many\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n{parts}--B--\n"
    dec = decompose(raw.encode())
    assert any("more than 3000 parts" in r for r in dec.unchecked)


def test_time_limit():
    dec = decompose(forward_nest(5, EICAR), Limits(max_time=0.0))
    assert any("decoding took longer" in r for r in dec.unchecked)


def test_message_partial_is_unchecked():
    raw = (b"Subject: part 1\nMIME-Version: 1.0\n"
           b'Content-Type: message/partial; id="abc@x"; number=1; total=2\n\n'
           b"Subject: inner\nContent-Type: application/octet-stream\n\nAAAA\n")
    dec = decompose(raw)
    assert any("message/partial" in r for r in dec.unchecked)


def test_ambiguous_boundaries_decode_every_reading():
    # A reader taking the second boundary sees the EICAR part; one taking the first does not.
    b64 = base64.encodebytes(EICAR).decode()
    raw = ("From: a@example.test\nSubject: cve-2024-28054\nMIME-Version: 1.0\n"
           'Content-Type: multipart/mixed; boundary="one"; boundary="two"\n\n'
           "--one\nContent-Type: text/plain\n\nharmless\n--one--\n"
           "--two\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
           f"{b64}--two--\n").encode()
    dec = decompose(raw)
    assert "ambiguous" in dec.root.flags
    assert [p for p in dec.scannable() if p.read() == EICAR]


@pytest.mark.parametrize("second", [r"t\i", r"\g<0>", r"t\1"],
                         ids=["bad-escape", "group", "backref"])
def test_an_ambiguous_boundary_with_backslashes_is_read_literally(second):
    # Found by the mutation driver: the boundary went into re.sub as a template
    # ("bad escape \i": the message UNCHECKED; "\g<0>" put the matched text
    # in its place: a reading with a boundary the message does not have).
    b64 = base64.encodebytes(EICAR).decode()
    raw = ("Subject: x\nMIME-Version: 1.0\n"
           f'Content-Type: multipart/mixed; boundary="one"; boundary="{second}"\n\n'
           "--one\nContent-Type: text/plain\n\nharmless\n--one--\n"
           f"--{second}\nContent-Type: application/octet-stream\n"
           f"Content-Transfer-Encoding: base64\n\n{b64}--{second}--\n").encode()
    dec = decompose(raw)
    assert not any("failed" in r for r in dec.unchecked), dec.unchecked
    assert "ambiguous" in dec.root.flags
    assert [p for p in dec.scannable() if p.read() == EICAR]


def test_conflicting_transfer_encodings_decode_every_reading():
    b64 = base64.encodebytes(EICAR).decode()
    raw = ("Subject: x\nMIME-Version: 1.0\nContent-Type: application/octet-stream\n"
           "Content-Transfer-Encoding: 7bit\nContent-Transfer-Encoding: base64\n\n" + b64).encode()
    dec = decompose(raw)
    assert "ambiguous" in dec.root.flags
    assert [p for p in dec.scannable() if p.read() == EICAR]


@pytest.mark.parametrize("mangle", [
    lambda m: m.replace(b"--b0undary--\n", b""),  # no closing boundary
    lambda m: m.replace(b"\n", b"\r"),  # bare CR line ends
    lambda m: m.replace(b"\n", b"\r\n"),
    lambda m: m.replace(b"Subject: virus", b"Subject: " + b"v" * 200_000),  # a 200 KB header
    lambda m: m.replace(b"Please see", b"Please\0\0 see"),  # NULs in a text part
    lambda m: m.replace(b"MIME-Version: 1.0\n", b""),
], ids=["no-close", "bare-cr", "crlf", "long-header", "nul", "no-mime-version"])
def test_broken_mime_still_reaches_the_attachment(mangle):
    dec = decompose(mangle(eicar_message()))
    assert [p for p in dec.scannable() if EICAR in p.read()], dec.root.describe()


def test_bad_base64_is_flagged_and_scanned():
    raw = attach(EICAR, "application/octet-stream", "x.com").replace(b"WDVPIVAl", b"WD!VP*IVAl")
    dec = decompose(raw)
    assert any("decode-error" in p.flags for p in dec.scannable())


@pytest.mark.skipif(not shutil.which("uuencode"), reason="sharutils not installed")
def test_uuencode_blocks_in_a_text_body(tmp_path):
    (tmp_path / "eicar.com").write_bytes(EICAR)
    (tmp_path / "other.bin").write_bytes(bytes(range(256)) * 4)
    blocks = [subprocess.run(["uuencode", str(tmp_path / n), n], capture_output=True,
                             check=True).stdout for n in ("other.bin", "eicar.com")]
    raw = (b"From: a@example.test\nSubject: uu\n\nHere are two files:\n\n" + blocks[0]
           + b"\nand\n\n" + blocks[1] + b"\n-- \nsig\n")
    dec = decompose(raw)
    names = {p.name: p.read() for p in dec.scannable()}
    assert names["eicar.com"] == EICAR
    assert names["other.bin"] == bytes(range(256)) * 4
    (text,) = [p for p in dec.scannable() if p.detected == "text" and not p.name]
    assert b"Here are two files" in text.read()  # the text itself is scanned too


def test_large_parts_spill_to_the_work_dir_and_are_cleaned_up(tmp_path):
    big = os.urandom(9 << 20)
    dec = decompose(attach(gzip.compress(big, 1), "application/gzip", "big.gz"),
                    tempbase=str(tmp_path))
    (gz,) = [p for p in dec.root.walk() if p.detected == "gzip"]
    (inner,) = gz.children
    assert b"".join(inner.chunks()) == big and oct(os.stat(inner.spill_path).st_mode)[-3:] == "600"
    dec.cleanup()
    assert os.listdir(tmp_path) == []


def test_many_small_parts_past_max_memory_spill_too(tmp_path):
    """A zip of 20 x 1 MiB (each under the 8 MiB spill threshold) with
    max_memory = 4 MiB: at most 4 MiB stays in memory, the rest is on disk."""
    from amavisd.testing import archivers

    members = {f"m{n:02d}.bin": os.urandom(1 << 20) for n in range(20)}
    data = archivers.build("zip", members, tmp_path)
    dec = decompose(attach(data, "application/zip", "many.zip"),
                    Limits(max_memory=4 << 20), tempbase=str(tmp_path))
    (archive,) = [p for p in dec.root.walk() if p.detected == "zip"]
    assert {m.name: b"".join(m.chunks()) for m in archive.children} == members
    held = sum(len(p.data) for p in archive.children)
    spilled = [p for p in archive.children if p.spill_path]
    assert held <= 4 << 20 and len(spilled) >= 16
    dec.cleanup()


def test_clean_message_tree_describes_itself():
    tree = decompose(clean_message()).root.describe()
    assert tree["detected"] == "mail" and tree["depth"] == 0
    assert tree["children"][0]["mime_type"] == "text/plain"


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_never_raise(data):
    dec = decompose(data, Limits(max_time=5))
    assert dec.root.size == len(data)
    dec.cleanup()


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=8)), max_size=12))
def test_mutated_mime_never_raises(edits):
    raw = bytearray(eicar_message())
    for offset, junk in edits:
        pos = offset % (len(raw) + 1)
        raw[pos:pos + len(junk)] = junk
    dec = decompose(bytes(raw), Limits(max_time=5))
    list(dec.scannable())
    dec.cleanup()
