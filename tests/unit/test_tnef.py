# SPDX-License-Identifier: MIT
"""TNEF parser: real samples (checked against Debian's tnef tool), hand-built
streams from the documented layout, and hostile input."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amavisd.decode.tnef import (
    MAX_ATTRIBUTES,
    MAX_PROPERTIES,
    TnefContent,
    TnefError,
    decompress_rtf,
    parse_tnef,
)
from amavisd.testing.eicar import CLAM_EXE_PATH, EICAR

CORPUS = Path(os.environ.get("AMAVISD_CORPUS", "/work/shared/corpus"))
TNEF_DIR = CORPUS / "archives" / "tnef"
SAMPLES = sorted(p.name for p in TNEF_DIR.glob("*.tnef")) if TNEF_DIR.is_dir() else []
BIG = 1 << 30
OLE2 = bytes.fromhex("d0cf11e0a1b11ae1")
SIG = struct.pack("<I", 0x223E9F78)

# What each sample holds: (name, size) per attachment, as Debian's tnef 1.4.18
# extracts it (tnef names a nameless attachment "tnef-tmp" and writes objects
# with their 16-byte IID; IPM-DistList also keeps the placeholder attAttachData).
KNOWN: dict[str, list[tuple[str, int]]] = {
    "clamav__clam.tnef": [("clam.exe", 544)],
    "tnef__MAPI_ATTACH_DATA_OBJ.tnef": [
        ("VIA_Nytt_1402.doc", 61952), ("VIA_Nytt_1402.pdf", 213685), ("VIA_Nytt_14021.htm", 68919)],
    "tnef__MAPI_OBJECT.tnef": [("Untitled_Attachment", 628224)],
    "tnef__body.tnef": [],
    "tnef__data-before-name.tnef": [("AUTOEXEC.BAT", 0), ("CONFIG.SYS", 0), ("boot.ini", 289)],
    "tnef__long-filename.tnef": [("allproductsmar2000.dat", 279)],
    "tnef__missing-filenames.tnef": [
        ("generpts.src", 61210), ("TechlibDEC99.doc", 33792), ("TechlibDEC99-JAN00.doc", 34304),
        ("TechlibNOV99.doc", 33792)],
    "tnef__multi-name-property.tnef": [],
    "tnef__multi-value-attribute.tnef": [("208225__5_seconds__Voice_Mail.mp3", 10656)],
    "tnef__one-file.tnef": [("AUTHORS", 244)],
    "tnef__rtf.tnef": [],
    "tnef__triples.tnef": [],
    "tnef__two-files.tnef": [("AUTHORS", 244), ("README", 893)],
    "tnef__unicode-mapi-attr-name.tnef": [
        ("spaconsole2.cfg", 8387), ("image001.png", 3815), ("image002.png", 3573),
        ("image003.png", 3792)],
    "tnef__unicode-mapi-attr.tnef": [("example.dat", 1024)],
    "tnefparse__IPM-DistList.tnef": [("Untitled Attachment", 19965), ("Untitled Attachment", 89)],
    "tnefparse__minimal_attachment.tnef": [("", 16)],
    "tnefparse__umlaut.tnef": [
        ("TBZ PARIV GmbH.jpg", 44764), ("image003.jpg", 1001), ("UmlautAnhang-äüö.txt", 14)],
}

needs_corpus = pytest.mark.skipif(not SAMPLES, reason=f"TNEF corpus not found under {CORPUS}")
needs_tnef_tool = pytest.mark.skipif(shutil.which("tnef") is None, reason="Debian tnef not installed")


def read(name: str) -> bytes:
    return (TNEF_DIR / name).read_bytes()


def returned_bytes(content: TnefContent) -> int:
    return (sum(len(a.data) for a in content.attachments) + len(content.body_text)
            + len(content.body_html) + len(content.body_rtf))


# --- building streams from the documented byte layout --------------------------

def attr(level: int, attr_id: int, data: bytes, checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = sum(data) & 0xFFFF
    return struct.pack("<BII", level, attr_id, len(data)) + data + struct.pack("<H", checksum)


def tnef(*attrs: bytes, key: int = 0x0101) -> bytes:
    version = attr(1, 0x00089006, struct.pack("<I", 0x00010000))
    return SIG + struct.pack("<H", key) + version + b"".join(attrs)


def pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def prop_fixed(ptype: int, pid: int, raw: bytes, named: bytes = b"") -> bytes:
    return struct.pack("<HH", ptype, pid) + named + pad4(raw)


def prop_var(ptype: int, pid: int, *values: bytes, named: bytes = b"") -> bytes:
    out = struct.pack("<HH", ptype, pid) + named + struct.pack("<I", len(values))
    return out + b"".join(struct.pack("<I", len(v)) + pad4(v) for v in values)


def props(*items: bytes, count: int | None = None) -> bytes:
    return struct.pack("<I", len(items) if count is None else count) + b"".join(items)


def utf16z(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


REND = attr(2, 0x00069002, struct.pack("<HIHHH", 1, 0xFFFFFFFF, 0, 0, 1) + b"\0\0")
PS_PUBLIC = bytes.fromhex("2908020000000000c000000000000046")
IID_IMESSAGE = bytes.fromhex("0703020000000000c000000000000046")
# [MS-OXRTFCP] 3.1.1: "{\rtf1\ansi\ansicpg1252\pard hello world}\r\n" compressed.
RTF_VECTOR = bytes.fromhex(
    "2d0000002b0000004c5a4675f1c5c7a703000a0072637067313235423"
    "20af32068656c090020627705b06c647d0a800fa0")


def eicar_stream() -> bytes:
    return tnef(REND, attr(2, 0x00018010, b"eicar.com\0"), attr(2, 0x0006800F, EICAR))


# --- real samples --------------------------------------------------------------

@needs_corpus
@pytest.mark.parametrize("name", SAMPLES)
def test_corpus_sample_parses_to_known_contents(name):
    content = parse_tnef(read(name), BIG)
    assert not content.truncated
    assert [(a.name, len(a.data)) for a in content.attachments] == KNOWN[name]


@needs_corpus
@pytest.mark.parametrize("name", SAMPLES)
def test_output_limit_is_exact(name):
    data = read(name)
    total = returned_bytes(parse_tnef(data, BIG))
    assert returned_bytes(parse_tnef(data, total)) == total
    if total:
        with pytest.raises(TnefError, match="output limit"):
            parse_tnef(data, total - 1)


def tnef_tool_extract(data: bytes, workdir: Path) -> tuple[dict[bytes, bytes], dict[str, bytes]]:
    """Run Debian's tnef (checksums ignored); return its files and its bodies."""
    src, out = workdir / "in.tnef", workdir / "out"
    src.write_bytes(data)
    out.mkdir()
    proc = subprocess.run(
        ["tnef", "-K", "--overwrite", "--save-body=ZZBODY", "--body-pref=ALL",
         "-C", str(out), str(src)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    files, bodies = {}, {}
    for raw in os.listdir(os.fsencode(out)):
        blob = (out / os.fsdecode(raw)).read_bytes()
        if raw.startswith(b"ZZBODY."):
            bodies[raw.decode().split(".", 1)[1]] = blob
        else:
            files[raw] = blob
    return files, bodies


def tool_names(name: str) -> tuple[bytes, ...]:
    """The file names tnef would write for our name (8-bit as sent; a default)."""
    return (name.encode("cp1252", "replace"), name.encode()) if name else (b"tnef-tmp",)


def assert_matches_tnef_tool(content: TnefContent, files: dict[bytes, bytes],
                             bodies: dict[str, bytes]) -> None:
    assert bodies.get("rtf", b"") == content.body_rtf
    assert bodies.get("html", b"") == content.body_html
    assert bodies.get("txt", b"") == content.body_text
    matched = set()
    for raw_name, blob in files.items():
        hits = [i for i, a in enumerate(content.attachments) if i not in matched and (
            a.data == blob  # tnef keeps an object's IID; we strip it
            or (blob[8:16] == IID_IMESSAGE[8:] and a.data == blob[16:]))]
        assert hits, f"tnef extracted {raw_name!r} ({len(blob)} bytes); we have no such data"
        named = [i for i in hits if raw_name in tool_names(content.attachments[i].name)]
        assert named, f"{raw_name!r}: same data, other name"
        matched.add(named[0])
    for i, att in enumerate(content.attachments):  # extras only beside a matched twin
        assert i in matched or any(content.attachments[j].name == att.name for j in matched)


@needs_corpus
@needs_tnef_tool
@pytest.mark.parametrize("name", SAMPLES)
def test_matches_debian_tnef_byte_for_byte(name, tmp_path):
    data = read(name)
    assert_matches_tnef_tool(parse_tnef(data, BIG), *tnef_tool_extract(data, tmp_path))


def winmail_parts() -> list[tuple[str, bytes]]:
    found = []
    base = CORPUS / "mail" / "real" / "spamassassin-publiccorpus"
    for folder, number in (("easy_ham", "00067"), ("easy_ham_2", "01177"), ("easy_ham_2", "01388")):
        for path in sorted((base / folder).glob(f"{number}.*")):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
            for part in msg.walk():
                if part.get_content_type() == "application/ms-tnef":
                    found.append((f"{folder}/{number}", part.get_payload(decode=True)))
    return found


@needs_corpus
def test_winmail_dat_in_real_mail(tmp_path):
    parts = winmail_parts()
    assert [label for label, _ in parts] == ["easy_ham/00067", "easy_ham_2/01177", "easy_ham_2/01388"]
    for label, data in parts:
        content = parse_tnef(data, BIG)
        # Outlook rich-text mails: no attachments, only a compressed RTF body.
        assert not content.truncated and content.attachments == [], label
        assert not content.rtf_compressed and content.body_rtf.startswith(b"{\\rtf1"), label
        if shutil.which("tnef"):
            work = tmp_path / label.replace("/", "_")
            work.mkdir()
            assert_matches_tnef_tool(content, *tnef_tool_extract(data, work))


@needs_corpus
def test_clamav_sample_carries_clam_exe():
    content = parse_tnef(read("clamav__clam.tnef"), BIG)
    assert content.checksum_errors == 3  # the sample's attMessageClass, attSubject, attMsgProps
    (att,) = content.attachments
    assert att.name == "clam.exe" and att.data.startswith(b"MZ")
    for reference in (Path(CLAM_EXE_PATH), CORPUS / "testvirus" / "clamav__clam.exe"):
        if reference.is_file():
            assert att.data == reference.read_bytes()
    assert content.body_rtf.startswith(b"{\\rtf1") and content.body_html.startswith(b"<!DOCTYPE")


@needs_corpus
def test_embedded_message_and_ole_object():
    (att, placeholder) = parse_tnef(read("tnefparse__IPM-DistList.tnef"), BIG).attachments
    assert att.embedded_message and att.data.startswith(SIG)
    assert placeholder.data.startswith(b"This attachment is a MAPI 1.0 embedded message")
    inner = parse_tnef(att.data, BIG)  # the caller recurses, with its own limits
    assert not inner.truncated
    (ole,) = parse_tnef(read("tnef__MAPI_OBJECT.tnef"), BIG).attachments
    assert not ole.embedded_message and ole.data.startswith(OLE2)  # IStorage, not IMessage


@needs_corpus
def test_parse_speed_on_largest_sample():
    largest = max(SAMPLES, key=lambda n: (TNEF_DIR / n).stat().st_size)
    data = read(largest)
    start = time.perf_counter()
    for _ in range(5):
        parse_tnef(data, BIG)
    per_parse = (time.perf_counter() - start) / 5
    assert per_parse < 0.5, f"{largest}: {per_parse * 1000:.1f} ms"


# --- hand-built streams ----------------------------------------------------------

def test_minimal_eicar_stream():
    content = parse_tnef(eicar_stream(), 1000)
    assert [(a.name, a.data) for a in content.attachments] == [("eicar.com", EICAR)]
    assert not content.truncated and content.checksum_errors == 0


def test_mapi_properties_every_common_type():
    named_string = PS_PUBLIC + struct.pack("<II", 1, 10) + pad4(utf16z("Keys"))
    named_id = PS_PUBLIC + struct.pack("<II", 0, 0x8501)
    attachment_props = props(
        prop_fixed(0x0003, 0x0E20, struct.pack("<I", 68)),  # PR_ATTACH_SIZE
        prop_fixed(0x000B, 0x7FFE, b"\1\0"),  # boolean, padded
        prop_fixed(0x0002, 0x3710, b"\5\0"),  # short, padded
        prop_fixed(0x0040, 0x3007, b"\1" * 8),  # systime
        prop_fixed(0x0048, 0x3712, b"\2" * 16),  # CLSID
        prop_fixed(0x0003, 0x3705, struct.pack("<I", 1)),  # PR_ATTACH_METHOD: by value
        prop_fixed(0x1003, 0x3720, struct.pack("<III", 2, 7, 8)),  # PT_MV_LONG
        prop_var(0x101F, 0x3721, utf16z("a"), utf16z("bc")),  # PT_MV_UNICODE
        prop_var(0x001F, 0x8000, utf16z("named"), named=named_string),
        prop_fixed(0x0003, 0x8001, struct.pack("<I", 1), named=named_id),
        prop_var(0x001F, 0x3707, utf16z("long\tname é.com")),  # control char removed
        prop_var(0x001E, 0x3704, b"LONGNA~1.COM\0"),
        prop_var(0x001E, 0x370E, b"application/x-msdownload\0"),
        prop_var(0x0102, 0x3701, EICAR),  # PR_ATTACH_DATA_BIN
    )
    message_props = props(
        prop_var(0x001F, 0x1000, utf16z("plain body")),
        prop_var(0x0102, 0x1013, b"<html>x</html>"),
        prop_var(0x0102, 0x1009, RTF_VECTOR),
    )
    content = parse_tnef(tnef(attr(1, 0x00069003, message_props), REND,
                              attr(2, 0x00018010, b"LONGNA~1.COM\0"),
                              attr(2, 0x00069005, attachment_props)), 1000)
    assert not content.truncated
    (att,) = content.attachments
    assert (att.name, att.data, att.mime_type) == ("longname é.com", EICAR, "application/x-msdownload")
    assert not att.embedded_message
    assert content.body_text == b"plain body" and content.body_html == b"<html>x</html>"
    assert content.body_rtf == b"{\\rtf1\\ansi\\ansicpg1252\\pard hello world}\r\n"
    assert not content.rtf_compressed


def test_embedded_message_object():
    inner = eicar_stream()
    outer = tnef(REND, attr(2, 0x00018010, b"fwd.msg\0"), attr(2, 0x00069005, props(
        prop_fixed(0x0003, 0x3705, struct.pack("<I", 5)),
        prop_var(0x000D, 0x3701, IID_IMESSAGE + inner))))
    (att,) = parse_tnef(outer, 10_000).attachments
    assert att.embedded_message and att.name == "fwd.msg" and att.data == inner
    assert parse_tnef(att.data, 1000).attachments[0].data == EICAR


def test_rtf_decompression():
    assert decompress_rtf(RTF_VECTOR, 100).endswith(b"hello world}\r\n")
    with pytest.raises(TnefError, match="output limit"):
        decompress_rtf(RTF_VECTOR, 10)
    stored = struct.pack("<IIII", 12 + 5, 5, 0x414C454D, 0) + b"{\\rtf"
    assert decompress_rtf(stored, 100) == b"{\\rtf"
    bad_crc = RTF_VECTOR[:12] + b"\0\0\0\0" + RTF_VECTOR[16:]
    with pytest.raises(ValueError):
        decompress_rtf(bad_crc, 100)
    content = parse_tnef(tnef(attr(1, 0x00069003, props(prop_var(0x0102, 0x1009, bad_crc)))), 100)
    assert content.rtf_compressed and content.body_rtf == bad_crc  # kept raw, still scanned


def test_second_data_without_rend_data_is_not_overwritten():
    content = parse_tnef(tnef(attr(2, 0x0006800F, b"first"), attr(2, 0x0006800F, EICAR)), 1000)
    assert [a.data for a in content.attachments] == [b"first", EICAR]


# --- hostile input ----------------------------------------------------------------

def attribute_ends(data: bytes) -> set[int]:
    """Offsets where a well-formed attribute ends (an independent walker)."""
    ends, pos = {6}, 6
    while pos + 11 <= len(data):
        pos += 9 + struct.unpack_from("<I", data, pos + 5)[0] + 2
        ends.add(pos)
    return ends


@needs_corpus
@pytest.mark.parametrize("name", ["tnef__two-files.tnef", "clamav__clam.tnef"])
def test_truncated_at_every_offset(name):
    data = read(name)
    ends = attribute_ends(data)
    for cut in range(len(data)):
        if cut < 6:
            with pytest.raises(TnefError):
                parse_tnef(data[:cut], BIG)
            continue
        content = parse_tnef(data[:cut], BIG)
        assert content.truncated == (cut not in ends), cut


def test_signature_and_empty_input():
    for data in (b"", SIG[:3], b"\0" * 64, b"PK\3\4" + eicar_stream()[4:]):
        with pytest.raises(TnefError, match="signature"):
            parse_tnef(data, 1000)


def test_declared_4gib_lengths():
    stream = eicar_stream()
    pos = stream.index(EICAR) - 4  # the attAttachData length field
    huge = stream[:pos] + struct.pack("<I", 0xFFFFFFFF) + stream[pos + 4:]
    content = parse_tnef(huge, BIG)
    assert content.truncated and all(a.data == b"" for a in content.attachments)
    for body in (props(prop_var(0x0102, 0x3701, EICAR)).replace(struct.pack("<I", 68),
                                                                  struct.pack("<I", 0xFFFFFFFF)),
                 props(prop_var(0x0102, 0x3701, EICAR), count=0xFFFFFFFF),
                 props(prop_var(0x0102, 0x3701, EICAR)).replace(b"\1\0\0\0D", b"\xff\xff\xff\xffD")):
        content = parse_tnef(tnef(REND, attr(2, 0x00069005, body)), BIG)
        assert content.truncated and all(a.data == b"" for a in content.attachments)


def test_output_limit_smaller_than_attachment():
    with pytest.raises(TnefError, match="output limit"):
        parse_tnef(eicar_stream(), len(EICAR) - 1)
    assert parse_tnef(eicar_stream(), len(EICAR)).attachments[0].data == EICAR
    with pytest.raises(TnefError, match="output limit"):
        parse_tnef(eicar_stream(), -1)


def test_bad_checksums_counted_and_data_still_used():
    stream = tnef(REND, attr(2, 0x00018010, b"eicar.com\0", checksum=1),
                  attr(2, 0x0006800F, EICAR, checksum=0xBEEF))
    content = parse_tnef(stream, 1000)
    assert content.checksum_errors == 2 and content.attachments[0].data == EICAR


def test_count_caps():
    many = tnef(*[attr(1, 0x00048009, b"\0\0")] * MAX_ATTRIBUTES)
    with pytest.raises(TnefError, match="too many attributes"):
        parse_tnef(many, BIG)
    lots = props(*[prop_fixed(0x0003, 0x0E20, b"\0" * 4)] * (MAX_PROPERTIES + 1))
    with pytest.raises(TnefError, match="too many"):
        parse_tnef(tnef(attr(1, 0x00069003, lots)), BIG)


def test_unknown_property_type_stops_safely():
    body = props(prop_fixed(0x0003, 0x3705, b"\1\0\0\0"), struct.pack("<HH", 0x0999, 0x3701) + EICAR,
                 prop_var(0x0102, 0x3701, EICAR))
    content = parse_tnef(tnef(REND, attr(2, 0x00069005, body)), BIG)
    assert content.truncated


def test_trailing_garbage_flagged_but_padding_is_not():
    assert not parse_tnef(eicar_stream() + b"\r\n\0", 1000).truncated
    assert parse_tnef(eicar_stream() + b"garbage", 1000).truncated
    assert parse_tnef(eicar_stream() + b"\x07" * 40, 1000).truncated


FAST = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def parse_or_tnef_error(data: bytes, limit: int = 1 << 20) -> None:
    start = time.perf_counter()
    try:
        content = parse_tnef(data, limit)
    except TnefError:
        return
    finally:
        assert time.perf_counter() - start < 1.0
    assert returned_bytes(content) <= limit


@FAST
@given(st.binary(max_size=4096))
def test_fuzz_arbitrary_bytes(data):
    parse_or_tnef_error(data)


@FAST
@given(st.binary(max_size=4096), st.integers(0, 4096))
def test_fuzz_after_valid_signature(tail, limit):
    parse_or_tnef_error(SIG + tail, limit)
    parse_or_tnef_error(SIG + b"\1\1" + tail, limit)


TAGS = [0x9002, 0x800F, 0x8010, 0x9003, 0x9005, 0x800C, 0x9006, 0x1234]
TYPES = [0x0002, 0x0003, 0x000B, 0x0040, 0x0048, 0x000D, 0x001E, 0x001F, 0x0102,
         0x1003, 0x101F, 0x1102, 0x0001, 0x0999]
PIDS = [0x3701, 0x3707, 0x3704, 0x370E, 0x3705, 0x1000, 0x1009, 0x1013, 0x8000, 0x9999]
prop_strategy = st.builds(
    lambda t, p, n, v, lie: struct.pack("<HHI", t, p, n) + struct.pack("<I", lie or len(v)) + v,
    st.sampled_from(TYPES), st.sampled_from(PIDS), st.integers(0, 3), st.binary(max_size=40),
    st.sampled_from([0, 0, 0, 1, 0xFFFFFFFF, 0x7FFFFFFF]))
props_strategy = st.builds(lambda n, items: struct.pack("<I", n or len(items)) + b"".join(items),
                           st.sampled_from([0, 0, 1, 0xFFFFFFFF]), st.lists(prop_strategy, max_size=6))
attr_strategy = st.builds(
    lambda level, tag, data, good: attr(level, tag, data, None if good else 0),
    st.sampled_from([1, 2, 2, 0]), st.sampled_from(TAGS), st.one_of(st.binary(max_size=64), props_strategy),
    st.booleans())


@FAST
@given(st.lists(attr_strategy, max_size=12), st.integers(0, 2000))
def test_fuzz_structured(attrs, limit):
    parse_or_tnef_error(tnef(*attrs), limit)


@needs_corpus
@FAST
@given(st.lists(st.tuples(st.integers(0, 3480), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_real_sample(flips):
    data = bytearray(read("tnef__two-files.tnef"))
    for offset, value in flips:
        data[offset % len(data)] = value
    parse_or_tnef_error(bytes(data))


def test_large_random_input_is_fast():
    data = SIG + bytes(range(256)) * 4096  # 1 MiB that looks like attributes
    start = time.perf_counter()
    with pytest.raises(TnefError):
        parse_tnef(b"x" + data, BIG)
    parse_or_tnef_error(data, BIG)
    assert time.perf_counter() - start < 1.0


def test_every_name_of_an_attachment_is_checked_by_the_banned_rules():
    """Outlook shows PR_DISPLAY_NAME; Debian's tnef writes the long file name:
    a banned name under any of them bans the attachment (hostile review)."""
    from amavisd.decode.engine import decompose
    from amavisd.policy.banned import BannedRules
    from amavisd.testing.archivers import as_attachment

    items = props(prop_var(0x001F, 0x3707, utf16z("a.txt")),
                  prop_var(0x001F, 0x3001, utf16z("a.vbs")))
    stream = tnef(REND, attr(2, 0x00018010, b"a.txt\0"),
                  attr(2, 0x0006800F, b"WScript.Echo 1\r\n"), attr(2, 0x00069005, items))
    result = decompose(as_attachment(stream, "winmail.dat"))
    try:
        hits = BannedRules.default().check(result.root)
    finally:
        result.cleanup()
    assert [hit.part_name for hit in hits] == ["a.vbs"]
