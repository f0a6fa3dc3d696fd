"""The OLE2 decoder on real Office files: streams, VBA source, embedded files, encryption."""

from __future__ import annotations

import email
import os
from pathlib import Path

import pytest

from amavisd.decode.archives.office import decode_ole2, vba_decompress
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError
from amavisd.testing.eicar import CLAM_EXE_PATH

OFFICE = "archives/ole2-office"
MACRO_MAIL = "mail/real/spamassassin-tdata/spam__olevbmacro__malicemacro.eml"


def decode(data: bytes) -> tuple[Part, Context]:
    """Run the OLE2 decoder alone, as the engine would (DecodeError flags)."""
    ctx = Context(Limits(), len(data))
    part = ctx.new_part(data, detected="ole2")
    try:
        decode_ole2(part, ctx)
    except DecodeError:
        part.flags.add("decode-error")
    return part, ctx


def clam_exe() -> bytes:
    if not os.path.exists(CLAM_EXE_PATH):
        pytest.skip(f"{CLAM_EXE_PATH} missing (Debian package clamav-testfiles)")
    return Path(CLAM_EXE_PATH).read_bytes()


def attachment(corpus: Path, mail: str, filename: str) -> bytes:
    path = corpus / mail
    if not path.exists():
        pytest.skip(f"{mail} not in the corpus")
    message = email.message_from_bytes(path.read_bytes())
    for part in message.walk():
        if part.get_filename() == filename:
            return part.get_payload(decode=True)
    raise AssertionError(f"{filename} not attached to {mail}")


def test_every_corpus_office_file_opens(corpus: Path):
    files = sorted((corpus / OFFICE).iterdir())
    assert len(files) >= 8
    for path in files:
        result = decompose(path.read_bytes(), bare_file=True)
        assert result.root.detected in ("ole2", "zip"), path.name
        assert result.root.children, path.name
        assert not result.root.flags & {"decode-error"}, path.name
        assert not result.unchecked, path.name


def test_streams_are_named_by_storage_path(corpus: Path):
    part, _ = decode((corpus / OFFICE / "msoffcrypto__plain.doc").read_bytes())
    names = {child.name for child in part.children}
    assert {"WordDocument", "1Table", "?CompObj", "?SummaryInformation"} <= names
    assert not part.expanded  # the document is scanned as itself too


@pytest.mark.parametrize("name", ["clamav__clam.ole.doc", "clamav__clam.ppt"])
def test_embedded_clam_exe_is_unwrapped(corpus: Path, name: str):
    result = decompose((corpus / OFFICE / name).read_bytes(), bare_file=True)
    found = [p for p in result.root.walk() if p.read() == clam_exe()]
    assert found and found[0].name == "clam.exe"
    assert found[0].parent.name.endswith("?Ole10Native")


@pytest.mark.parametrize("pattern", ["*password*.doc", "*password*.xls", "*password*.docx",
                                     "*password*.xlsx"])
def test_password_documents_are_unchecked(corpus: Path, pattern: str):
    files = sorted((corpus / "archives" / "encrypted").glob(pattern))
    assert files
    for path in files:
        result = decompose(path.read_bytes(), bare_file=True)
        assert "encrypted" in result.root.flags, path.name
        assert any("encrypted Office document" in r for r in result.unchecked), path.name


def test_encrypted_ooxml_attachment_is_unchecked(corpus: Path):
    data = attachment(corpus, "mail/real/spamassassin-tdata/spam__olevbmacro__encrypted.eml",
                      "encrypted_word_doc.docx")
    part, ctx = decode(data)
    assert "EncryptedPackage" in {child.name for child in part.children}
    assert ctx.unchecked == [f"encrypted Office document (EncryptedPackage) ({part.path})"]


def test_vba_macro_source_from_a_real_xlsm(corpus: Path):
    data = attachment(corpus, MACRO_MAIL, "automacro.xlsm")
    result = decompose(data, bare_file=True)
    assert "macros" in result.root.flags  # the OOXML zip, from its vbaProject.bin
    project = next(p for p in result.root.children if p.name == "xl/vbaProject.bin")
    assert project.detected == "ole2" and "macros" in project.flags
    sources = {p.name: p.read() for p in project.children if p.name.endswith(".vba")}
    assert set(sources) == {"Modulo1.vba", "ThisWorkbook.vba", "Foglio1.vba", "Foglio2.vba",
                            "Foglio3.vba"}
    assert b"Sub autoexec()" in sources["Modulo1.vba"]
    assert sources["Foglio1.vba"].startswith(b'Attribute VB_Name = "Foglio1"\r\n')
    assert not result.unchecked


def test_document_without_macros_is_not_flagged(corpus: Path):
    part, _ = decode((corpus / OFFICE / "msoffcrypto__plain.xls").read_bytes())
    assert "macros" not in part.flags and "encrypted" not in part.flags


def test_truncated_and_garbage_ole2_do_not_raise(corpus: Path):
    data = (corpus / OFFICE / "clamav__clam.ole.doc").read_bytes()
    for cut in (data[:600], data[:len(data) // 2], data[:-1000]):
        part, _ = decode(cut)
        assert "decode-error" in part.flags
    part, _ = decode(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100))  # < 1536: never a path
    assert "decode-error" in part.flags and not part.children


def test_vba_decompress_spec_example():
    """The "normal compression" example of [MS-OVBA] section 3.2."""
    compressed = bytes.fromhex(
        "01 2F B0 00 23 61 61 61 62 63 64 65 82 66 00 70 61 67 68 69 6A 01 38 08 61 6B 6C 00"
        " 30 6D 6E 6F 70 06 71 02 70 04 10 72 73 74 75 76 10 77 78 79 7A 00 3C")
    assert b"".join(vba_decompress(compressed)) == \
        b"#aaabcdefaaaaghijaaaaaklaaamnopqaaaaaaaaaaaarstuvwxyzaaa"


def test_vba_decompress_copy_token_and_raw_chunk():
    # "abc", then a copy token: 4 offset bits at 3 bytes out, offset 3, length 9
    assert b"".join(vba_decompress(bytes.fromhex("01 05 B0 08 61 62 63 06 20"))) == b"abc" * 4
    raw = bytes(range(256)) * 16  # a chunk stored as is: flag bit clear, size 4096
    assert b"".join(vba_decompress(b"\x01\xff\x3f" + raw)) == raw


@pytest.mark.parametrize("bad", [b"", b"\x02\x05\xb0", b"\x01\x05\x00abc",
                                 b"\x01\x03\xb0\x01\x00\x00"])
def test_vba_decompress_refuses_bad_containers(bad: bytes):
    with pytest.raises(DecodeError):
        b"".join(vba_decompress(bad))
