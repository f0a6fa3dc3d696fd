"""Archives and compressed streams fail closed (issue 10, items 2, 3 and 6).

The rule: what any reader would give from the bytes is scanned, and a part
positively identified as an archive or compressed stream with content that
nothing here could produce makes the message UNCHECKED (kind
undecipherable). A failed check over data that was produced is only flagged
(we scan what `gzip -dc` gives). Fixtures come from the real tools at test
time (amavisd.testing.archivers), then byte surgery: a check value flipped,
a method number changed, a member's directory entry removed.
"""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
import zipfile
import zlib

import pytest

from amavisd.decode.archives import external
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.registry import WorkDirFailed
from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from tests.unit.decoding import cleanup_decoded, decode_bare  # noqa: F401 (fixture)

README = b"Quarterly figures attached, see the sheet.\n" * 20
PAYLOAD = README + EICAR + b"\n" + README  # EICAR inside: a reader must give all of it


def need(*formats: str) -> None:
    for fmt in formats:
        reason = archivers.available(fmt)
        if reason:
            pytest.skip(reason)


def need_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def kinds(dec) -> list[str]:
    return [reason.kind for reason in dec.unchecked]


def holding(dec, data: bytes) -> list:
    """The parts whose bytes are `data`, anywhere in the tree."""
    return [part for part in dec.root.walk() if part.size == len(data) and part.read() == data]


def text(size: int, seed: int = 5) -> bytes:
    """Compressible but varied text, so compressors make real compressed blocks."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"mail", b"scanner", b"quota", b"\n"]
    return b" ".join(rng.choice(words) for _ in range(size // 5))[:size]


def flipped(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x5A
    return bytes(out)


# -- item 2: a failed check keeps the data ------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(archivers.CHECK_BYTE))
def test_a_failed_check_keeps_all_the_data_and_is_not_unchecked(tmp_path, fmt):
    """gzip -dc, 7zz e, xz --ignore-check give the data: so must we (it was
    thrown away, 0 bytes, and the message CLEAN)."""
    need(fmt)
    data = archivers.build(fmt, {"invoice.txt": PAYLOAD}, tmp_path)
    dec = decode_bare(archivers.with_bad_check(fmt, data))
    found = holding(dec, PAYLOAD)
    assert found, [(p.path, p.size, sorted(p.flags)) for p in dec.root.walk()]
    assert all(part in dec.scannable() for part in found)
    assert "corrupt" in found[0].flags and "decode-error" in dec.root.flags
    assert dec.unchecked == []  # the bytes are there for the scanner: nothing hidden


def test_gzip_goes_on_after_a_member_whose_check_failed(tmp_path):
    need("gz")
    first = archivers.build("gz", {"a.txt": README}, tmp_path)
    second = archivers.build("gz", {"b.com": EICAR}, tmp_path)
    dec = decode_bare(archivers.with_bad_check("gz", first) + second)
    (child,) = dec.root.children
    assert child.read() == README + EICAR and "corrupt" in child.flags
    assert dec.unchecked == []


def test_gzip_header_crc_is_a_check_too():
    member = bytearray(b"\x1f\x8b\x08\x02" + bytes(6))  # FHCRC
    member += struct.pack("<H", (zlib.crc32(bytes(member)) & 0xFFFF) ^ 1)
    packer = zlib.compressobj(wbits=-15)
    member += packer.compress(EICAR) + packer.flush()
    member += struct.pack("<II", zlib.crc32(EICAR), len(EICAR))
    dec = decode_bare(bytes(member))
    (child,) = dec.root.children
    assert child.read() == EICAR and "corrupt" in child.flags and dec.unchecked == []


# what reaches no end: corrupt data in the middle (0xFF bytes over compressed blocks)
DAMAGED = ["bz2", "xz", "lzma", "lz", "zst", "Z"]


@pytest.mark.parametrize("fmt", DAMAGED)
def test_a_stream_no_reader_finishes_is_undecipherable(tmp_path, fmt):
    need(fmt)
    data = bytearray(archivers.build(fmt, {"f.txt": EICAR + b"\n" + text(300_000)}, tmp_path))
    middle = len(data) // 2
    data[middle:middle + 40] = b"\xff" * 40
    dec = decode_bare(bytes(data))
    assert kinds(dec) == ["undecipherable"], dec.unchecked
    assert "undecipherable" in dec.root.flags and dec.root in dec.scannable()
    assert all(child in dec.scannable() for child in dec.root.children if child.size)


@pytest.mark.parametrize("fmt", ["xz", "lzma", "lz", "Z"])
def test_what_precedes_the_damage_is_scanned(tmp_path, fmt):
    need(fmt)
    data = bytearray(archivers.build(fmt, {"f.txt": EICAR + b"\n" + text(300_000)}, tmp_path))
    middle = len(data) // 2
    data[middle:middle + 40] = b"\xff" * 40
    dec = decode_bare(bytes(data))
    assert any(child.read().startswith(EICAR) for child in dec.root.children)


def test_gzip_member_that_does_not_inflate_after_a_good_one(tmp_path):
    need("gz")
    good = archivers.build("gz", {"a.com": EICAR}, tmp_path)
    bad = b"\x1f\x8b\x08\x00" + bytes(6) + b"\x07" + bytes(20)  # BTYPE 11: no such block
    dec = decode_bare(good + bad)
    assert kinds(dec) == ["undecipherable"]
    assert any(child.read() == EICAR for child in dec.root.children)


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz", "lzma", "lz", "zst", "lz4", "Z"])
def test_a_stream_cut_short_is_flagged_not_unchecked(tmp_path, fmt):
    """Nothing is hidden after the cut: the bytes are not in the message."""
    need(fmt)
    data = archivers.build(fmt, {"f.txt": text(300_000)}, tmp_path)
    dec = decode_bare(data[:len(data) * 3 // 5])
    assert dec.unchecked == []
    if fmt != "Z":  # compress(1) has no end marker: a cut stream looks whole
        assert dec.root.flags & {"truncated", "decode-error"}


@pytest.mark.parametrize("fmt", ["gz", "bz2", "zst", "lz4", "lz", "xz"])
def test_trailing_bytes_that_start_no_member_are_not_corruption(tmp_path, fmt):
    need(fmt)
    data = archivers.build(fmt, {"f.txt": PAYLOAD}, tmp_path)
    dec = decode_bare(data + b"This is unrelated junk data at the end of the file\n")
    assert dec.root.children[0].read() == PAYLOAD
    assert "decode-error" in dec.root.flags and dec.unchecked == []


def test_a_full_disk_under_a_second_reader_is_a_tempfail(tmp_path, small_tmpfs):
    """xz reads the stream again after the check failed in-process; its output
    meets a full disk: that is ours (tempfail), not a damaged stream (UNCHECKED)."""
    need("xz")
    data = archivers.build("xz", {"f.txt": text(4 << 20)}, tmp_path)
    bad = archivers.with_bad_check("xz", data)
    roomy = Limits(spill_threshold=16 << 20, max_memory=64 << 20)  # in-process: in memory
    with pytest.raises(WorkDirFailed, match="xz ran out of space"):
        decompose(bad, roomy, tempbase=small_tmpfs, bare_file=True)


# -- item 6: zip members nothing here reads ------------------------------------------------

def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize("method", [97, 98, 96, 19, 200])  # WavPack, PPMd, JPEG, LZ77, none
def test_zip_member_with_a_method_nothing_reads_is_unchecked(method):
    data = archivers.zip_with_method(zip_of({"readme.txt": README, "invoice.com": EICAR}), 1, method)
    dec = decode_bare(data)
    assert kinds(dec) == ["undecipherable"], dec.unchecked
    assert "invoice.com" in dec.unchecked[0]
    assert holding(dec, README)  # the member that could be read is scanned
    assert dec.root in dec.scannable()


def test_zip_without_7zz_for_its_method_is_unchecked(monkeypatch):
    monkeypatch.setattr(external, "available", lambda tool: False)
    dec = decode_bare(archivers.zip_with_method(zip_of({"invoice.com": EICAR}), 0, 98))
    assert kinds(dec) == ["undecipherable"]


def test_zip_member_whose_crc_fails_is_kept_not_unchecked():
    data = bytearray(zip_of({"invoice.com": EICAR}))
    for signature, at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        data[archivers.zip_records(bytes(data), signature)[0] + at] ^= 0x5A
    dec = decode_bare(bytes(data))
    (child,) = holding(dec, EICAR)
    assert "corrupt" in child.flags and "decode-error" in dec.root.flags
    assert dec.unchecked == []


def test_zip_deflate_that_does_not_inflate_is_unchecked():
    good = zip_of({"a.com": EICAR, "b.txt": text(50_000)}, zipfile.ZIP_DEFLATED)
    data = bytearray(good)
    start = archivers.zip_records(good, b"PK\x03\x04")[1] + 30 + len("b.txt")
    data[start] = 0x07  # BFINAL, BTYPE 11: no such block
    dec = decode_bare(bytes(data))
    assert kinds(dec) == ["undecipherable"] and "b.txt" in dec.unchecked[0]
    assert holding(dec, EICAR)


def test_zip_stream_stopping_short_of_its_end_is_unchecked():
    """Its sizes say less than its deflate stream holds, the archive goes on:
    what lies past the stated size is content a streaming reader gives."""
    good = zip_of({"b.txt": text(50_000), "a.com": EICAR}, zipfile.ZIP_DEFLATED)
    data = bytearray(good)
    for signature, at in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):
        pos = archivers.zip_records(good, signature)[0] + at
        (csize,) = struct.unpack_from("<I", data, pos)
        struct.pack_into("<I", data, pos, csize // 2)
    dec = decode_bare(bytes(data))
    assert kinds(dec) == ["undecipherable"], dec.unchecked


def test_zip_local_header_method_differs_from_the_directory():
    """unzip trusts the directory (stored: the raw deflate bytes), a streaming
    reader the local header (deflate: EICAR): both readings are scanned."""
    data = archivers.zip_with_method(zip_of({"invoice.com": EICAR}, zipfile.ZIP_DEFLATED), 0, 0, local=False)
    dec = decode_bare(data)
    assert holding(dec, EICAR)
    assert dec.root in dec.scannable()


def test_zip_member_with_only_a_local_header_is_read():
    """A member whose directory entry was removed: unzip lists only the
    others, a streaming reader extracts it too."""
    data = archivers.zip_without_entry(zip_of({"readme.txt": README, "invoice.com": EICAR}), 1)
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["readme.txt"]
    dec = decode_bare(data)
    assert holding(dec, EICAR) and holding(dec, README)
    assert dec.root in dec.scannable()


def test_zip_stored_inside_a_zip_is_not_read_as_hidden_members():
    inner = zip_of({"x.txt": README})
    dec = decode_bare(zip_of({"inner.zip": inner, "readme.txt": README}))
    assert [c.name for c in dec.root.children] == ["inner.zip", "readme.txt"]
    assert dec.root.expanded and dec.unchecked == []


# -- item 3: a tool that fails must not hide what it (or another way) extracts --------------

@pytest.mark.parametrize("method", ["PPMd", "LZMA2"])  # 7zz; py7zr first
@pytest.mark.parametrize("shadow", ["link", "file"])
def test_7z_entry_shadowing_a_directory_still_gives_the_member(tmp_path, method, shadow):
    """`docs` (a link, or a file) then `docs/invoice.txt`: 7zz x cannot write
    the second (exit 2), 7zz e (flat) can."""
    need_tools("7zz")
    first, links = ({}, {"docs": "/etc"}) if shadow == "link" else ({"docs": b"plain"}, {})
    data = archivers.build_7z_shadowed(first, {"docs/invoice.txt": EICAR}, tmp_path,
                                       links=links, method=method)
    dec = decode_bare(data)
    assert holding(dec, EICAR), [(p.name, p.size) for p in dec.root.walk()]
    assert dec.unchecked == []


def test_7z_member_no_reading_produces_is_unchecked_the_others_kept(tmp_path):
    need_tools("7zz")
    (tmp_path / "a.com").write_bytes(EICAR)
    (tmp_path / "b.txt").write_bytes(text(20_000))
    subprocess.run(["7zz", "a", "-ms=off", "-mhc=off", "-m0=PPMd", "-bd", "out.7z", "a.com",
                    "b.txt"], cwd=tmp_path, check=True, capture_output=True)
    data = bytearray((tmp_path / "out.7z").read_bytes())
    (header,) = struct.unpack_from("<Q", data, 12)
    for at in range(32 + header - 30, 32 + header - 10):  # b.txt's packed data, last
        data[at] ^= 0x5A
    dec = decode_bare(bytes(data))
    assert kinds(dec) == ["undecipherable"] and "b.txt" in dec.unchecked[0]
    assert holding(dec, EICAR)


def test_cab_that_no_reader_finishes_is_unchecked(tmp_path):
    need("cab")
    need_tools("cabextract")
    data = bytearray(archivers.build("cab", {"a.com": EICAR, "b.txt": text(200_000)},
                                     tmp_path))
    data[-2000:-1960] = b"\xff" * 40  # in b.txt's data: cabextract and 7zz fail on it
    dec = decode_bare(bytes(data))
    assert kinds(dec) == ["undecipherable"], dec.unchecked
    assert holding(dec, EICAR)  # written before the failure: scanned
    assert dec.root in dec.scannable()


def test_cab_with_no_reader_installed_is_unchecked(tmp_path, monkeypatch):
    need("cab")
    data = archivers.build("cab", {"a.com": EICAR}, tmp_path)
    monkeypatch.setattr(external, "available", lambda tool: False)
    dec = decode_bare(data)
    assert kinds(dec) == ["undecipherable"]


def test_rar_member_path_through_a_link_is_read_flat(corpus):
    """unar refuses up/pwned.txt (up is a link to ..); bsdtar reads it flat."""
    need_tools("unar", "bsdtar")
    sample = corpus / "archives/path-traversal/rarfile__rar5-evil-symlink-traversal.rar"
    dec = decode_bare(sample.read_bytes())
    assert [c.name for c in dec.root.children if c.size] == ["up_pwned.txt"]
    assert dec.unchecked == []


def test_arc_nomarch_failing_is_unchecked(tmp_path):
    need("arc")
    need_tools("nomarch")
    data = archivers.build("arc", {"a.com": EICAR, "b.txt": text(20_000)}, tmp_path)
    dec = decode_bare(data[:len(data) - 3000])  # b.txt cut: nomarch fails on it (exit 1)
    assert kinds(dec) == ["undecipherable"], dec.unchecked
    assert holding(dec, EICAR)  # written before the failure: scanned


def test_tool_readings_leave_no_scratch_paths_in_reasons(tmp_path):
    need("cab")
    need_tools("cabextract")
    data = bytearray(archivers.build("cab", {"b.txt": text(200_000)}, tmp_path))
    data[-2000:-1960] = b"\xff" * 40
    dec = decode_bare(bytes(data))
    assert dec.unchecked and "/tmp" not in dec.unchecked[0] and "amavisd-" not in dec.unchecked[0]


# -- archive members whose CRC fails: kept, not UNCHECKED ------------------------------------

@pytest.mark.parametrize("method", ["PPMd", "LZMA2"])  # 7zz; py7zr first
def test_7z_member_whose_crc_fails_is_kept_not_unchecked(tmp_path, method):
    need_tools("7zz")
    (tmp_path / "a.com").write_bytes(EICAR)
    (tmp_path / "b.txt").write_bytes(README)
    subprocess.run(["7zz", "a", "-mhc=off", f"-m0={method}", "-bd", "out.7z", "a.com", "b.txt"],
                   cwd=tmp_path, check=True, capture_output=True)
    data = bytearray((tmp_path / "out.7z").read_bytes())
    data[data.rfind(struct.pack("<I", zlib.crc32(EICAR)))] ^= 0x5A  # a.com's CRC, in the header
    (offset, size) = struct.unpack_from("<QQ", data, 12)  # the start header's CRCs follow suit
    struct.pack_into("<I", data, 28, zlib.crc32(data[32 + offset:32 + offset + size]))
    struct.pack_into("<I", data, 8, zlib.crc32(data[12:32]))
    dec = decode_bare(bytes(data))
    assert holding(dec, EICAR) and holding(dec, README)
    assert "decode-error" in dec.root.flags and dec.unchecked == []


def test_arj_member_whose_crc_fails_is_kept_by_7zz_not_unchecked(tmp_path):
    """arj deletes a member whose CRC fails, 7-Zip keeps it: no second reader
    is needed, and nothing is hidden."""
    need("arj")
    need_tools("7zz")
    from amavisd.decode.archives import legacy

    data = bytearray(archivers.build("arj", {"a.com": EICAR, "b.txt": README}, tmp_path))
    header = legacy.read_arj_header(bytes(data), 0).end  # the first member's header
    (size,) = struct.unpack_from("<H", data, header + 2)
    data[header + 4 + 20] ^= 0x5A  # its file CRC-32; then the header's own CRC-32 again
    struct.pack_into("<I", data, header + 4 + size, zlib.crc32(data[header + 4:header + 4 + size]))
    dec = decode_bare(bytes(data))
    assert holding(dec, EICAR) and holding(dec, README)
    assert "decode-error" in dec.root.flags and dec.unchecked == []
