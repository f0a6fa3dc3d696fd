"""The zip decoder on the shared corpus and on zips the real tools make here."""

from __future__ import annotations

import bz2
import io
import os
import resource
import shutil
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from amavisd.decode import external
from amavisd.decode.archives.zip import decode_zip
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Undecipherable
from amavisd.testing.eicar import CLAM_EXE_PATH

MiB = 1024 * 1024


def decode(data: bytes, limits: Limits | None = None, spilled: bool = False
           ) -> tuple[Part, Context]:
    """Run the zip decoder alone on `data`, as the engine would (DecodeError flags,
    Undecipherable also makes the message UNCHECKED);
    `spilled` puts the archive in a file first, as a big attachment would be."""
    ctx = Context(limits or Limits(), len(data))
    part = ctx.new_part(data, detected="zip")
    if spilled:
        part.spill(ctx.workdir())
    try:
        decode_zip(part, ctx)
    except Undecipherable as err:
        part.flags.add("undecipherable")
        ctx.note_unchecked(part, str(err), kind="undecipherable")
    except DecodeError:
        part.flags.add("decode-error")
    return part, ctx


def members(part: Part) -> dict[str, bytes]:
    return {child.name: child.read() for child in part.children}


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def run(argv: list[str], cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, timeout=60)


def held(part: Part) -> int:
    """Bytes a part really holds (Sink's size also counts the chunk refused at the quota)."""
    return os.path.getsize(part.spill_path) if part.spill_path else len(part.data)


def clam_exe() -> bytes:
    if not os.path.exists(CLAM_EXE_PATH):
        pytest.skip(f"{CLAM_EXE_PATH} missing (Debian package clamav-testfiles)")
    return Path(CLAM_EXE_PATH).read_bytes()


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """Three files to archive: text, something compressible, random bytes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_bytes(b"hello from the zip tests\n")
    (src / "zeros.bin").write_bytes(bytes(300_000))
    (src / "random.bin").write_bytes(os.urandom(50_000))
    return src


def expected(src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and not p.is_symlink()}


# -- the corpus ------------------------------------------------------------------------------


def test_every_corpus_zip_opens(corpus: Path):
    files = [p for p in sorted((corpus / "archives" / "zip").rglob("*")) if p.is_file()]
    assert len(files) > 30
    opened = 0
    for path in files:
        part, ctx = decode(path.read_bytes())  # anything but DecodeError fails the test
        opened += bool(part.children)
        ctx.cleanup()
    assert opened >= len(files) - 3  # only the split pieces and the jar of one dir


@pytest.mark.parametrize("name", ["clamav__clam.zip", "clamav__clam.bz2.zip",
                                  "clamav__clam.d64.zip", "clamav__clam.impl.zip",
                                  "clamav-upstream__clam.split.oneseg.zip"])
def test_clam_zips_give_clam_exe(corpus: Path, name: str):
    if "impl" in name:
        need("7zz")  # implode: no in-process reader
    part, ctx = decode((corpus / "archives" / "zip" / name).read_bytes())
    assert clam_exe() in members(part).values()
    assert part.expanded and not ctx.unchecked
    ctx.cleanup()


def test_corpus_names_cp437_and_utf8(corpus: Path):
    folder = corpus / "archives" / "zip"
    part, _ = decode((folder / "cpython__zip_cp437_header.zip").read_bytes())
    assert "filename_with_æoå.txt" in members(part)
    part, _ = decode((folder / "libarchive__test_read_format_zip_7075_utf8_paths.zip").read_bytes())
    assert {"File 2 - ö.txt", "File 3 - ä.txt", "File 4 - å.txt"} <= set(members(part))
    assert part.expanded  # the local headers' names differ; the central ones count


def test_corpus_encrypted_zips_are_unchecked(corpus: Path):
    files = sorted((corpus / "archives" / "encrypted").glob("*.zip"))
    assert files
    for path in files:
        part, ctx = decode(path.read_bytes())
        assert "encrypted" in part.flags, path.name
        assert any("encrypted zip member" in reason for reason in ctx.unchecked), path.name
        assert not part.expanded
    partly = corpus / "archives/encrypted/libarchive__test_read_format_zip_encryption_partially.zip"
    part, ctx = decode(partly.read_bytes())
    assert set(members(part)) == {"bar.txt"}  # the plain member is still read
    assert any("foo.txt" in reason for reason in ctx.unchecked)


def test_corpus_corrupt_zips_give_what_they_can(corpus: Path):
    for path in sorted((corpus / "archives" / "corrupt").glob("*zip*")):
        decode(path.read_bytes())[1].cleanup()  # no exception but DecodeError
    part, ctx = decode((corpus / "archives/zip/libarchive__test_read_format_zip.zip").read_bytes())
    assert "decode-error" in part.flags  # file2's CRC is wrong ...
    assert members(part)["file2"] and "corrupt" in part.children[1].flags  # ... still kept
    assert not ctx.unchecked  # every byte unzip -p gives is scanned: nothing hidden


def test_corpus_sfx_stub_before_the_zip(corpus: Path):
    part, _ = decode((corpus / "archives/sfx-exe/libarchive__zip_sfx.bin").read_bytes())
    assert set(members(part)) == {"file0", "build.sh"}
    assert not part.expanded  # the stub is scanned as part of the zip


def test_corpus_split_zip_last_piece(corpus: Path):
    part, _ = decode((corpus / "archives/zip/split/clamav-upstream__logos.zip").read_bytes())
    assert set(members(part)) == {"logos/logo.3.png"}  # the one member in this piece
    assert members(part)["logos/logo.3.png"].startswith(b"\x89PNG")
    assert "truncated" in part.flags


def test_zbsm_overlap_bomb_stops_at_once(corpus: Path):
    data = (corpus / "archives/bombs/recursiveextractor__zbsm.zip").read_bytes()
    started = time.monotonic()
    result = decompose(data, bare_file=True)
    assert time.monotonic() - started < 10
    assert "limit" in result.root.flags and not result.root.children
    assert any("overlapping zip entries" in reason for reason in result.unchecked)


def test_droste_quine_ends_at_the_depth_limit(corpus: Path):
    data = (corpus / "archives/bombs/recursiveextractor__droste.zip").read_bytes()
    started = time.monotonic()
    result = decompose(data, bare_file=True)
    assert time.monotonic() - started < 10
    assert any("nested deeper" in reason for reason in result.unchecked)
    assert max(p.depth for p in result.root.walk()) == Limits().max_depth


def test_1025mb_zip_stops_at_the_quota(corpus: Path):
    data = (corpus / "archives/bombs/sflock__1025mb.zip").read_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = decompose(data, bare_file=True)
    assert time.monotonic() - started < 10
    assert any("quota" in reason for reason in result.unchecked)
    assert held(result.root.children[0]) <= Limits().min_quota
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 200 * MiB  # the member was spilled, not held
    result.cleanup()


# -- zips the real tools make ------------------------------------------------------------------


@pytest.mark.parametrize("spilled", [False, True])
def test_zip_tool_archive(sources: Path, tmp_path: Path, spilled: bool):
    need("zip")
    run(["zip", "-q", "-r", str(tmp_path / "a.zip"), "."], sources)
    part, ctx = decode((tmp_path / "a.zip").read_bytes(), spilled=spilled)
    assert members(part) == expected(sources)
    assert part.expanded and not ctx.unchecked
    ctx.cleanup()


def test_forced_zip64(sources: Path, tmp_path: Path):
    need("zip")
    run(["zip", "-q", "-fz", str(tmp_path / "z64.zip"), "readme.txt", "zeros.bin"], sources)
    assert zipfile.ZipFile(tmp_path / "z64.zip").infolist()[0].extract_version >= 45
    part, _ = decode((tmp_path / "z64.zip").read_bytes())
    assert members(part) == {k: v for k, v in expected(sources).items() if k != "random.bin"}
    assert part.expanded


def test_without_7zz_implode_is_unchecked(corpus: Path, monkeypatch):
    monkeypatch.setattr(external, "available", lambda tool: False)
    part, ctx = decode((corpus / "archives/zip/clamav__clam.impl.zip").read_bytes())
    assert not part.children and "undecipherable" in part.flags
    assert ctx.unchecked == ["zip member CLAM.EXE: method 6 needs 7zz, which is not installed "
                             f"({part.path})"]
    assert [reason.kind for reason in ctx.unchecked] == ["undecipherable"]


def test_zipcrypto_member_is_unchecked_plain_one_read(sources: Path, tmp_path: Path):
    need("zip")
    archive = str(tmp_path / "c.zip")
    run(["zip", "-q", "-e", "-P", "pw", archive, "random.bin"], sources)
    run(["zip", "-q", archive, "readme.txt"], sources)
    part, ctx = decode(Path(archive).read_bytes())
    assert set(members(part)) == {"readme.txt"}
    assert "encrypted" in part.flags and not part.expanded
    assert ctx.unchecked == [f"encrypted zip member random.bin ({part.path})"]


def test_winzip_aes_is_unchecked(sources: Path, tmp_path: Path):
    need("7zz")
    run(["7zz", "a", "-tzip", "-mem=AES256", "-ppw", str(tmp_path / "aes.zip"), "."], sources)
    part, ctx = decode((tmp_path / "aes.zip").read_bytes())
    assert not part.children and "encrypted" in part.flags
    assert sorted(ctx.unchecked) == sorted(f"encrypted zip member {name} ({part.path})"
                                           for name in expected(sources))


@pytest.mark.parametrize("method", ["Deflate64", "BZip2", "LZMA", "PPMd"])
def test_7zz_methods(sources: Path, tmp_path: Path, method: str):
    need("7zz")
    run(["7zz", "a", "-tzip", f"-mm={method}", str(tmp_path / "m.zip"), "."], sources)
    part, ctx = decode((tmp_path / "m.zip").read_bytes())
    assert members(part) == expected(sources)
    assert part.expanded and not ctx.unchecked
    ctx.cleanup()


def test_7zz_only_for_the_members_that_need_it(sources: Path, tmp_path: Path):
    need("7zz")
    archive = str(tmp_path / "mixed.zip")
    run(["7zz", "a", "-tzip", "-mm=PPMd", archive, "zeros.bin"], sources)
    run(["7zz", "a", "-tzip", "-mm=Deflate", archive, "readme.txt", "random.bin"], sources)
    methods = {i.filename: i.compress_type for i in zipfile.ZipFile(archive).infolist()}
    assert methods["zeros.bin"] == 98 and methods["random.bin"] != 98
    part, ctx = decode(Path(archive).read_bytes())
    assert members(part) == expected(sources)  # declared names back on the tool's output
    ctx.cleanup()


def test_directories_make_no_parts_links_their_target_flagged(sources: Path, tmp_path: Path):
    """A link's data (its target) is scanned, flagged `link`: Python's
    extractall writes it as a regular file. Never followed."""
    need("zip")
    (sources / "folder").mkdir()
    (sources / "link").symlink_to("/etc/passwd")
    run(["zip", "-q", "-r", "-y", str(tmp_path / "l.zip"), "."], sources)
    names = zipfile.ZipFile(tmp_path / "l.zip").namelist()
    assert "folder/" in names and "link" in names
    part, _ = decode((tmp_path / "l.zip").read_bytes())
    assert members(part) == expected(sources) | {"link": b"/etc/passwd"}
    assert [c.name for c in part.children if "link" in c.flags] == ["link"]


def test_prefixed_zip_and_cut_central_directory(sources: Path, tmp_path: Path):
    need("zip")
    run(["zip", "-q", "-r", str(tmp_path / "a.zip"), "."], sources)
    data = (tmp_path / "a.zip").read_bytes()
    part, _ = decode(b"MZ stub " * 100 + data)
    assert members(part) == expected(sources) and not part.expanded
    cut = data[:data.index(b"PK\x01\x02")]  # no central directory: local headers scanned
    for spilled in (False, True):
        part, ctx = decode(cut, spilled=spilled)
        assert members(part) == expected(sources)
        assert "decode-error" in part.flags and not part.expanded
        ctx.cleanup()
    part, _ = decode(data[:len(data) // 2])  # cut mid-member
    assert part.children and "decode-error" in part.flags


def test_ooxml_with_vba_project_is_flagged_macros():
    def ooxml(extra: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("[Content_Types].xml", b"<Types/>")
            zf.writestr("word/document.xml", b"<w:document/>")
            for name, data in extra.items():
                zf.writestr(name, data)
        return out.getvalue()

    part, _ = decode(ooxml({"word/vbaProject.bin": b"\xd0\xcf\x11\xe0" + bytes(600)}))
    assert "macros" in part.flags and "word/vbaProject.bin" in members(part)
    part, _ = decode(ooxml({}))
    assert "macros" not in part.flags and part.expanded


def test_generated_overlapping_entries_are_refused():
    payload = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = payload.compress(bytes(10 * MiB)) + payload.flush()
    crc = zlib.crc32(bytes(10 * MiB))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(stream),
                        10 * MiB, 1, 0) + b"a" + stream
    central = b""
    for name in (b"a", b"b", b"c"):  # three entries, one local record
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc,
                               len(stream), 10 * MiB, 1, 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 3, 3, len(central), len(local), 0)
    part, ctx = decode(local + central + end)
    assert not part.children and "limit" in part.flags
    assert ctx.unchecked == [f"overlapping zip entries (3) ({part.path})"]


def test_bzip2_member_is_bounded(tmp_path: Path):
    """zipfile's own bzip2 reader has no output bound; ours stops at the quota."""
    stream = bz2.compress(bytes(60 * MiB), 9)
    # made by hand: zip(1) has no knob for the method, 7zz would take long on 60 MiB
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 46, 0, 12, 0, 0x21, 0, len(stream),
                        60 * MiB, 9, 0) + b"zeros.bin"
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 46, 46, 0, 12, 0, 0x21, 0,
                          len(stream), 60 * MiB, 9, 0, 0, 0, 0, 0, 0) + b"zeros.bin"
    data = local + stream + central + struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(stream), 0)
    limits = Limits(min_quota=20 * MiB, quota_factor=1)
    started = time.monotonic()
    result = decompose(data, limits=limits, bare_file=True, tempbase=str(tmp_path))
    assert time.monotonic() - started < 10
    assert any("quota" in reason for reason in result.unchecked)
    assert held(result.root.children[0]) <= 20 * MiB
    result.cleanup()


def test_an_lzma_member_asking_for_a_4_gib_dictionary_is_a_decode_error():
    """Found by the mutation driver: liblzma allocates the dictionary the
    member's properties ask for before it reads a byte (MemoryError under a
    memory cap). Over LZMA_MEMLIMIT it is refused, as for .lzma files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_LZMA) as zf:
        zf.writestr("a.txt", b"hello " * 100)
    data = bytearray(buf.getvalue())
    start = 30 + struct.unpack_from("<HH", data, 26)[0] + struct.unpack_from("<HH", data, 26)[1]
    assert data[start + 2:start + 4] == b"\x05\x00"  # 5 bytes of LZMA properties
    data[start + 5:start + 9] = b"\xff\xff\xff\xff"  # dictionary size
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, hard))  # as in production: bounded
    try:
        part, ctx = decode(bytes(data))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # refused, then handed to the external unzipper, which cannot read it either
    assert part.flags & {"decode-error", "undecipherable"}, part.flags
    assert not any(c.read() for c in part.children)
