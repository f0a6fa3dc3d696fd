"""Single-stream compressors: .Z, zstd, lz4, lzip, lzma (alone), xz; against the real tools."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from amavisd.decode import compressed
from amavisd.decode.limits import Limits
from amavisd.decode.registry import Context
from tests.unit.decoding import cleanup_decoded, decode_bare  # noqa: F401 (fixture)

# The reference decoder for each corpus folder (argv before the file name).
REFERENCE = {
    ".Z": ["uncompress", "-c"],
    ".zst": ["zstd", "-dcq"],
    ".lz4": ["lz4", "-dcq"],
    ".lz": ["lzip", "-dcq"],
    ".tlz": None,  # lzip or lzma alone: decided from the content
    ".xz": ["xz", "-dc"],
    ".txz": ["xz", "-dc"],
    ".lzma": ["xz", "--format=lzma", "-dc"],
}


# libarchive's samples that end in "This is unrelated junk data at the end of the file".
TRAILING_JUNK = {"libarchive__test_compat_lz4_2.tar.lz4", "libarchive__test_compat_lzma_1.tlz"}


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def reference(path: Path) -> bytes | None:
    suffix = path.suffix if path.suffix in REFERENCE else ""
    argv = REFERENCE.get(suffix)
    if suffix == ".tlz":
        argv = ["lzip", "-dcq"] if path.read_bytes()[:4] == b"LZIP" else \
            ["xz", "--format=lzma", "-dc"]
    if not argv or shutil.which(argv[0]) is None:
        return None
    done = subprocess.run(argv + [str(path)], capture_output=True, timeout=30)
    return done.stdout if done.returncode == 0 else None


def only_child(data: bytes):
    dec = decode_bare(data)
    root = dec.root
    assert len(root.children) == 1, [c.name for c in root.children]
    return dec, root, root.children[0]


def corpus_files(corpus: Path) -> list[Path]:
    archives = corpus / "archives"
    files = [p for folder in ("compress-Z", "zstd", "lz4", "xz") for p in
             sorted((archives / folder).iterdir())]
    files += sorted(p for p in (archives / "other").iterdir() if p.suffix in (".lz", ".tlz"))
    files += sorted((archives / "iso").glob("*.iso.Z"))
    return files


def test_corpus_streams_decode_like_the_reference_tools(corpus):
    checked = 0
    for path in corpus_files(corpus):
        data = path.read_bytes()
        dec, root, child = only_child(data)
        assert root.detected in ("compress", "zstd", "lz4", "xz", "lzma", "lzip"), path.name
        expected = reference(path)
        if expected is not None:
            assert child.read() == expected, path.name
            checked += 1
        assert ("decode-error" in root.flags) == (path.name in TRAILING_JUNK), path.name
        assert "truncated" not in child.flags, path.name
        dec.cleanup()
    assert checked >= 20


def test_lz4_trailing_junk_is_reported_and_the_frames_kept(corpus):
    # libarchive's sample: two frames, then "This is unrelated junk data..."
    path = corpus / "archives/lz4/libarchive__test_compat_lz4_2.tar.lz4"
    dec, root, child = only_child(path.read_bytes())
    assert "decode-error" in root.flags and "truncated" not in child.flags
    need("lz4")
    assert child.read() == subprocess.run(["lz4", "-dc", str(path)], capture_output=True).stdout


def test_zstd_skippable_frame_first(corpus):
    path = corpus / "archives/zstd/clamav-upstream__skip_prefix.txt.zst"
    _, root, child = only_child(path.read_bytes())
    assert root.detected == "zstd" and root.expanded
    assert child.read().startswith(b"ZSTD_TEST_PAYLOAD_FOR_CLAMAV")


def make(tmp_path: Path, argv: list[str], payload: bytes, name: str = "payload") -> bytes:
    """Compress `payload` with a real tool writing to stdout."""
    source = tmp_path / name
    source.write_bytes(payload)
    return subprocess.run(argv + [str(source)], capture_output=True, check=True).stdout


PAYLOAD = b"".join(b"line %d of a test payload, with some words repeated\n" % i
                   for i in range(4000)) + os.urandom(3000)


# Not -b9: ncompress's own -b9 output fails in uncompress and gzip alike (the
# corpus's test_C1.Z is a good 9-bit stream).
@pytest.mark.parametrize("bits", [10, 12, 16])
def test_compress_fixture_code_widths(tmp_path, bits):
    need("compress")
    packed = make(tmp_path, ["compress", "-c", f"-b{bits}"], PAYLOAD)
    _, root, child = only_child(packed)
    assert child.read() == PAYLOAD and root.expanded


def test_compress_in_process_and_gzip_agree_on_a_large_stream(tmp_path):
    need("compress", "gzip")
    payload = os.urandom(100_000) + PAYLOAD * 3
    packed = make(tmp_path, ["compress", "-c"], payload)
    assert len(packed) >= compressed.LZW_TOOL_FROM  # takes the gzip(1) path
    outputs = []
    for use_tool in (False, True):
        ctx = Context(Limits(), len(packed))
        part = ctx.new_part(packed, detected="compress")
        if use_tool:
            assert compressed._uncompress_with_gzip(part, ctx, "x")
        else:
            compressed.stream(part, ctx, compressed.LzwDecompressor, "x", multi_member=False)
        outputs.append(part.children[0].read())
        ctx.cleanup()
    assert outputs[0] == outputs[1] == payload


def test_compress_corrupt_keeps_what_precedes_the_damage(tmp_path):
    need("compress")
    original = os.urandom(50_000) + PAYLOAD * 4
    packed = bytearray(make(tmp_path, ["compress", "-c"], original))
    packed[len(packed) // 2:len(packed) // 2 + 40] = b"\xff" * 40  # codes not yet defined
    dec, root, child = only_child(bytes(packed))
    assert "truncated" in child.flags
    assert 20_000 < child.size < len(original)
    assert original.startswith(child.read()[:20_000])
    # what follows the damage nobody could read: fail closed (gzip -dc stops there too)
    assert "undecipherable" in root.flags
    assert [u.kind for u in dec.unchecked] == ["undecipherable"]


def test_zstd_frames_and_skippable_frames(tmp_path):
    need("zstd")
    one = make(tmp_path, ["zstd", "-qc", "-19"], PAYLOAD)
    two = make(tmp_path, ["zstd", "-qc", "--no-check"], b"second frame\n", "b")
    skip = b"\x5a\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"HIDE!"
    _, root, child = only_child(skip + one + skip + two)
    assert child.read() == PAYLOAD + b"second frame\n" and root.expanded


def test_lz4_frames_legacy_and_concatenated(tmp_path):
    need("lz4")
    frame = make(tmp_path, ["lz4", "-qc"], PAYLOAD)
    legacy = make(tmp_path, ["lz4", "-qc", "-l"], PAYLOAD, "legacy")
    skip = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"
    assert legacy[:4] == compressed.LZ4_LEGACY
    for packed, expected in ((frame, PAYLOAD), (legacy, PAYLOAD),
                             (frame + frame, PAYLOAD * 2), (legacy + frame, PAYLOAD * 2),
                             (skip + frame + skip + legacy, PAYLOAD * 2)):
        _, root, child = only_child(packed)
        assert child.read() == expected and "decode-error" not in root.flags


def test_lzip_members_checked_against_the_tool(tmp_path):
    need("lzip")
    one = make(tmp_path, ["lzip", "-c", "-9"], PAYLOAD)
    two = make(tmp_path, ["lzip", "-c", "-0"], b"member two\n", "b")
    joined = tmp_path / "joined.lz"
    joined.write_bytes(one + two)
    expected = subprocess.run(["lzip", "-dc", str(joined)], capture_output=True,
                              check=True).stdout
    _, root, child = only_child(one + two)
    assert child.read() == expected == PAYLOAD + b"member two\n" and root.detected == "lzip"


def test_lzip_crc_mismatch_is_reported(tmp_path):
    need("lzip")
    packed = bytearray(make(tmp_path, ["lzip", "-c"], PAYLOAD))
    packed[-20] ^= 0xFF  # the trailer's CRC32
    _, root, child = only_child(bytes(packed))
    assert "decode-error" in root.flags and child.read() == PAYLOAD


def test_lzma_alone(tmp_path):
    need("xz")
    packed = make(tmp_path, ["xz", "--format=lzma", "-c"], PAYLOAD)
    _, root, child = only_child(packed)
    assert root.detected == "lzma" and child.read() == PAYLOAD and root.expanded


@pytest.mark.parametrize("tool", [["zstd", "-qc"], ["lz4", "-qc"], ["lzip", "-c"],
                                  ["xz", "--format=lzma", "-c"], ["xz", "-c"]])
def test_truncated_streams_keep_their_output_and_are_flagged(tmp_path, tool):
    need(tool[0])
    packed = make(tmp_path, tool, os.urandom(200_000))
    dec, root, child = only_child(packed[:len(packed) // 2])
    assert "truncated" in child.flags
    assert root.flags & {"truncated", "decode-error"}
    assert 0 < child.size < 200_000
    dec.cleanup()


def test_garbage_after_a_single_stream_is_reported(tmp_path):
    need("xz")
    packed = make(tmp_path, ["xz", "--format=lzma", "-c"], PAYLOAD)
    _, root, child = only_child(packed + b"\0" * 100 + b"hidden data")
    assert child.read() == PAYLOAD and "truncated" not in child.flags
    assert "decode-error" in root.flags


def test_zero_padding_is_not_garbage(tmp_path):
    need("zstd")
    packed = make(tmp_path, ["zstd", "-qc"], PAYLOAD)
    _, root, child = only_child(packed + b"\0" * 4096)
    assert child.read() == PAYLOAD and "decode-error" not in root.flags


@pytest.mark.parametrize("tool, size", [(["zstd", "-qc", "-3"], 512 << 20),
                                        (["compress", "-c"], 120 << 20)])
def test_bombs_stop_at_the_quota(tmp_path, tool, size):
    need(tool[0])
    zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    packed = subprocess.run(tool, stdin=zeros.stdout, capture_output=True, check=True).stdout
    zeros.wait()
    started = time.monotonic()
    dec = decode_bare(packed)
    assert time.monotonic() - started < 5
    assert dec.unchecked and "quota" in dec.unchecked[0]
    (child,) = dec.root.children
    assert "truncated" in child.flags and child.size <= Limits().min_quota + (1 << 21)
    dec.cleanup()


@pytest.mark.parametrize("name", ["libarchive__test_read_too_many_filters.gz",
                                  "sflock__1025mb.tar.bz2"])
def test_corpus_bombs_stop_within_seconds(corpus, name):
    started = time.monotonic()
    dec = decode_bare((corpus / "archives/bombs" / name).read_bytes())
    assert time.monotonic() - started < 5
    assert dec.unchecked  # too deep, or over the quota: never CLEAN
    dec.cleanup()


def test_gzip_inside_compress_inside_zstd(tmp_path):
    need("compress", "zstd")
    inner = gzip.compress(PAYLOAD)
    packed = make(tmp_path, ["zstd", "-qc"], make(tmp_path, ["compress", "-c"], inner, "in"))
    dec = decode_bare(packed)
    assert [p.detected for p in dec.root.walk()][:3] == ["zstd", "compress", "gzip"]
    assert any(p.read() == PAYLOAD for p in dec.root.walk())


def test_an_xz_stream_asking_for_a_huge_dictionary_is_refused_unread():
    """Found by the mutation driver's long run: an xz block's LZMA2 filter may
    ask for any dictionary, which liblzma allocates first (MemoryError under
    a memory cap: a tempfail at every retry). Past LZMA_MEMLIMIT liblzma
    refuses it, as for .lzma: the message is UNCHECKED, nothing decoded."""
    import lzma

    data = lzma.compress(b"hello " * 100, format=lzma.FORMAT_XZ,
                         filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1536 << 20}])
    dec = decode_bare(data)
    assert dec.root.flags & {"decode-error", "undecipherable"} and dec.unchecked, dec.root.flags
    assert not any(c.read() for c in dec.root.children)
    small = lzma.compress(b"hello " * 100, format=lzma.FORMAT_XZ)  # xz's own defaults: fine
    _, _, child = only_child(small)
    assert child.read() == b"hello " * 100
