"""Self-extracting executables: archives found inside PE and ELF programs.

Real self-extractors from the corpus (7-Zip, WinRAR 3/5, LHA for DOS/Windows,
InstallShield, NSIS), ones made here (`arj a -je` writes a Linux ELF
self-extractor; a zip appended to /bin/true, with and without `zip -A`), and
plain programs that must give no child at all (clam.exe, /bin/true, ls).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from amavisd.decode.archives import sfx
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.registry import Context
from amavisd.testing import archivers
from amavisd.testing.eicar import CLAM_EXE_PATH, EICAR

CLAMAV_TESTFILES = Path(CLAM_EXE_PATH).parent


@pytest.fixture
def decode(tmp_path):
    results = []

    def go(data: bytes, limits: Limits | None = None):
        result = decompose(data, limits=limits, tempbase=str(tmp_path), bare_file=True)
        results.append(result)
        return result

    yield go
    for result in results:
        result.cleanup()


def embedded(data: bytes) -> list[tuple[int, str]]:
    return [(found.start, found.ext) for found in sfx.find_embedded(data)]


def a_zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


# -- the corpus ----------------------------------------------------------------------

# sample -> (offset, kind) of the archive inside; found by hand with the
# archivers' own listings (7zz l, unar, lhasa v on the cut-out bytes)
CORPUS_SFX = {
    "libarchive__7zip_sfx_pe.exe": (213504, "7z"),
    "libarchive__7zip_sfx_modified_pe.exe": (4629, "7z"),
    "libarchive__rar_sfx.exe": (98816, "rar"),
    "libarchive__rar5_sfx.exe": (316928, "rar"),
    "lhasa__lha213__sfx.exe": (1636, "lzh"),
    "lhasa__lha255e__sfx.exe": (1702, "lzh"),
    "lhasa__lh2_222__sfx.exe": (22961, "lzh"),
    "lhasa__lhmelt_16536__sfx_winsfx_213.exe": (14970, "lzh"),
    "lhasa__lhmelt_16536__sfx_winsfx32_213.exe": (31744, "lzh"),
    "lhasa__explzh_723__declha_sfx_ansi.exe": (36352, "lzh"),
}
# Not MZ or ELF, so the engine never routes them here; the finder still sees their archive.
CORPUS_OTHER = {
    "libarchive__zip_sfx.bin": (1024, "zip"),
    "rarfile__rar5-crc.sfx": (128000, "rar"),
    "lhasa__larc333__sfx.com": (594, "lzh"),
    "lhasa__lharc113__sfx.com": (1263, "lzh"),
    "lhasa__pmarc2__sfx.com": (2157, "lzh"),
    "lhasa__lha_amiga_122__sfx.run": (5596, "lzh"),
    "lhasa__lharc_atari_313a__sfx.tos": (60, "lzh"),
}


@pytest.mark.parametrize("sample, expected", sorted(CORPUS_SFX.items()))
def test_corpus_self_extractor_gives_its_archive(corpus, decode, sample, expected):
    data = (corpus / "archives/sfx-exe" / sample).read_bytes()
    result = decode(data)
    assert result.root.detected == "exe"
    (child,) = result.root.children
    offset, ext = expected
    assert child.name == f"p001@{offset}.{ext}"
    assert child.read() == data[offset:offset + child.size]
    assert child.detected == {"lzh": "lha"}.get(ext, ext)
    assert not result.root.expanded and result.root in result.scannable()


@pytest.mark.parametrize("sample, expected", sorted(CORPUS_OTHER.items()))
def test_corpus_other_self_extractors_are_found_by_the_finder(corpus, sample, expected):
    assert embedded((corpus / "archives/sfx-exe" / sample).read_bytes()) == [expected]


def test_lha_self_extractor_is_decoded_down_to_its_member(corpus, decode):
    if shutil.which("lhasa") is None:
        pytest.skip("lhasa not installed")
    result = decode((corpus / "archives/sfx-exe/lhasa__lha213__sfx.exe").read_bytes())
    (archive,) = result.root.children
    (member,) = archive.children
    assert member.name == "gpl-2" and member.size == 18092
    assert member.read().lstrip().startswith(b"GNU GENERAL PUBLIC LICENSE")


@pytest.mark.parametrize("sample", ["clamav__clam-nsis.exe", "clamav__clam_ISmsi_int.exe"])
def test_installers_without_a_standard_archive_give_no_child(corpus, decode, sample):
    result = decode((corpus / "archives/sfx-exe" / sample).read_bytes())
    assert result.root.detected == "exe" and result.root.children == []


def test_installshield_cabinet_is_found(decode):
    sample = CLAMAV_TESTFILES / "clam_IScab_int.exe"
    if not sample.exists():
        pytest.skip("clamav-testfiles not installed")
    data = sample.read_bytes()
    assert embedded(data) == [(471993, "cab")]
    (child,) = decode(data).root.children
    assert child.read()[:4] == b"MSCF" and child.size == 543349  # its cbCabinet


# -- false positives -------------------------------------------------------------------

def test_plain_programs_give_no_child(decode):
    if not Path(CLAM_EXE_PATH).exists():
        pytest.skip("clamav-testfiles not installed")
    result = decode(Path(CLAM_EXE_PATH).read_bytes())
    assert result.root.detected == "exe" and result.root.children == []
    assert result.scannable() == [result.root]
    for program in ("/bin/true", "/bin/ls", "/usr/bin/python3"):
        path = Path(program).resolve()
        if path.exists():
            assert embedded(path.read_bytes()) == [], program


def test_packed_test_programs_give_no_child():
    if not CLAMAV_TESTFILES.is_dir():
        pytest.skip("clamav-testfiles not installed")
    packed = sorted(CLAMAV_TESTFILES.glob("clam-*.exe")) + [CLAMAV_TESTFILES / "clam.ea06.exe"]
    assert len(packed) > 5
    for path in packed:
        assert embedded(path.read_bytes()) == [], path.name


def test_a_header_that_fails_its_crc_is_not_an_archive(corpus):
    data = bytearray((corpus / "archives/sfx-exe/libarchive__7zip_sfx_pe.exe").read_bytes())
    assert embedded(bytes(data)) == [(213504, "7z")]
    data[213504 + 20] ^= 0x01  # inside the 7z start header, covered by its CRC
    assert embedded(bytes(data)) == []
    rar = bytearray((corpus / "archives/sfx-exe/libarchive__rar_sfx.exe").read_bytes())
    rar[98816 + 10] ^= 0x01  # RAR 4 main header flags, covered by its CRC-16
    assert embedded(bytes(rar)) == []


def test_stray_signatures_in_code_are_not_archives():
    program = Path("/bin/true").read_bytes()
    noise = b"PK\x03\x04\x00\x00" + b"\x60\xea\x10\x00" + b"Rar!\x1a\x07\x00junk" + \
        b"7z\xbc\xaf\x27\x1c\x00\x04" + b"MSCF\0\0\0\0" + b"xx-lh5-" + bytes(64)
    assert embedded(program[:1000] + noise + program[1000:]) == []


# -- self-extractors made here ---------------------------------------------------------

def test_arj_elf_self_extractor_gives_eicar(tmp_path, decode):
    if shutil.which("arj") is None or shutil.which("7zz") is None:
        pytest.skip("arj or 7zz not installed")
    (tmp_path / "eicar.com").write_bytes(EICAR)
    subprocess.run(["arj", "a", "-je", "-y", "sfx", "eicar.com"], cwd=tmp_path, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60)
    data = (tmp_path / "sfx").read_bytes()  # arj adds .exe only on DOS
    assert data[:4] == b"\x7fELF"
    result = decode(data)
    assert result.root.detected == "elf"
    (archive,) = result.root.children
    assert archive.detected == "arj" and archive.name.endswith(".arj")
    assert [m.read() for m in archive.children] == [EICAR]
    assert result.root in result.scannable()


@pytest.mark.parametrize("adjust", [False, True], ids=["appended", "zip-A"])
def test_zip_appended_to_an_elf_program(tmp_path, decode, adjust):
    program = Path("/bin/true").read_bytes()
    payload = a_zip({"eicar.com": EICAR, "readme.txt": b"hello"})
    data = program + payload
    if adjust:  # zip -A rewrites the offsets to count from the start of the program
        if shutil.which("zip") is None:
            pytest.skip("zip not installed")
        path = tmp_path / "sfx"
        path.write_bytes(data)
        subprocess.run(["zip", "-q", "-A", str(path)], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        data = path.read_bytes()
        assert data[len(program):] != payload
    result = decode(data)
    (child,) = result.root.children
    assert child.name == f"p001@{len(program)}.zip" and child.detected == "zip"
    assert child.read() == data[len(program):]
    with zipfile.ZipFile(io.BytesIO(child.read())) as archive:
        assert archive.read("eicar.com") == EICAR


def test_lha_self_extractor_made_from_a_real_archive(tmp_path, decode):
    reason = archivers.available("lha")
    if reason or shutil.which("lhasa") is None:
        pytest.skip(reason or "lhasa not installed")
    lzh = archivers.build("lha", {"eicar.com": EICAR}, tmp_path)
    stub = (Path(CLAM_EXE_PATH).read_bytes() if Path(CLAM_EXE_PATH).exists()
            else b"MZ" + bytes(510))
    result = decode(stub + lzh)
    (archive,) = result.root.children
    assert archive.read() == lzh
    assert [m.read() for m in archive.children] == [EICAR]


def test_several_archives_in_one_program_each_become_a_child(decode):
    stub = b"MZ" + bytes(1022)
    first = a_zip({"a.txt": b"first"})
    second = a_zip({"eicar.com": EICAR})
    result = decode(stub + first + bytes(100) + second)
    assert [c.name for c in result.root.children] == [
        "p001@1024.zip", f"p001@{1024 + len(first) + 100}.zip"]
    assert [c.read() for c in result.root.children] == [first, second]


# -- bounds ------------------------------------------------------------------------------

def test_only_the_head_and_tail_windows_are_searched(monkeypatch):
    monkeypatch.setattr(sfx, "SCAN_WINDOW", 4096)
    payload = a_zip({"eicar.com": EICAR})
    program = b"MZ" + bytes(20000)
    assert embedded(program + payload) == [(len(program), "zip")]  # in the tail window
    assert embedded(program[:10000] + payload + program[10000:]) == []  # in neither


def test_a_spilled_program_is_searched_from_disk(tmp_path):
    program = b"MZ" + bytes(50000)
    payload = a_zip({"eicar.com": EICAR})
    ctx = Context(Limits(spill_threshold=4096), len(program + payload), str(tmp_path))
    exe = ctx.new_part(program + payload, name="setup.exe", detected="exe")
    exe.spill(ctx.workdir())
    try:
        sfx.decode_sfx(exe, ctx)
        (child,) = exe.children
        assert exe.spill_path and not exe.data
        assert child.name == f"setup.exe@{len(program)}.zip" and child.read() == payload
    finally:
        ctx.cleanup()
