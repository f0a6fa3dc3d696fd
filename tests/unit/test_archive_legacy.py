"""ARJ, LHA, ZOO and ARC: real tools on real archives, hostile ones included.

Fixtures with EICAR are made at test time by the real arj, jlha (Debian's only
LHA writer) and arc; zoo has no creator on Debian 12, so only the corpus
covers it. (freeze, read in-process, has tests/unit/test_freeze.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from amavisd.decode.archives import legacy
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.parts import Part
from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR

CLEAN = b"nothing to see here\n"


def needs(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def build(fmt: str, files: dict[str, bytes], tmp_path: Path) -> bytes:
    reason = archivers.available(fmt)
    if reason:
        pytest.skip(reason)
    return archivers.build(fmt, files, tmp_path)


def run(argv: list[str], cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)


@pytest.fixture
def decode(tmp_path):
    """decompose() a bare archive with its work dir under tmp_path/base."""
    base = tmp_path / "base"
    base.mkdir()
    results = []

    def go(data: bytes, limits: Limits | None = None):
        result = decompose(data, limits=limits, tempbase=str(base), bare_file=True)
        results.append(result)
        return result

    yield go
    for result in results:
        result.cleanup()


def members_of(result) -> dict[str, bytes]:
    return {child.name: child.read() for child in result.root.children}


# -- generated archives with EICAR -------------------------------------------------

@pytest.mark.parametrize("fmt, tools", [("arj", ("arj", "7zz")), ("lha", ("jlha", "lhasa")),
                                        ("arc", ("arc", "nomarch"))])
def test_generated_archive_gives_its_members(fmt, tools, tmp_path, decode):
    needs(*tools)
    data = build(fmt, {"eicar.com": EICAR, "readme.txt": CLEAN}, tmp_path)
    result = decode(data)
    assert result.root.detected == fmt
    assert members_of(result) == {"eicar.com": EICAR, "readme.txt": CLEAN}
    assert result.root.expanded and result.unchecked == []
    assert result.root not in result.scannable()


def test_arj_subdirectory_names_are_kept_as_labels(tmp_path, decode):
    needs("arj", "7zz")
    data = build("arj", {"dir/sub/eicar.com": EICAR}, tmp_path)
    assert members_of(decode(data)) == {"dir/sub/eicar.com": EICAR}


def test_same_named_members_leave_the_archive_to_be_scanned(tmp_path, decode):
    # Two LHA archives of one member "x.com" each, the first without its end
    # marker: one archive whose second member would overwrite the first on disk.
    needs("jlha", "lhasa")
    first = build("lha", {"x.com": EICAR}, tmp_path)
    second = build("lha", {"x.com": CLEAN}, tmp_path)
    result = decode(first[:-1] + second)
    assert not result.root.expanded
    assert result.root in result.scannable()


# -- encryption --------------------------------------------------------------------

def test_password_arj_is_unchecked_and_plain_members_still_come_out(tmp_path, decode):
    needs("arj", "7zz")
    (tmp_path / "secret.txt").write_bytes(CLEAN)
    (tmp_path / "eicar.com").write_bytes(EICAR)
    run(["arj", "a", "-y", "-gpassword", "mixed.arj", "secret.txt"], tmp_path)
    run(["arj", "a", "-y", "mixed.arj", "eicar.com"], tmp_path)
    result = decode((tmp_path / "mixed.arj").read_bytes())
    assert "encrypted" in result.root.flags and not result.root.expanded
    assert result.unchecked == ["encrypted arj member secret.txt (p001)"]
    assert members_of(result)["eicar.com"] == EICAR
    assert result.root in result.scannable()


def test_arj_garbled_flag_is_read_from_the_headers(tmp_path):
    needs("arj")
    (tmp_path / "a.txt").write_bytes(CLEAN)
    run(["arj", "a", "-y", "-gpw", "p.arj", "a.txt"], tmp_path)
    run(["arj", "a", "-y", "plain.arj", "a.txt"], tmp_path)
    garbled = Part(id="p001", data=(tmp_path / "p.arj").read_bytes())
    plain = Part(id="p002", data=(tmp_path / "plain.arj").read_bytes())
    assert legacy.arj_inventory(garbled) == legacy.Inventory([b"a.txt"], 0)
    assert legacy.arj_inventory(plain) == legacy.Inventory([], 1)
    broken = bytearray(garbled.data)
    broken[10] ^= 0xFF  # inside the main header: its CRC no longer matches
    assert legacy.read_arj_header(bytes(broken), 0) is None


def test_password_arc_is_unchecked_as_encrypted_or_corrupt(tmp_path, decode):
    needs("arc", "nomarch")
    (tmp_path / "secret.txt").write_bytes(CLEAN)
    (tmp_path / "eicar.com").write_bytes(EICAR)
    run(["arc", "anw", "mixed.arc", "eicar.com"], tmp_path)
    run(["arc", "anwgpassword", "mixed.arc", "secret.txt"], tmp_path)
    result = decode((tmp_path / "mixed.arc").read_bytes())
    assert "encrypted" in result.root.flags and "decode-error" not in result.root.flags
    assert result.unchecked == ["encrypted or corrupt arc member secret.txt (p001)"]
    assert members_of(result)["eicar.com"] == EICAR


@pytest.mark.parametrize("sample, reason", [
    ("patool__p.arj", "encrypted arj member t/t.txt (p001)"),
    ("patool__p.arc", "encrypted or corrupt arc member t.txt (p001)"),
])
def test_corpus_password_archives_are_unchecked(corpus, decode, sample, reason):
    result = decode((corpus / "archives/encrypted" / sample).read_bytes())
    assert "encrypted" in result.root.flags
    assert reason in result.unchecked


# -- the corpus ----------------------------------------------------------------------

# lhasa and unar both fail on these (checked by hand): -lh3- is supported by
# neither, and LHark's -lh7- variant differs from LHA's.
LHA_UNREADABLE = {"lhasa__unlha32__lh3.lzh", "lhasa__lhark04d__lh7.lzh"}


def test_corpus_lha_samples_all_open(corpus, decode):
    needs("lhasa", "unar")
    gpl = None
    for sample in sorted((corpus / "archives/lha-lzh").iterdir()):
        result = decode(sample.read_bytes())
        assert result.root.detected == "lha", sample.name
        if sample.name in LHA_UNREADABLE:  # content nothing here produces: UNCHECKED
            assert "undecipherable" in result.root.flags, sample.name
            assert [r.kind for r in result.unchecked] == ["undecipherable"], sample.name
            continue
        assert result.root.expanded, sample.name
        assert result.root.children or "symlink" in sample.name, sample.name
        for child in result.root.children:
            if child.name.lower() == "gpl-2" and child.size == 18092:
                gpl = gpl or child.read()
                assert child.read() == gpl, sample.name  # every LHA flavour: the same text
    assert gpl and gpl.startswith(b"                    GNU GENERAL PUBLIC LICENSE")


def test_lh2_falls_back_from_lhasa_to_unar(corpus, decode):
    needs("lhasa", "unar")
    result = decode((corpus / "archives/lha-lzh/lhasa__unlha32__lh2.lzh").read_bytes())
    ((name, text),) = members_of(result).items()
    assert name == "LICENSE.MIT" and len(text) == 2853 and b"MIT" in text
    assert result.root.expanded


@pytest.mark.parametrize("folder, expected", [
    ("arj", {"clamav__clam.arj": {"clam.exe"}, "patool__t.arj": {"t/t.txt"},
             "patool__t.arj.foo": {"t/t.txt"}, "recursiveextractor__TestData.arj": {"TestFile.txt"}}),
    ("zoo", {"patool__t.zoo": {"t.txt", "t2.txt"}, "patool__t.zoo.foo": {"t.txt", "t2.txt"}}),
    ("arc", {"patool__t.arc": {"t.txt", "t2.txt"},
             "recursiveextractor__TestData.arc": {"testfile.txt"}}),
])
def test_corpus_arj_zoo_arc(corpus, decode, folder, expected):
    for name, names in expected.items():
        result = decode((corpus / "archives" / folder / name).read_bytes())
        assert set(members_of(result)) == names, name
        assert result.root.expanded and result.unchecked == [], name
    if folder == "zoo":
        assert set(members_of(result).values()) == {b"42"}


def test_corpus_arj_clam_exe_comes_out_whole(corpus, decode):
    from amavisd.testing.eicar import CLAM_EXE_PATH

    if not os.path.exists(CLAM_EXE_PATH):
        pytest.skip("clamav-testfiles not installed")
    result = decode((corpus / "archives/arj/clamav__clam.arj").read_bytes())
    assert members_of(result)["clam.exe"] == Path(CLAM_EXE_PATH).read_bytes()


# -- hostile archives ----------------------------------------------------------------

def test_lha_traversal_and_symlinks_stay_in_the_scratch_dir(corpus, decode, tmp_path):
    needs("lhasa")
    sentinel = tmp_path / "etc"  # what "../../etc" style links would reach, and more
    sentinel.mkdir()
    (sentinel / "keep").write_text("untouched")
    absolute = Path("/tmp/absolute_path.txt")
    existed = absolute.exists()
    for sample in sorted((corpus / "archives/path-traversal").glob("lhasa__*.lzh")):
        result = decode(sample.read_bytes())
        for child in result.root.children:
            assert not child.name.startswith(("/", "..")), child.name
        if "symlink" in sample.name:
            # the link is skipped, never followed: etc/passwd is the member's own bytes
            assert members_of(result).get("etc/passwd") in (None, b"this is bad\n")
        left = [p for p in tmp_path.rglob("*")
                if (p.is_symlink() or p.is_file()) and p != sentinel / "keep"]
        assert left == [], sample.name
        assert sorted(os.listdir(sentinel)) == ["keep"]
        assert (sentinel / "keep").read_text() == "untouched"
        assert absolute.exists() == existed
        assert not Path("/tmp/evil1.txt").exists() and not Path("/etc/passwd").is_symlink()


def test_lha_symlinks_give_their_target_flagged(corpus, decode):
    needs("lhasa")
    result = decode((corpus / "archives/lha-lzh/lhasa__lha_unix114i__h2_symlink.lzh")
                    .read_bytes())
    (link,) = result.root.children  # its target, flagged, never followed
    assert "link" in link.flags and link.name == "symlink"
    result = decode((corpus / "archives/lha-lzh/libarchive__test_read_format_lha_lh6.lzh")
                    .read_bytes())
    links = {c.name for c in result.root.children if "link" in c.flags}
    assert set(members_of(result)) - links == {"file1", "file2"}
    assert links == {"dir2/symlink1", "dir2/symlink2"}


def test_hostile_arc_names_are_cleaned_and_nothing_escapes(tmp_path, decode):
    needs("arc", "nomarch")
    data = bytearray(build("arc", {"eicar.com": EICAR}, tmp_path))
    data[2:15] = b"../../evil\0\0\0"  # ARC's 13-byte name field
    result = decode(bytes(data))
    (child,) = result.root.children
    assert child.read() == EICAR and ".." not in child.name.split("/")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("sample", ["lhasa__regression__truncated.lzh",
                                    "libarchive__test_fuzz.lzh",
                                    "libarchive__test_read_format_lha_oversize_header.lzh"])
def test_corrupt_lha_gives_no_exception_and_no_hang(corpus, decode, sample):
    needs("lhasa")
    started = time.monotonic()
    result = decode((corpus / "archives/corrupt" / sample).read_bytes())
    assert time.monotonic() - started < 5
    assert result.root.detected == "lha"
    assert result.root in result.scannable()  # never taken as fully read


def test_terminal_escapes_in_lha_names_are_cleaned(corpus, decode):
    needs("lhasa")
    result = decode((corpus / "archives/corrupt/lhasa__regression__badterm.lzh").read_bytes())
    (child,) = result.root.children
    assert child.name == "tmp/?]2;malicious??"


def test_truncated_lha_keeps_what_was_read(corpus, decode):
    needs("lhasa")
    result = decode((corpus / "archives/corrupt/lhasa__regression__truncated.lzh").read_bytes())
    # lhasa and unar both fail: what lhasa wrote is scanned, and the message is UNCHECKED
    assert "undecipherable" in result.root.flags
    child = result.root.children[0]
    assert 0 < child.size < 18092 and child.read().lstrip().startswith(b"GNU GENERAL")


def test_huge_lha_member_stops_within_seconds(corpus, decode):
    needs("lhasa")
    data = (corpus / "archives/bombs/lhasa__morphos_lha_2717__h2_huge.lzh").read_bytes()
    started = time.monotonic()
    result = decode(data, Limits(min_quota=64 * 1024 * 1024))
    assert time.monotonic() - started < 10
    assert "limit" in result.root.flags
    assert any("lhasa output" in reason for reason in result.unchecked)
    assert result.root in result.scannable()
    leftovers = [p for p in Path(result.context.workdir()).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in leftovers) <= 64 * 1024 * 1024


def test_missing_tool_is_undecipherable(monkeypatch, tmp_path, decode):
    needs("arj")
    data = build("arj", {"eicar.com": EICAR}, tmp_path)
    monkeypatch.setattr(legacy.external, "available", lambda tool: False)
    result = decode(data)
    assert result.root.flags == {"undecipherable"} and result.scannable() == [result.root]
    assert [reason.kind for reason in result.unchecked] == ["undecipherable"]


def test_arj_falls_back_to_the_arj_tool(monkeypatch, tmp_path, decode):
    needs("arj")
    data = build("arj", {"eicar.com": EICAR, "readme.txt": CLEAN}, tmp_path)
    real = legacy.external.available
    monkeypatch.setattr(legacy.external, "available", lambda tool: tool != "7zz" and real(tool))
    result = decode(data)
    assert members_of(result) == {"eicar.com": EICAR, "readme.txt": CLEAN}
    assert result.root.expanded


def test_arj_directories_are_not_counted_as_missing_members(tmp_path, decode):
    needs("arj", "7zz")
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "eicar.com").write_bytes(EICAR)
    run(["arj", "a", "-r", "-a1", "-y", "dirs.arj", "d"], tmp_path)  # -a1: stores d/e too
    result = decode((tmp_path / "dirs.arj").read_bytes())
    assert members_of(result) == {"d/e/eicar.com": EICAR}
    assert result.root.expanded


def test_same_named_arj_members_are_all_read(tmp_path, decode):
    # the second copy of "x.com" follows the first one's local header chain
    needs("arj", "7zz")
    first = build("arj", {"x.com": EICAR}, tmp_path)
    second = build("arj", {"x.com": CLEAN}, tmp_path)
    main_end = legacy.read_arj_header(second, 0).end
    joined = first[:-4] + second[main_end:]  # first's end marker (60 ea 00 00) dropped
    result = decode(joined)
    assert sorted(c.read() for c in result.root.children) == sorted([EICAR, CLEAN])
    assert result.root.expanded


def test_same_named_arj_members_overwritten_by_the_arj_tool_are_noticed(
        monkeypatch, tmp_path, decode):
    needs("arj")
    first = build("arj", {"x.com": EICAR}, tmp_path)
    second = build("arj", {"x.com": CLEAN}, tmp_path)
    joined = first[:-4] + second[legacy.read_arj_header(second, 0).end:]
    real = legacy.external.available
    monkeypatch.setattr(legacy.external, "available", lambda tool: tool != "7zz" and real(tool))
    result = decode(joined)
    assert not result.root.expanded and result.root in result.scannable()


def test_arc_member_named_like_the_tool_log_is_read(tmp_path, decode):
    # nomarch writes into its cwd; run_tool keeps its logs (.stdout, .stderr)
    # elsewhere, so a member of that name can neither hide nor be lost.
    needs("arc", "nomarch")
    data = bytearray(build("arc", {"eicar.com": EICAR}, tmp_path))
    data[2:15] = b".stdout".ljust(13, b"\0")
    result = decode(bytes(data))
    assert members_of(result) == {".stdout": EICAR}
    assert result.root.expanded
