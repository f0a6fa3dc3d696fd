"""freeze (.F) 1.x and 2.x, read in-process: the corpus samples, cut short, garbage, the budget.

No freeze/melt exists on Debian 12, so the reference is the payload itself:
both corpus samples are alice29.txt, which the corpus also holds as a .Z
that the real gzip(1) decompresses.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amavisd.decode import detect
from amavisd.decode.archives import freeze
from amavisd.decode.engine import decompose
from amavisd.decode.limits import LimitExceeded, Limits
from amavisd.decode.parts import Part
from amavisd.decode.registry import REGISTRY, Context, DecodeError
from tests.unit.decoding import cleanup_decoded, decode_bare  # noqa: F401 (fixture)

V1_SAMPLE = "archives/freeze-F/ancient__test_C1_old.F"  # 1F 9E
V2_SAMPLE = "archives/freeze-F/ancient__test_C1.F"  # 1F 9F
SAMPLES = [V1_SAMPLE, V2_SAMPLE]
ALICE_SIZE = 152089
# A 2.x header that adds up (the one the corpus sample carries): distance codes
# of 3, 4, 5, 6 and 7 bits, 1 + 2 + 6 + 19 + 34 of them.
V2_HEADER = b"\x1f\x9f\x88\x18\x13"


@pytest.fixture
def alice(corpus: Path) -> bytes:
    if shutil.which("gzip") is None:
        pytest.skip("gzip not installed")
    done = subprocess.run(["gzip", "-dc", str(corpus / "archives/compress-Z/ancient__test_C1.Z")],
                          capture_output=True, check=True, timeout=30)
    assert len(done.stdout) == ALICE_SIZE
    return done.stdout


def melt(data: bytes, limits: Limits | None = None, name: str = "") -> tuple[Part, bytes]:
    """The freeze decoder alone, as the engine calls it: a DecodeError flags
    the part; any other exception fails the test."""
    ctx = Context(limits or Limits(), len(data))
    part = ctx.new_part(data, detected="freeze", name=name)
    try:
        REGISTRY["freeze"](part, ctx)
    except DecodeError:
        part.flags.add("decode-error")
    output = part.children[0].read() if part.children else b""
    ctx.cleanup()
    return part, output


@pytest.mark.parametrize("sample", SAMPLES)
def test_corpus_sample_melts_to_alice(corpus, alice, sample):
    data = (corpus / sample).read_bytes()
    assert detect.sniff(data[:16]) == "freeze"
    part, output = melt(data, name="alice29.txt.F")
    assert output == alice
    assert part.flags == {"expanded"}
    (child,) = part.children
    assert child.name == "alice29.txt" and not child.flags


def test_the_samples_are_one_of_each_version(corpus):
    assert freeze.VERSIONS[(corpus / V1_SAMPLE).read_bytes()[:2]] is freeze.V1
    assert freeze.VERSIONS[(corpus / V2_SAMPLE).read_bytes()[:2]] is freeze.V2


def test_v2_header_gives_the_distance_code_lengths():
    assert freeze.v2_code_lengths(V2_HEADER) == (0, 0, 1, 2, 6, 19, 34, 0)


@pytest.mark.parametrize("header", [
    b"\x1f\x9f\xff\xff\x00",  # top bit of the word set
    b"\x1f\x9f\x00\x00\x40",  # top bits of the byte set
    b"\x1f\x9f\x01\x00\x3f",  # 1 + 63 codes: more than 62
    b"\x1f\x9f\x00\x00\x00",  # 62 codes of 7 or 8 bits cannot fill 8 bits
])
def test_bad_v2_header_is_a_decode_error_with_no_child(header):
    part, output = melt(header + b"\x55" * 100)
    assert "decode-error" in part.flags and not part.children


@pytest.mark.parametrize("sample", SAMPLES)
def test_cut_anywhere_is_flagged_and_keeps_what_came_before(corpus, alice, sample):
    data = (corpus / sample).read_bytes()
    cuts = sorted({2, 3, 4, 5, 6, 7, 100, *range(1, len(data), 1499), len(data) - 2,
                   len(data) - 1})
    for cut in cuts:
        part, output = melt(data[:cut])
        assert part.flags & {"truncated", "decode-error"}, cut
        assert alice.startswith(output), cut
        if part.children:
            assert "truncated" in part.children[0].flags, cut
    # what precedes the cut is kept: all but the last few bytes of the text
    part, output = melt(data[:-1])
    assert "truncated" in part.flags and len(output) > ALICE_SIZE - 100


@pytest.mark.parametrize("sample", SAMPLES)
def test_data_after_the_end_is_reported_zeros_are_not(corpus, alice, sample):
    data = (corpus / sample).read_bytes()
    part, output = melt(data + b"\0" * 5000)
    assert part.flags == {"expanded"} and output == alice
    part, output = melt(data + b"hidden after the end")
    assert "decode-error" in part.flags and output == alice
    assert "truncated" not in part.children[0].flags


@settings(max_examples=150, deadline=10_000)
@given(head=st.sampled_from([b"\x1f\x9e", V2_HEADER]), body=st.binary(max_size=3000))
def test_garbage_after_the_magic_never_raises_or_hangs(head, body):
    part, output = melt(head + body)
    (child,) = part.children
    if "truncated" in part.flags:
        assert "truncated" in child.flags
    elif "decode-error" not in part.flags:  # it really met the end marker
        assert part.flags == {"expanded"} and not child.flags
    # a token takes at least 1 bit per literal or 9 bits per match of <= 256 bytes
    assert len(output) <= max(len(body) * 8 * 256 // 9, len(body) * 8)


@settings(max_examples=100, deadline=10_000)
@given(header=st.binary(min_size=3, max_size=3), body=st.binary(max_size=500))
def test_any_v2_header_never_raises(header, body):
    part, _ = melt(b"\x1f\x9f" + header + body)
    assert part.flags & {"expanded", "decode-error"}
    assert len(part.children) == ("expanded" in part.flags)  # a bad header: no child


def test_the_clock_is_checked_while_melting(corpus):
    data = (corpus / V2_SAMPLE).read_bytes()
    ctx = Context(Limits(), len(data))
    ctx.budget.deadline = 0.0  # long past
    part = ctx.new_part(data, detected="freeze")
    with pytest.raises(LimitExceeded, match="longer than"):
        REGISTRY["freeze"](part, ctx)
    assert "truncated" in part.children[0].flags


def test_budget_smaller_than_the_output_stops_it(corpus, alice, monkeypatch):
    # small chunks, so what fits in the quota is kept: charged as it goes
    monkeypatch.setattr(freeze, "CHUNK", 16 * 1024)
    data = (corpus / V2_SAMPLE).read_bytes()
    result = decompose(data, limits=Limits(min_quota=100_000, quota_factor=1), bare_file=True)
    try:
        root = result.root
        assert "limit" in root.flags and "quota" in result.unchecked[0]
        (child,) = root.children
        assert "truncated" in child.flags
        assert 50_000 < child.size <= 100_000 and alice.startswith(child.read())
    finally:
        result.cleanup()


@pytest.mark.parametrize("sample", SAMPLES)
def test_engine_turns_a_sample_into_the_text(corpus, alice, sample):
    result = decode_bare((corpus / sample).read_bytes())
    root = result.root
    assert root.detected == "freeze" and root.flags == {"expanded"}
    (child,) = root.children
    assert child.read() == alice and not child.flags
    assert result.unchecked == [] and result.scannable() == [child]
