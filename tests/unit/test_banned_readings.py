"""A part's name as other readers read it: every one is checked.

Found by a hostile review: the recipient's client (Thunderbird, Outlook) or
unzipper (7-Zip, Info-ZIP) saved a part under a banned name the rules never
saw, because we read one name and they read another. Each case below is a
.vbs that some reader names a.vbs (the reader and its rule in the comment);
each must be banned by the default rules, and a site's `allow` rule for
the name we read must not let another reader's a.vbs through.
"""

from __future__ import annotations

import binascii
import io
import struct
import zipfile

import pytest

from amavisd.decode.engine import decompose
from amavisd.decode.parts import Part
from amavisd.policy.banned import DEFAULT_RULES, BannedRules, readings
from amavisd.testing.archivers import as_attachment

VBS = b"WScript.Echo 1\r\n"
CT = b"Content-Type: application/octet-stream"
UU = b"begin 644 a.vbs\r\n" + binascii.b2a_uu(VBS).rstrip(b"\n") + b"\r\n`\r\nend"


def mime(part_headers: bytes, body: bytes = VBS, cte: bytes = b"7bit") -> bytes:
    return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="BB"\r\n\r\n'
            b"--BB\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--BB\r\n" + part_headers + b"\r\nContent-Transfer-Encoding: " + cte
            + b"\r\n\r\n" + body + b"\r\n--BB--\r\n")


def untyped(body: bytes) -> bytes:
    return b"From: a@example.com\r\nTo: b@example.com\r\nSubject: t\r\n\r\nhello\r\n" + body


def zip_with_central_unicode_path(stored: str, shown: str) -> bytes:
    """A zip whose member is `stored` in both headers, and `shown` in the
    central directory's Info-ZIP Unicode Path field (0x7075) only: what
    7-Zip and unzip list and extract it as."""
    name = stored.encode()
    field = b"\x01" + struct.pack("<I", binascii.crc32(name)) + shown.encode()
    info = zipfile.ZipInfo(stored)
    info.extra = struct.pack("<HH", 0x7075, len(field)) + field
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(info, VBS)
    data = out.getvalue()
    local_field = data.index(b"\x75\x70")  # the local header's copy comes first
    return data[:local_field] + b"\xfe\xca" + data[local_field + 2:]  # an unknown tag now


CASES = {
    # Thunderbird decodes RFC 2047 words in a file name parameter
    "encoded word in filename": mime(
        CT + b'\r\nContent-Disposition: attachment; filename="=?utf-8?B?YS52YnM=?="'),
    # Thunderbird prefers filename* (RFC 6266 4.3) over filename
    "filename and filename*": mime(
        CT + b"\r\nContent-Disposition: attachment; filename=a.txt; filename*=utf-8''a.vbs"),
    "filename and filename*0* continuations": mime(
        CT + b"\r\nContent-Disposition: attachment; filename=a.txt; "
             b"filename*0*=utf-8''a.v; filename*1=bs"),
    # Thunderbird drops CR/LF from a name
    "LF inside an RFC 2231 name": mime(
        CT + b"\r\nContent-Disposition: attachment; filename*=utf-8''a.v%0Abs"),
    # Thunderbird reads parameters after a "," too
    "comma before the parameters": mime(
        CT + b'; name="a.txt"\r\nContent-Disposition: attachment, filename="a.vbs"'),
    # Thunderbird's fallbacks when no parameter names the part
    "Content-Name": mime(CT + b"\r\nContent-Name: a.vbs"),
    "X-Sun-Data-Name": mime(CT + b"\r\nX-Sun-Data-Name: a.vbs"),
    # Thunderbird makes a disposition header of a uuencode name
    "encoded word as a uuencode name": untyped(UU.replace(b"a.vbs", b"=?utf-8?B?YS52YnM=?=")),
    # Outlook (MS-OXCMAIL 2.2.3.4.1.1): Content-Description when nothing else names it
    "Content-Description": mime(CT + b"\r\nContent-Description: a.vbs"),
    # Outlook: the uuencode block's name of an x-uuencode body
    "x-uuencode body": mime(CT, UU, b"x-uuencode"),
    # Outlook removes the characters Windows refuses in a name
    "colon": mime(CT + b'\r\nContent-Disposition: attachment; filename="a.v:bs"'),
    "pipe": mime(CT + b'\r\nContent-Disposition: attachment; filename="a.vb|s"'),
    "tab": mime(CT + b"\r\nContent-Disposition: attachment; filename*=utf-8''a.vb%09s"),
    # 7-Zip and Info-ZIP unzip: the central directory's Unicode Path
    "zip Unicode Path": as_attachment(zip_with_central_unicode_path("a.txt", "a.vbs"), "x.zip"),
}


def banned(raw: bytes, rules: BannedRules) -> list[str]:
    result = decompose(raw)
    try:
        return [hit.part_name for hit in rules.check(result.root)]
    finally:
        result.cleanup()


@pytest.mark.parametrize("case", CASES)
def test_every_reading_of_a_name_is_checked(case: str):
    assert banned(CASES[case], BannedRules.default()) == ["a.vbs"]  # the name that was denied


@pytest.mark.parametrize("case", ["filename and filename*", "comma before the parameters",
                                  "zip Unicode Path"])
def test_an_allow_rule_for_the_name_we_read_does_not_pass_another_readers(case: str):
    rules = BannedRules.parse([r"allow name ~ \.txt$", *DEFAULT_RULES])
    assert banned(CASES[case], rules) == ["a.vbs"]


def test_a_part_reads_as_its_name_alone_unless_something_differs():
    assert readings(Part("p001", name="report.pdf")) == ("report.pdf",)
    assert readings(Part("p001", name="dir/a.exe")) == ("dir/a.exe",)
    assert readings(Part("p001", name="a.txt", alt_names=("a.vbs",))) == ("a.txt", "a.vbs")
    assert readings(Part("p001", alt_names=("a.vbs",))) == ("", "a.vbs")  # the name first
    assert readings(Part("p001", name='x/a.v"b:s')) == ('x/a.v"b:s', "a.vbs")


def test_an_ordinary_attachment_is_not_banned_by_its_readings():
    raw = mime(CT + b'; name="report.txt"\r\nContent-Disposition: attachment; '
                    b'filename="report.txt"\r\nContent-Description: the report')
    assert banned(raw, BannedRules.default()) == []


def test_a_decoded_name_is_cleaned_as_every_name_is():
    """It is named in replies, notices and logs: no CR/LF from an encoded word."""
    evil = "=?utf-8?B?YQ0KQmNjOiB4QHkNCi52YnM=?="  # "a\r\nBcc: x@y\r\n.vbs"
    found = readings(Part("p001", name=evil))
    assert "a??Bcc: x@y??.vbs" in found and not any("\r" in n or "\n" in n for n in found)
    assert banned(mime(CT + f'\r\nContent-Disposition: attachment; filename="{evil}"'.encode()),
                  BannedRules.default()) == ["a??Bcc: x@y??.vbs"]


def test_an_encoded_word_then_what_windows_refuses():
    """Decoded, "a.v:bs"; less the ":" Outlook removes, a.vbs."""
    assert banned(mime(CT + b'\r\nContent-Disposition: attachment; '
                            b'filename="=?utf-8?B?YS52OmJz?="'), BannedRules.default()) == ["a.vbs"]
