"""Banned rules on real decomposed messages: names at the top, inside a
forwarded message and inside a 7z made by the real 7zz; rule order; a clean
look-alike passes; bad rules fail at load time in one line."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from email.message import EmailMessage
from pathlib import Path

import pytest

from amavisd.decode.engine import decompose
from amavisd.decode.parts import Part, clip_name
from amavisd.decode.registry import REGISTRY
from amavisd.policy.banned import DEFAULT_RULES, BannedRuleError, BannedRules
from amavisd.testing import archivers

PE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"\0" * 200
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01" + b"\0" * 100 + b"\xff\xd9"
CLSID_NAME = "document.{3050F4D8-98B5-11CF-BB82-00AA00BDCE0B}"


def message(*attachments: tuple[str, bytes], inner: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "files"
    msg.set_content("see attached\n")
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    if inner is not None:
        msg.add_attachment(inner, maintype="message", subtype="rfc822")
    return bytes(msg)


def banned_names(raw: bytes, rules: BannedRules | None = None) -> dict[str, str]:
    """{part name: rule text} of the banned parts of a decomposed message."""
    result = decompose(raw)
    try:
        hits = (rules or BannedRules.default()).check(result.root)
    finally:
        result.cleanup()
    return {hit.part_name: hit.rule_text for hit in hits}


def test_defaults_ban_the_classics_at_the_top_level():
    raw = message(("AnnaKournikova.jpg.vbs", b"WScript.Echo 1\n"),
                  ("invoice.pdf.exe", PE), (CLSID_NAME, b"x"),
                  ("setup.EXE", PE), ("holiday.jpg", PE),
                  ("report.pdf", PDF), ("photo.jpg", JPEG), ("notes.txt", b"hello\n"))
    hits = banned_names(raw)
    assert set(hits) == {"AnnaKournikova.jpg.vbs", "invoice.pdf.exe", CLSID_NAME,
                         "setup.EXE", "holiday.jpg"}
    # The most telling rule names the hit: double extension before the plain one.
    assert hits["invoice.pdf.exe"] == DEFAULT_RULES[0]
    assert hits["AnnaKournikova.jpg.vbs"] == DEFAULT_RULES[0]
    assert hits[CLSID_NAME] == DEFAULT_RULES[1]
    assert hits["setup.EXE"] == DEFAULT_RULES[3]
    assert hits["holiday.jpg"] == "deny type = exe"  # a PE disguised by its name


def test_clean_look_alikes_pass():
    raw = message(("report.pdf", PDF), ("photo.jpg", JPEG), ("Proposal.v12.pdf", PDF),
                  ("exe-notes.txt", b"about .exe files\n"), ("archive.exe.txt", b"text\n"))
    assert banned_names(raw) == {}


def test_windows_trailing_dots_and_spaces_do_not_hide_an_extension():
    raw = message(("setup.exe.", PE), ("readme.txt.scr. .", b"x"))
    assert set(banned_names(raw)) == {"setup.exe.", "readme.txt.scr. ."}
    root = Part("p001")  # a member name can keep its trailing blanks
    root.add(Part("p002", name="dir/tool.com  "))
    assert [h.part_path for h in BannedRules.default().check(root)] == ["p001/p002"]


def test_a_name_inside_a_forwarded_message():
    inner = message(("invoice.pdf.exe", PE))
    hits = banned_names(message(("report.pdf", PDF), inner=inner))
    assert list(hits) == ["invoice.pdf.exe"]


@pytest.mark.skipif(shutil.which("7zz") is None, reason="7zz not installed (package 7zip)")
@pytest.mark.skipif("7z" not in REGISTRY, reason="no 7z decoder registered")
def test_names_inside_an_archive_and_their_last_component(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "invoice.pdf.exe").write_bytes(PE)
    (tmp_path / "docs" / "report.pdf").write_bytes(PDF)
    subprocess.run(["7zz", "a", "-bd", "-bso0", "a.7z", "docs"], cwd=tmp_path, check=True)
    raw = message(("stuff.7z", (tmp_path / "a.7z").read_bytes()))
    assert banned_names(raw) == {"docs/invoice.pdf.exe": DEFAULT_RULES[0]}
    # An anchored rule sees the member's own name, not only the whole path.
    only_anchored = BannedRules.parse([r"deny name ~ ^invoice\."])
    assert list(banned_names(raw, only_anchored)) == ["docs/invoice.pdf.exe"]


def test_rule_order_first_match_wins():
    raw = message(("setup.exe", PE), ("holiday.jpg", PE))
    allow_first = BannedRules.parse([r"allow name ~ \.exe$", "deny type = exe"])
    assert banned_names(raw, allow_first) == {"holiday.jpg": "deny type = exe"}
    deny_first = BannedRules.parse(["deny type = exe", r"allow name ~ \.exe$"])
    assert set(banned_names(raw, deny_first)) == {"setup.exe", "holiday.jpg"}


def test_conditions_joined_with_and_and_negated():
    raw = message(("setup.exe", PE), ("holiday.jpg", PE), ("photo.jpg", JPEG))
    disguised = BannedRules.parse([r"deny type = exe and name !~ \.(exe|dll)$"])
    assert list(banned_names(raw, disguised)) == ["holiday.jpg"]


def test_declared_mime_type_message_partial():
    raw = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: part 1 of 2\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: message/partial; id=\"x@y\"; number=1; "
           b"total=2\r\n\r\nFrom: a@example.com\r\nSubject: inner\r\n\r\nhalf a message\r\n")
    result = decompose(raw)
    hits = BannedRules.default().check(result.root)
    result.cleanup()
    assert [h.rule_text for h in hits] == ["deny mime = message/partial"]
    assert hits[0].part_path == "p001/p002"


def test_quoted_values_and_case_insensitive_equality():
    rules = BannedRules.parse(["deny name = 'My File.EXE'", 'deny mime = "Application/X-Foo"'])
    root = Part("p001")
    root.add(Part("p002", name="my file.exe"))
    root.add(Part("p003", mime_type="application/x-foo"))
    root.add(Part("p004", name="my file.exe.txt"))
    assert [h.part_path for h in rules.check(root)] == ["p001/p002", "p001/p003"]


def test_libmagic_field_and_needs_magic():
    assert not BannedRules.default().needs_magic
    rules = BannedRules.parse(["deny magic = application/x-dosexec"])
    assert rules.needs_magic
    root = Part("p001")
    root.add(Part("p002", name="a.bin", detected_mime="application/x-dosexec"))
    root.add(Part("p003", name="b.bin"))  # libmagic not asked: no match
    hits = rules.check(root)
    assert [(h.part_path, h.label, h.rule_number) for h in hits] == [("p001/p002", "a.bin", 1)]
    assert "a.bin" in str(hits[0]) and "deny magic" in str(hits[0])


def test_rules_written_as_toml_literal_strings():
    doc = tomllib.loads(
        "[policy]\nbanned_rules = [\n"
        "  'allow name ~ \\.txt$',\n"
        "  'deny name ~ \\.(exe|com|scr|pif|bat|cmd|vbs|js|jse|wsf|hta|cpl|lnk|reg)$',\n"
        "  'deny type = exe',\n"
        "]\n")
    rules = BannedRules.parse(doc["policy"]["banned_rules"])
    root = Part("p001")
    root.add(Part("p002", name="a.js"))
    root.add(Part("p003", name="a.txt", detected="exe"))
    root.add(Part("p004", name="a.jsx"))
    assert [h.part_path for h in rules.check(root)] == ["p001/p002"]


@pytest.mark.parametrize("text, fault", [
    ("", "must start with allow or deny"),
    ("block name ~ x", "must start with allow or deny"),
    ("deny name ~ (exe", "bad regex"),
    ("deny size > 3", "unknown field 'size'"),
    ("deny name ~", "expected FIELD OP VALUE"),
    ("deny name like x", "unknown operator 'like'"),
    ("deny name = my file.exe", "expected 'and' before 'file.exe'"),
    ("deny name = 'unterminated", "unterminated ' quote"),
    ("deny name ~ x and", "expected FIELD OP VALUE"),
])
def test_a_bad_rule_is_one_line_naming_it(text: str, fault: str):
    with pytest.raises(BannedRuleError) as caught:
        BannedRules.parse([r"deny name ~ \.exe$", text])
    said = str(caught.value)
    assert "\n" not in said
    assert said.startswith(f"banned rule 2 {text!r}: ")
    assert fault in said


def test_default_rules_parse_and_a_non_string_is_refused():
    assert len(BannedRules.default().rules) == len(DEFAULT_RULES)
    with pytest.raises(BannedRuleError, match="banned rule 1 .*must be a string"):
        BannedRules.parse([{"deny": "exe"}])


def test_a_flag_rule_bans_documents_with_macros():
    rules = BannedRules.parse(["deny flag = macros"])
    root = Part(id="p001", name="m.eml")
    doc = root.add(Part(id="p002", name="report.xlsm", flags={"macros"}))
    root.add(Part(id="p003", name="plain.xlsx"))
    hits = rules.check(root)
    assert [h.part_path for h in hits] == [doc.path]


# -- names too long to keep whole (a plain cut once dropped the extension) -------------------

LONG = "A" * 300


@pytest.mark.parametrize("name", [LONG + ".vbs", LONG + ".pdf.vbs", LONG + ".vbs" + " " * 300,
                                  LONG + ".vbs" + ". " * 200, "x.vbs" + "." * 400])
def test_a_long_attachment_name_keeps_its_extension(name: str):
    hits = banned_names(message((name, b"WScript.Echo 1\n")))
    assert len(hits) == 1, name
    [seen] = hits
    assert len(seen) <= 255 and seen.rstrip(". ").endswith(".vbs")


def test_a_long_uuencoded_name_keeps_its_extension():
    body = (f"begin 644 {LONG}.js\n" "#5V%S8W)I<'0N96-H;R`Q\n" "`\nend\n").encode()
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.org", "uu"
    msg.set_content(body.decode())
    [seen] = banned_names(bytes(msg))
    assert seen.endswith(".js") and seen.startswith("AAAA")


@pytest.mark.parametrize("fmt", ["zip", "7z", "tar"])
def test_a_long_member_path_keeps_its_last_component(tmp_path: Path, fmt: str):
    if archivers.available(fmt):
        pytest.skip(archivers.available(fmt))
    deep = "/".join(["d" * 200] * 6)  # 1,205 characters of directories, as a real tree can be
    data = archivers.build(fmt, {f"{deep}/{'B' * 240}.js": b"WScript.Echo 1\n",
                                 f"{deep}/notes.txt": b"hello\n"}, tmp_path)
    hits = banned_names(message((f"stuff.{fmt}", data)))
    assert len(hits) == 1, hits
    [seen] = hits
    assert len(seen) <= 1024 and seen.startswith("dddd") and seen.endswith("B" * 240 + ".js")
    # the last component, whole, is still a candidate of its own (an anchored rule sees it)
    anchored = BannedRules.parse([r"deny name ~ ^B+\.js$"])
    assert len(banned_names(message((f"stuff.{fmt}", data)), anchored)) == 1


@pytest.mark.parametrize("length", [1, 254, 255, 256, 300, 5000])
def test_clip_name_keeps_both_ends_and_the_limit(length: int):
    name = "S" + "m" * max(0, length - 6) + ".exe"
    clipped = clip_name(name, 255)
    assert len(clipped) <= 255
    assert clipped == name if len(name) <= 255 else (
        clipped.startswith("Smm") and clipped.endswith("mm.exe") and "\u2026" in clipped)
