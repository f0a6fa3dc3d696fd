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

from amavisd.decode import external
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.registry import WorkDirFailed
from amavisd.testing.eicar import EICAR
from tests.rigs import archivers
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
    roomy = Limits(spill_threshold=16 << 20, max_memory=64 << 20,  # in-process: in memory
                   hold_floor=64 << 20)
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
    assert [c.name for c in dec.root.children if "link" not in c.flags] == ["up_pwned.txt"]
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


# -- review 2, item 8: a member after zero padding, a member inside trailing data -----------

MULTI_MEMBER = ["gz", "bz2", "xz", "zst", "lz4", "lz"]


@pytest.mark.parametrize("padding", [1024, 2 << 20])
@pytest.mark.parametrize("fmt", MULTI_MEMBER)
def test_a_member_after_zero_padding_is_read(tmp_path, fmt, padding):
    """Python's gzip module skips the zeros and gives the second member
    (gzip(1) stops at them): it was taken for padding, and never read."""
    need(fmt)
    first = archivers.build(fmt, {"a.txt": README}, tmp_path)
    second = archivers.build(fmt, {"b.com": EICAR}, tmp_path)
    dec = decode_bare(first + bytes(padding) + second)
    (child,) = dec.root.children
    assert child.read() == README + EICAR
    assert dec.unchecked == [] and "decode-error" not in dec.root.flags


@pytest.mark.parametrize("fmt", MULTI_MEMBER)
def test_zero_padding_at_the_end_is_still_only_padding(tmp_path, fmt):
    need(fmt)
    data = archivers.build(fmt, {"a.txt": README}, tmp_path)
    dec = decode_bare(data + bytes(4096))
    assert dec.root.children[0].read() == README
    assert dec.unchecked == [] and not dec.root.flags & {"decode-error", "truncated"}


@pytest.mark.parametrize("fmt", MULTI_MEMBER)
@pytest.mark.parametrize("junk", [b"JUNK", b"\0\0\0\0JUNK\0\0"])
def test_a_member_inside_trailing_data_is_unchecked(tmp_path, fmt, junk):
    """Garbage, then a member: no reader here reaches it, one that skips
    garbage may: UNCHECKED, with the first member scanned."""
    need(fmt)
    first = archivers.build(fmt, {"a.txt": README}, tmp_path)
    second = archivers.build(fmt, {"b.com": EICAR}, tmp_path)
    dec = decode_bare(first + junk + second)
    assert kinds(dec) == ["undecipherable"], dec.unchecked
    assert holding(dec, README) and dec.root in dec.scannable()


# -- review 2, item 1: a zip in front of the one the central directory describes -------------

def zip_by_7zz(tmp_path, name: str, data: bytes, method: str) -> bytes:
    """A one-member zip made by 7zz (zip(1) writes no PPMd)."""
    work = tmp_path / f"z-{method}"
    work.mkdir()
    (work / name).write_bytes(data)
    subprocess.run(["7zz", "a", "-tzip", f"-mm={method}", "-bd", "out.zip", name], cwd=work,
                   check=True, capture_output=True)
    return (work / "out.zip").read_bytes()


@pytest.mark.parametrize("method", ["PPMd", "Deflate"])
def test_a_zip_in_front_of_another_is_read_too(tmp_path, method):
    """`cat a.zip b.zip`: 7-Zip opens the first, zipfile the last. Members
    of the first in a method only 7zz reads were skipped."""
    need_tools("7zz")
    front = zip_by_7zz(tmp_path, "invoice.com", PAYLOAD, method)
    dec = decode_bare(front + zip_of({"hi.txt": README}))
    assert holding(dec, PAYLOAD) and holding(dec, README)
    assert dec.unchecked == [] and dec.root in dec.scannable()


def test_a_zip_in_front_in_a_method_nothing_reads_is_unchecked():
    front = archivers.zip_with_method(zip_of({"invoice.com": EICAR}), 0, 19)  # IBM TERSE
    dec = decode_bare(front + zip_of({"hi.txt": README}))
    assert kinds(dec) == ["undecipherable"] and "invoice.com" in dec.unchecked[0]
    assert holding(dec, README)


def test_an_encrypted_zip_in_front_is_unchecked(tmp_path):
    need("zip")
    front = archivers.build_encrypted("zip", {"invoice.com": EICAR}, tmp_path)
    dec = decode_bare(front + zip_of({"hi.txt": README}))
    assert kinds(dec) == ["encrypted"] and "invoice.com" in dec.unchecked[0]


def test_a_signature_by_chance_in_a_stub_is_not_a_member():
    """PK\\3\\4 inside an SFX stub, followed by no zip writer's header: ignored."""
    stub = b"MZ" + bytes(100) + b"PK\x03\x04\xff\xff" + bytes(26) + b"\x01\x02 junk" * 20
    dec = decode_bare(stub + zip_of({"hi.txt": README}))
    assert holding(dec, README) and dec.unchecked == []


# -- review 2, items 2 and 3: 7z entries with data, whatever their attributes -----------------

def sevenzip_with_attributes(tmp_path, attributes) -> bytes:
    """py7zr writes invoice.com, then its attributes are changed in the header."""
    py7zr = pytest.importorskip("py7zr")
    path = tmp_path / "attr.7z"
    archive = py7zr.SevenZipFile(path, "w")
    archive.writestr(README, "readme.txt")
    archive.writestr(PAYLOAD, "invoice.com")
    for entry in archive.header.files_info.files:
        if entry["filename"] == "invoice.com":
            entry["attributes"] = attributes(entry["attributes"])
    archive.close()
    return path.read_bytes()


UNIX = 0x8000  # FILE_ATTRIBUTE_UNIX_EXTENSION: the high 16 bits are st_mode


@pytest.mark.parametrize("attributes", [
    lambda a: a | 0x10,  # FILE_ATTRIBUTE_DIRECTORY
    lambda a: UNIX | (0o040755 << 16) | 0x10,  # a unix directory
    lambda a: UNIX | (0o140755 << 16),  # a unix socket
], ids=["dos-directory", "unix-directory", "unix-socket"])
def test_7z_entry_with_data_is_a_file_whatever_its_attributes(tmp_path, attributes):
    """`7zz x` writes such an entry's data as a regular file; py7zr's
    is_directory (and is_socket) made us skip it."""
    need_tools("7zz")
    dec = decode_bare(sevenzip_with_attributes(tmp_path, attributes))
    assert holding(dec, PAYLOAD) and holding(dec, README)
    assert dec.unchecked == []


def test_7z_symlink_entry_data_is_scanned_flagged(tmp_path):
    data = sevenzip_with_attributes(tmp_path, lambda a: UNIX | (0o120777 << 16) | (a & 0xFFFF))
    dec = decode_bare(data)
    (link,) = holding(dec, PAYLOAD)
    assert "link" in link.flags and link in dec.scannable()


@pytest.mark.parametrize("method", ["PPMd", "LZMA2"])  # 7zz; py7zr first
def test_7z_symlink_whose_target_is_the_payload_is_scanned(tmp_path, method):
    """A real symlink stored by 7zz -snl: its data is the target text."""
    need_tools("7zz")
    target = EICAR.decode()  # 68 printable bytes, no "/": a valid link target
    data = archivers.build_7z_shadowed({"readme.txt": README}, {}, tmp_path,
                                       links={"eicar.com": target}, method=method)
    dec = decode_bare(data)
    (link,) = holding(dec, EICAR)
    assert "link" in link.flags and dec.unchecked == []


def test_tar_and_cpio_symlinks_give_their_target(tmp_path):
    """tar keeps the target in the header, cpio as the entry's data: 7-Zip
    without -snl writes either as a file holding the target."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("eicar.com")
        link.type, link.linkname = tarfile.SYMTYPE, EICAR.decode()
        tf.addfile(link)
    dec = decode_bare(buf.getvalue())
    (child,) = holding(dec, EICAR)
    assert "link" in child.flags
    need_tools("cpio")
    (tmp_path / "eicar.com").symlink_to(EICAR.decode())
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"eicar.com\n",
                          cwd=tmp_path, capture_output=True, check=True).stdout
    dec = decode_bare(cpio)
    (child,) = holding(dec, EICAR)
    assert "link" in child.flags


# -- review 2, item 4: zip link and directory entries with data -------------------------------

def zip_entry_with_attributes(name: str, data: bytes, system: int, attributes: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", README)
        info = zipfile.ZipInfo(name)
        info.create_system, info.external_attr = system, attributes
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)
    return out.getvalue()


def test_zip_symlink_entry_data_is_scanned_flagged():
    """Python's extractall writes a link entry's data as a regular file."""
    data = zip_entry_with_attributes("invoice.com", PAYLOAD, 3, (0o120777 << 16))
    dec = decode_bare(data)
    (link,) = holding(dec, PAYLOAD)
    assert "link" in link.flags and dec.unchecked == []


@pytest.mark.parametrize("name, attributes", [("docs/", 0x10), ("docs/", 0), ("docs", 0x10)])
def test_zip_directory_entry_with_data_is_read(name, attributes):
    dec = decode_bare(zip_entry_with_attributes(name, PAYLOAD, 0, attributes))
    assert holding(dec, PAYLOAD) and dec.unchecked == []


def test_zip_directory_entries_without_data_give_no_part(tmp_path):
    """jar writers deflate directories (two bytes of an empty stream): no part."""
    data = zip_of({"META-INF_": b"", "META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n"},
                  zipfile.ZIP_DEFLATED).replace(b"META-INF_", b"META-INF/")
    assert zipfile.ZipFile(io.BytesIO(data)).infolist()[0].compress_size == 2
    dec = decode_bare(data)
    assert [c.name for c in dec.root.children] == ["META-INF/MANIFEST.MF"]
    assert dec.root.expanded and dec.unchecked == []


# -- review 2, item 5: local header and central directory disagree on the name ---------------

def zip_renamed_centrally(local: str, central: str, sizes: bool = False) -> bytes:
    """A one-member deflated zip whose central entry says `central` (same
    length as `local`); with `sizes`, also a stored empty size there."""
    assert len(local) == len(central)
    data = bytearray(zip_of({local: PAYLOAD}, zipfile.ZIP_DEFLATED if not sizes else 0))
    at = archivers.zip_records(bytes(data), b"PK\x01\x02")[0]
    data[at + 46:at + 46 + len(central)] = central.encode()
    if sizes:
        struct.pack_into("<II", data, at + 20, 0, 0)  # compressed and uncompressed size
    return bytes(data)


@pytest.mark.parametrize("sizes", [False, True], ids=["with-data", "empty-centrally"])
def test_zip_directory_centrally_a_file_locally_is_read(sizes):
    """bsdtar (the local headers) writes aaaaaaaa.c, unzip sees a directory."""
    dec = decode_bare(zip_renamed_centrally("aaaaaaaa.c", "aaaaaaaaa/", sizes))
    found = holding(dec, PAYLOAD)
    assert "aaaaaaaa.c" in [part.name for part in found]
    assert dec.unchecked == [] and dec.root in dec.scannable()


def test_zip_local_name_is_a_reading_of_its_own():
    """The banned-name rules must see the name a streaming reader writes."""
    dec = decode_bare(zip_renamed_centrally("invoice.exe", "invoice.txt"))
    assert {part.name for part in holding(dec, PAYLOAD)} == {"invoice.txt", "invoice.exe"}


def test_zip_unicode_path_extra_is_the_same_name(corpus):
    """Info-ZIP's Unicode Path field (0x7075): the local name is the one in
    it, as libarchive reads it; no second reading."""
    sample = corpus / "archives/zip/libarchive__test_read_format_zip_7075_utf8_paths.zip"
    dec = decode_bare(sample.read_bytes())
    assert len(dec.root.children) == 4 and dec.root.expanded


# -- review 2, items 6 and 7, and the same question elsewhere: members of one name ----------

def test_cab_with_two_members_of_one_name_gives_both(tmp_path):
    """cabextract exits 0 having written the second over the first; 7zz -aou
    renames the second."""
    need("cab")
    need_tools("cabextract", "7zz")
    data = archivers.build("cab", {"d1/ab.txt": PAYLOAD, "d2/ab.txt": b"harmless\n"}, tmp_path)
    twice = data.replace(b"d2\\ab.txt", b"d1\\ab.txt").replace(b"d2/ab.txt", b"d1/ab.txt")
    assert twice != data
    dec = decode_bare(twice)
    assert holding(dec, PAYLOAD) and dec.unchecked == []


def test_cab_with_two_members_of_one_name_and_no_second_reader_is_unchecked(tmp_path,
                                                                           monkeypatch):
    need("cab")
    need_tools("cabextract")
    data = archivers.build("cab", {"d1/ab.txt": PAYLOAD, "d2/ab.txt": b"harmless\n"}, tmp_path)
    twice = data.replace(b"d2\\ab.txt", b"d1\\ab.txt").replace(b"d2/ab.txt", b"d1/ab.txt")
    monkeypatch.setattr(external, "available", lambda tool: tool == "cabextract")
    dec = decode_bare(twice)
    assert kinds(dec) == ["undecipherable"] and "1 of the 2 files" in dec.unchecked[0]


def arc_of_one_name(tmp_path) -> bytes:
    """An ARC whose two members are both AB.TXT (ARC headers have no checksum)."""
    data = archivers.build("arc", {"AB.TXT": PAYLOAD, "BA.TXT": b"harmless\n"}, tmp_path)
    assert data.count(b"BA.TXT\0") == 1
    return data.replace(b"BA.TXT\0", b"AB.TXT\0")


def test_arc_with_two_members_of_one_name_gives_both(tmp_path):
    """nomarch keeps the last; a copy with distinct names gives both."""
    need("arc")
    need_tools("nomarch")
    dec = decode_bare(arc_of_one_name(tmp_path))
    assert holding(dec, PAYLOAD) and dec.unchecked == []


def test_arc_of_one_name_with_no_reader_keeping_them_apart_is_unchecked(tmp_path,
                                                                       monkeypatch):
    need("arc")
    need_tools("nomarch")
    from amavisd.decode.archives import legacy

    monkeypatch.setattr(legacy, "APART", {})
    dec = decode_bare(arc_of_one_name(tmp_path))
    assert kinds(dec) == ["undecipherable"], dec.unchecked
    assert "2 members, nomarch wrote 1" in dec.unchecked[0]


def crc16_arc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def lha_renamed(data: bytes, old: bytes, new: bytes) -> bytes:
    """Level-2 LHA headers (jlha's): a name in extended header 1 changed,
    the header's CRC-16 (extended header 0) computed again."""
    out, pos = bytearray(data), 0
    while pos + 24 <= len(out) and out[pos:pos + 2] != b"\0\0":
        (size,) = struct.unpack_from("<H", out, pos)
        assert out[pos + 20] == 2, "level 2 headers only"
        header = out[pos:pos + size]
        if b"\x01" + old in header:
            header = header.replace(b"\x01" + old, b"\x01" + new)
            at = header.find(b"\x05\x00\x00") + 3  # common header: size 5, type 0, CRC-16
            header[at:at + 2] = b"\0\0"
            struct.pack_into("<H", header, at, crc16_arc(bytes(header)))
            out[pos:pos + size] = header
        (packed,) = struct.unpack_from("<I", out, pos + 7)
        pos += size + packed
    return bytes(out)


def test_lha_with_two_members_of_one_name_gives_both(tmp_path):
    """lhasa writes the second over the first and exits 0; 7zz -aou renames."""
    need("lha")
    need_tools("lhasa", "7zz")
    data = archivers.build("lha", {"ab.txt": PAYLOAD, "ba.txt": b"harmless\n"}, tmp_path)
    dec = decode_bare(lha_renamed(data, b"ba.txt", b"ab.txt"))
    assert holding(dec, PAYLOAD) and dec.unchecked == []


def test_rar_with_two_members_of_one_name_is_unchecked(corpus, tmp_path):
    """unar and bsdtar both write the second over the first (exit 0), 7zz
    here has no rar: no reader gives both."""
    need_tools("unar")
    data = bytearray((corpus / "archives/rar/rarfile__rar5-owner.rar").read_bytes())
    at = data.find(b"owner2.txt")
    for start in range(at - 5, 8, -1):  # the RAR5 header around the name: CRC32, size, ...
        size, end = data[start + 4], start + 5  # a one-byte size vint (a short header)
        if not size & 0x80 and end + size > at and \
                zlib.crc32(data[start + 4:end + size]) == struct.unpack_from("<I", data, start)[0]:
            break
    data[at:at + 10] = b"owner1.txt"
    struct.pack_into("<I", data, start, zlib.crc32(data[start + 4:end + size]))
    import rarfile

    names = [i.filename for i in rarfile.RarFile(io.BytesIO(bytes(data))).infolist()]
    assert names == ["owner1.txt", "owner1.txt"]
    dec = decode_bare(bytes(data))
    assert kinds(dec) == ["undecipherable"] and "2 members, unar wrote 1" in dec.unchecked[0]


# -- review 2, also found: a pax size that covers the next member ----------------------------

def test_tar_pax_size_over_the_next_member_is_read_both_ways():
    dec = decode_bare(archivers.tar_pax_size_covering(PAYLOAD))
    assert holding(dec, PAYLOAD) and dec.unchecked == []
    assert "decode-error" in dec.root.flags and dec.root in dec.scannable()
