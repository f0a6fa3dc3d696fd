"""Self-extracting executables and archives behind a prefix.

Real self-extractors from the corpus (7-Zip, WinRAR 3/5, LHA for DOS/Windows,
DOS .COM, Amiga and Atari, InstallShield, NSIS), ones made here (`arj a -je`
writes a Linux ELF self-extractor; a zip appended to /bin/true, with and
without `zip -A`), archives behind a non-program prefix, and what must give no
child at all: plain programs (clam.exe, /bin/true, ls), look-alike headers,
ordinary parts of real mail.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from amavisd.decode import detect
from amavisd.decode.archives import installers, sfx
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


def embedded(data: bytes, program: bool = True) -> list[tuple[int, str]]:
    return [(found.start, found.ext) for found in sfx.find_embedded(data, program=program)]


def noise(size: int, seed: int = 1) -> bytes:
    """Random bytes: a prefix no format claims."""
    return random.Random(seed).randbytes(size)


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
# No MZ or ELF header: programs of other systems, or no program at all.
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


# sample -> (what the part is sniffed as, the child the engine then cuts out of it)
CORPUS_ROUTED = {
    "sfx-exe/lhasa__larc333__sfx.com": ("com", "p001@594.lzh"),
    "sfx-exe/lhasa__lharc113__sfx.com": ("com", "p001@1263.lzh"),
    "sfx-exe/lhasa__lha_amiga_122__sfx.run": ("amiga", "p001@5596.lzh"),
    "sfx-exe/lhasa__lharc_atari_313a__sfx.tos": ("tos", "p001@60.lzh"),
    "sfx-exe/libarchive__zip_sfx.bin": ("data", "p001@1024.zip"),
    "sfx-exe/rarfile__rar5-crc.sfx": ("data", "p001@128000.rar"),
    "zip/libarchive__test_read_format_zip_padded1.zip": ("data", "p001@89.zip"),
}


@pytest.mark.parametrize("sample, expected", sorted(CORPUS_ROUTED.items()))
def test_corpus_programs_and_prefixed_archives_are_opened(corpus, decode, sample, expected):
    data = (corpus / "archives" / sample).read_bytes()
    result = decode(data)
    kind, name = expected
    assert result.root.detected == kind
    (child,) = result.root.children
    assert child.name == name and child.children, "the archive was cut out but not opened"
    assert child.read() == data[int(name[5:].split(".")[0]):][:child.size]
    assert result.root in result.scannable() and not result.root.expanded


def test_lha_self_extractor_is_decoded_down_to_its_member(corpus, decode):
    if shutil.which("lhasa") is None:
        pytest.skip("lhasa not installed")
    result = decode((corpus / "archives/sfx-exe/lhasa__lha213__sfx.exe").read_bytes())
    (archive,) = result.root.children
    (member,) = archive.children
    assert member.name == "gpl-2" and member.size == 18092
    assert member.read().lstrip().startswith(b"GNU GENERAL PUBLIC LICENSE")


# -- installers ------------------------------------------------------------------------

def find_clam_exe(result) -> list[str]:
    clam = Path(CLAM_EXE_PATH).read_bytes()
    return [part.path for part in result.root.walk()
            if part is not result.root and part.size == len(clam) and part.read() == clam]


def test_nsis_installer_gives_its_files(corpus, decode):
    if shutil.which("7zz") is None or not Path(CLAM_EXE_PATH).exists():
        pytest.skip("7zz or clamav-testfiles not installed")
    data = (corpus / "archives/sfx-exe/clamav__clam-nsis.exe").read_bytes()
    result = decode(data)
    (block,) = result.root.children
    assert block.name == "p001@46080.nsis" and block.detected == "nsis"
    assert block.read() == data[46080:]  # the first header's length runs to the end
    assert [m.name for m in block.children] == ["clam.exe"]
    assert find_clam_exe(result) == [block.children[0].path]
    assert block in result.scannable() and "decode-error" not in block.flags


def test_installshield_msi_installer_gives_its_files(corpus, decode):
    data = (corpus / "archives/sfx-exe/clamav__clam_ISmsi_int.exe").read_bytes()
    result = decode(data)
    (table,) = result.root.children
    assert table.name == "p001@915561.ishield" and table.detected == "ishield"
    assert table.expanded and table.size == len(data) - 915561
    assert [m.name for m in table.children] == ["0x0409.ini", "EvalMarker.dat", "clam.msi",
                                                "Setup.ini"]
    assert table.children[0].read().startswith("\ufeff[0x0409]".encode("utf-16-le"))
    assert table.children[2].detected == "ole2"  # an .msi: OLE2 with a cabinet stream
    if shutil.which("cabextract") is None or not Path(CLAM_EXE_PATH).exists():
        pytest.skip("cabextract or clamav-testfiles not installed")
    (found,) = find_clam_exe(result)
    assert found.startswith(table.children[2].path + "/")


def test_installshield_look_alikes_are_not_tables(corpus):
    data = (corpus / "archives/sfx-exe/clamav__clam_ISmsi_int.exe").read_bytes()
    assert len(re.findall(b"InstallShield\0", data)) == 2  # one a string in the program
    assert embedded(data) == [(915561, "ishield")]
    at = 915561 + len(installers.ISHIELD_MAGIC)
    for change in (
        lambda d: d.__setitem__(slice(at + 12, at + 13), b"\x01"),  # a reserved word
        lambda d: d.__setitem__(slice(at, at + 4), struct.pack("<I", 5)),  # one file too many
        lambda d: d.__setitem__(slice(at + 0x20 + 3, at + 0x20 + 4), b"\x07"),  # a control char
        lambda d: d.__delitem__(slice(len(d) - 1, None)),  # the last file cut short
    ):
        changed = bytearray(data)
        change(changed)
        assert embedded(bytes(changed)) == []


def test_nsis_look_alikes_are_not_installers(corpus):
    data = (corpus / "archives/sfx-exe/clamav__clam-nsis.exe").read_bytes()
    assert embedded(data) == [(46080, "nsis")]
    assert embedded(data[:46080] + b"\0" + data[46080:]) == []  # not at a multiple of 512
    assert embedded(data[:-1]) == []  # its data runs past the end
    flags = bytearray(data)
    flags[46080] = 0x10  # a flag NSIS does not have
    assert embedded(bytes(flags)) == []
    assert embedded(data, program=False) == []  # only a program runs an installer


def a_table(files: dict[bytes, bytes]) -> bytes:
    """An InstallShield file table as setup.exe carries it (ClamAV's ishield.c layout):
    each file deflated, XORed with a key made from its name, nibbles swapped."""
    out = installers.ISHIELD_MAGIC + struct.pack("<I", len(files)) + bytes(0x1C)
    for name, content in files.items():
        key = bytes(c ^ installers.ISHIELD_KEY[n & 3] for n, c in enumerate(name))
        packed = bytearray()
        for n, byte in enumerate(zlib.compress(content)):
            byte ^= key[(n & 0x3FF) % len(key)]
            packed.append((byte >> 4 | byte << 4) & 0xFF)
        out += name.ljust(installers.ISHIELD_NAME, b"\0") + struct.pack("<IIQ", 6, 0, len(packed))
        out += bytes(36) + packed
    return out


def test_installshield_table_made_here(decode):
    stub = b"MZ" + bytes(4094)
    big = noise(3000) * 1000  # past one de-obfuscation chunk and one key period
    result = decode(stub + a_table({b"eicar.com": EICAR, b"setup.dat": big, b"empty": b""}))
    (table,) = result.root.children
    assert table.name == "p001@4096.ishield" and table.expanded
    assert [(m.name, m.read()) for m in table.children] == [
        ("eicar.com", EICAR), ("setup.dat", big), ("empty", b"")]


def test_installshield_member_that_does_not_inflate(decode):
    good = a_table({b"a.txt": b"first", b"eicar.com": EICAR})
    start = good.index(b"eicar.com") + installers.ISHIELD_ENTRY
    broken = bytearray(good)
    broken[start] ^= 0xFF  # the zlib header of the second member
    result = decode(b"MZ" + bytes(4094) + bytes(broken))
    (table,) = result.root.children
    # scanned as it is, and the message UNCHECKED: the member's content is not produced
    assert "undecipherable" in table.flags and not table.expanded
    assert [reason.kind for reason in result.unchecked] == ["undecipherable"]
    assert table in result.scannable()
    assert [m.name for m in table.children] == ["a.txt", "eicar.com"]
    assert "truncated" in table.children[1].flags


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
    packed.remove(CLAMAV_TESTFILES / "clam-nsis.exe")  # an installer: it has a child
    assert len(packed) > 5
    for path in packed:
        assert embedded(path.read_bytes()) == [], path.name
        assert embedded(path.read_bytes(), program=False) == [], path.name


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


# -- programs with no MZ or ELF header: DOS .COM, AmigaOS, Atari TOS --------------------

def a_com(body: bytes = b"\xb4\x09\xba\x10\x01\xcd\x21\xb8\x00\x4c\xcd\x21") -> bytes:
    """jmp short over a message, then print it and exit through DOS (int 21h)."""
    message = b"Self-extractor$"
    return b"\xeb" + bytes([len(message)]) + message + body


def an_amiga_program(code: bytes = bytes(64), table: int = 1, last: int = 0) -> bytes:
    """HUNK_HEADER: no libraries, hunks 0..last of `table`, their sizes; one code hunk."""
    words = len(code) // 4
    return struct.pack(">IIIII", 0x3F3, 0, table, 0, last) + struct.pack(">I", words) * (
        last + 1) + struct.pack(">II", 0x3E9, words) + code + struct.pack(">I", 0x3F2)


def an_atari_program(text: bytes = bytes(64), data: bytes = bytes(16)) -> bytes:
    return b"\x60\x1a" + struct.pack(">IIIIIIH", len(text), len(data), 256, 0, 0, 7, 0) \
        + text + data + bytes(4)  # no fixups


@pytest.mark.parametrize("kind, program", [("com", a_com()), ("amiga", an_amiga_program()),
                                           ("tos", an_atari_program())])
def test_program_made_here_with_a_zip_appended(decode, kind, program):
    assert detect.sniff(program) == kind
    result = decode(program + a_zip({"eicar.com": EICAR}))
    assert result.root.detected == kind
    (archive,) = result.root.children
    assert archive.name == f"p001@{len(program)}.zip"
    assert [m.read() for m in archive.children] == [EICAR]


def test_com_look_alikes_are_not_programs():
    assert detect.sniff(a_com()) == "com"
    no_dos_call = a_com(b"\xb4\x09\xba\x10\x01\xcd\x20")  # int 20h, but no int 21h
    assert detect.sniff(no_dos_call) == "data"
    assert detect.sniff(no_dos_call + bytes(5000) + b"\xcd\x21") == "data"  # past 4 KiB
    assert detect.sniff(b"\xeb\xfe" + a_com()[2:]) == "data"  # jumps back into the PSP
    assert detect.sniff(b"\xe9\x00\x40" + a_com()[3:]) == "data"  # lands past the end
    text = "ëÍ! a Latin-1 text that starts with 0xEB and holds 0xCD 0x21\n" * 3
    assert detect.sniff(text.encode("latin-1")) == "text"
    assert detect.sniff(a_com() + bytes(detect.COM_MAX)) == "data"  # more than DOS loads


def test_amiga_look_alikes_are_not_programs():
    good = an_amiga_program()
    assert detect.sniff(good) == "amiga"
    for offset, value in ((4, 1),  # a resident library list
                          (12, 1),  # first hunk after the last
                          (8, 0),  # an empty hunk table
                          (24, 0x3F2)):  # HUNK_END where the first hunk should start
        changed = bytearray(good)
        changed[offset:offset + 4] = struct.pack(">I", value)
        assert detect.sniff(bytes(changed)) != "amiga", offset
    assert detect.sniff(an_amiga_program(table=2, last=1)) == "amiga"
    assert detect.sniff(an_amiga_program(table=1, last=1)) != "amiga"  # past its table
    assert detect.sniff(good[:24] + b"\x03\xe9") != "amiga"  # a hunk type cut short


def test_atari_look_alikes_are_not_programs():
    good = an_atari_program()
    assert detect.sniff(good) == "tos"
    for offset, value in ((2, 0),  # no text
                          (2, 1 << 24),  # 16 MiB of text
                          (14, 1 << 24),  # a 16 MiB symbol table
                          (6, 10_000)):  # more data than the whole file
        changed = bytearray(good)
        changed[offset:offset + 4] = struct.pack(">I", value)
        assert detect.sniff(bytes(changed)) != "tos", offset


def test_stray_signatures_in_a_program_of_another_system_are_not_archives(decode):
    text = b"xx-lh5-" + bytes(20) + b"Rar!\x1a\x07\x00" + bytes(8) + b"PK\x03\x04" + bytes(20)
    result = decode(an_atari_program(text=text))
    assert result.root.detected == "tos" and result.root.children == []


# -- archives behind a prefix in other parts ----------------------------------------------

@pytest.mark.parametrize("prefix", [noise(5000), b"%PDF-1.4\n" + noise(3000)],
                         ids=["unknown", "pdf"])
def test_zip_behind_a_prefix_is_found_from_its_end(decode, prefix):
    payload = a_zip({"eicar.com": EICAR, "readme.txt": b"hello"})
    result = decode(prefix + payload)
    assert result.root.detected in sfx.PREFIXED
    (child,) = result.root.children
    assert child.name == f"p001@{len(prefix)}.zip" and child.read() == payload
    assert [m.read() for m in child.children] == [EICAR, b"hello"]
    assert not result.root.expanded and result.root in result.scannable()


def test_zip_whose_end_is_not_near_the_end_is_not_searched_in_other_parts():
    payload = a_zip({"eicar.com": EICAR})
    assert embedded(noise(5000) + payload, program=False) == [(5000, "zip")]
    tail = noise(sfx.ZIP_TAIL, seed=2)  # the end record is now out of the tail searched
    assert embedded(noise(5000) + payload + tail, program=False) == []
    assert embedded(b"MZ" + bytes(4998) + payload + tail) == [(5000, "zip")]  # a program: yes


def test_zip_from_a_lone_local_header_is_only_taken_from_a_program():
    whole = a_zip({"eicar.com": EICAR})
    cut = whole[:whole.index(sfx.ZIP_CENTRAL)]  # the directory and end record are gone
    assert embedded(noise(5000) + cut, program=False) == []
    assert embedded(b"MZ" + bytes(4998) + cut) == [(5000, "zip")]


def test_central_directory_must_lead_to_the_end_record():
    payload = bytearray(a_zip({"a.txt": b"a", "b.txt": b"b"}))
    assert embedded(noise(1000) + bytes(payload), program=False) == [(1000, "zip")]
    end = payload.rindex(b"PK\x05\x06")
    changed = bytearray(payload)
    changed[end + 10] += 1  # one entry more than the directory holds
    assert embedded(noise(1000) + bytes(changed), program=False) == []
    for record in (payload.index(sfx.ZIP_CENTRAL), payload.rindex(sfx.ZIP_CENTRAL)):
        changed = bytearray(payload)
        changed[record + 32] += 1  # a comment length: the walk runs past the next record
        assert embedded(noise(1000) + bytes(changed), program=False) == [], record


def test_signature_formats_behind_a_prefix(tmp_path, decode, monkeypatch):
    reason = archivers.available("7z")
    if reason:
        pytest.skip(reason)
    payload = archivers.build("7z", {"eicar.com": EICAR}, tmp_path)
    prefix = noise(200_000)
    result = decode(prefix + payload)
    assert result.root.detected == "data"
    (child,) = result.root.children
    assert child.name == f"p001@{len(prefix)}.7z" and child.read() == payload
    assert [m.read() for m in child.children] == [EICAR]
    monkeypatch.setattr(sfx, "PREFIX_WINDOW", len(prefix))  # the signature is past it now
    assert embedded(prefix + payload, program=False) == []


def test_ordinary_parts_of_real_mail_give_no_child(corpus):
    """Every real mail decomposed: a child cut out of a non-program part is only
    ever the theme package Office 2007+ keeps as a zip in a .doc/.xls/.ppt stream."""
    office_streams = {"1Table", "Workbook", "PowerPoint Document"}
    searched, cut = 0, []
    for path in sorted(p for p in (corpus / "mail" / "real").rglob("*") if p.is_file()):
        result = decompose(path.read_bytes())
        try:
            for part in result.root.walk():
                searched += part.detected in sfx.PREFIXED
                if part.parent is not None and part.parent.detected in sfx.PREFIXED:
                    cut.append((part.parent.name, part.detected, sorted(part.flags)))
        finally:
            result.cleanup()
    assert searched > 400
    assert cut and all(name in office_streams and kind == "zip" and flags == ["expanded"]
                       for name, kind, flags in cut), cut


def test_known_files_behind_no_prefix_give_no_child():
    for path in [CLAM_EXE_PATH, "/bin/true", *sorted(CLAMAV_TESTFILES.glob("clam.*"))]:
        path = Path(path)
        if path.exists() and path.stat().st_size:
            found = embedded(path.read_bytes(), program=False)
            assert found == [], path


def test_at_the_depth_limit_only_a_real_find_is_unchecked(decode):
    limits = Limits(max_depth=0)
    plain = decode(noise(50_000), limits)
    assert plain.root.detected == "data" and plain.unchecked == []
    hidden = decode(noise(50_000) + a_zip({"eicar.com": EICAR}), limits)
    assert "too-deep" in hidden.root.flags and hidden.unchecked


def test_a_spilled_part_is_searched_from_disk_behind_a_prefix(tmp_path):
    prefix, payload = noise(50_000), a_zip({"eicar.com": EICAR})
    ctx = Context(Limits(spill_threshold=4096), len(prefix + payload), str(tmp_path))
    image = ctx.new_part(prefix + payload, name="photo.jpg", detected="data")
    image.spill(ctx.workdir())
    try:
        assert sfx.has_prefixed_archive(image)
        sfx.decode_prefixed(image, ctx)
        (child,) = image.children
        assert child.name == f"photo.jpg@{len(prefix)}.zip" and child.read() == payload
    finally:
        ctx.cleanup()


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


def test_table_walks_share_one_allowance_per_search(monkeypatch):
    data = noise(1000) + a_zip({f"f{n}.txt": b"" for n in range(300)})
    assert embedded(data, program=False) == [(1000, "zip")]
    monkeypatch.setattr(sfx, "MAX_RECORDS", 299)  # one record short of the directory
    assert embedded(data, program=False) == []
    monkeypatch.setattr(sfx, "MAX_RECORDS", 300)
    assert embedded(data, program=False) == [(1000, "zip")]


def test_end_records_pointing_at_one_big_directory_cost_little():
    """400 end records, each claiming the 60,000-entry directory before them:
    walked in full that is 24 million records (about 9 s here); the shared
    allowance stops it after MAX_RECORDS."""
    entries = 60_000
    record = sfx.ZIP_CENTRAL + bytes(42)  # name, extra and comment all empty
    directory = record * entries
    ends = b"".join(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, entries, entries,
                                                   len(directory) + 22 * n, 0, 0)
                    for n in range(400))
    data = b"MZ" + bytes(1022) + directory + ends
    started = time.monotonic()
    assert embedded(data) == [] and embedded(data, program=False) == []
    assert time.monotonic() - started < 3


def test_lha_level_2_crc_work_is_bounded(corpus, monkeypatch):
    data = (corpus / "archives/sfx-exe/lhasa__lhmelt_16536__sfx_winsfx32_213.exe").read_bytes()
    assert data[31744 + 20] == 2  # a level-2 header: checked by its CRC-16
    assert embedded(data) == [(31744, "lzh")]
    monkeypatch.setattr(sfx, "MAX_CRC16_BYTES", 10)
    assert embedded(data) == []
