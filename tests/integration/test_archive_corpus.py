"""Issue 4 acceptance on the shared corpus (`archives/`, see its MANIFEST.md):
every real sample opens, every one carrying a test virus is INFECTED through
the pipeline and a non-decoding clamd, encrypted ones are UNCHECKED, bombs
stop in seconds with bounded memory, traversal samples write nothing outside
the work dir, corrupt ones raise nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.decode.engine import decompose
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing.archivers import as_attachment
from tests.fuzz.harness import check

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# The `corpus` fixture skips when it is absent; parameters are listed from the same place.
ARCHIVES = Path(os.environ.get("AMAVISD_CORPUS", REPO.parent / "shared" / "corpus")) / "archives"
SPECIAL = {"bombs", "corrupt", "encrypted", "path-traversal"}
# other/: ACE, ALZ, CHM, SZDD, SIS, WIM, ... formats AMaViS does not list: not required to open.
NOT_REQUIRED = {"other"}

# Samples that rightly give no member: they hold none (only directories, a
# symlink, MAPI properties). Each must still parse cleanly (no error flag).
EMPTY = {
    "7z/libarchive__test_read_format_7zip_empty_archive.7z": "an empty 7z",
    "7z/py7zr__empty.7z": "an empty 7z",
    "iso/libarchive__test_read_format_iso.iso": "only the root directory",
    "lha-lzh/lhasa__lha_unix114i__h2_symlink.lzh": "only a symlink: its target is a part flagged link, never followed",
    "tar/libarchive__test_read_format_tar_empty_filename.tar": "only the directory ./",
    "zip/libarchive__test_read_format_zip_jar.jar": "only the directory somedir/",
    "tnef/tnef__multi-name-property.tnef": "MAPI properties only, no attachment",
}
# Samples nothing here can open: they must then be scanned as they are.
ALONE = {
    "7z/split/py7zr__archive.7z.001": "first piece of a split 7z: its header is in the last",
    "7z/split/py7zr__archive.7z.002": "second piece of a split 7z: no signature header",
    "zip/split/clamav-upstream__logos.zip": "last piece of a spanned zip: starts mid-member",
    "cab/multi/libarchive__cab_multi.p2.cab": "its one file begins in p1.cab (cabextract: "
                                              "'cabinet set is incomplete')",
    "lha-lzh/lhasa__unlha32__lh3.lzh": "-lh3-: lhasa (CRC error), unar and 7zz all fail",
    "rpm/libarchive__test_read_format_huge_rpm.rpm": "declares 2^31 signature tags: rpm(8) "
                                                     "refuses it too ('not an rpm package')",
}
# Known decoder/detection gaps, reported to the lead: strict xfail, so the
# day one is fixed the test says so and the entry goes.
KNOWN_GAPS: dict[str, str] = {}
# Carry a test virus, but in a format no AMaViS decoder opens (MANIFEST: other/).
SIGNATURE_NOT_REQUIRED = {"other/clamav__clam.chm", "other/clamav__clam.exe.szdd",
                          "other/clamav__clam.sis"}


def cases(rels: list[str]) -> list:
    return [pytest.param(rel, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[rel]))
            if rel in KNOWN_GAPS else rel for rel in rels]


def listed(*folders: str, exclude: set[str] = frozenset()) -> list[str]:
    if not ARCHIVES.is_dir():
        return []
    tops = folders or sorted(p.name for p in ARCHIVES.iterdir() if p.is_dir())
    return sorted(str(p.relative_to(ARCHIVES)) for top in tops if top not in exclude
                  for p in (ARCHIVES / top).rglob("*") if p.is_file())


def signature_samples() -> list[str]:
    """archives/ files the MANIFEST lists under 'All files with a test signature'."""
    manifest = ARCHIVES.parent / "MANIFEST.md"
    if not manifest.is_file():
        return []
    section = manifest.read_text().split("## All files with a test signature", 1)[-1]
    return sorted(set(re.findall(r"^- `archives/([^`]+)`", section, re.M))
                  - SIGNATURE_NOT_REQUIRED)


@pytest.fixture(scope="module")
def pipeline(clamd_nodecomp):
    return Pipeline(configuration.load(None, {"clamd": clamd_nodecomp.address}))


def attached_name(sample: Path) -> str:
    return sample.name.split("__", 1)[-1]  # the upstream name, as a sender would call it


def scan_attached(pipeline: Pipeline, sample: Path, tmp_path: Path):
    path = tmp_path / "msg.eml"
    path.write_bytes(as_attachment(sample.read_bytes(), attached_name(sample)))
    return pipeline.process(Job(log_id="corpus", mail_path=str(path)))


def decoder_crashes(caplog) -> list[str]:
    """The engine turns a decoder's unexpected exception into a flag and a
    warning; for these tests such a crash is a bug, so it is looked for."""
    return [r.getMessage() for r in caplog.records
            if r.name == "amavisd.decode" and "failed on" in r.getMessage()]


# -- every sample opens -------------------------------------------------------

@pytest.mark.parametrize("rel", cases(listed(exclude=SPECIAL | NOT_REQUIRED)))
def test_sample_opens(corpus, tmp_path, caplog, rel):
    result = decompose((corpus / "archives" / rel).read_bytes(), tempbase=str(tmp_path),
                       bare_file=True)
    try:
        root = result.root
        if rel in EMPTY:
            assert not [c for c in root.children if "link" not in c.flags] \
                and not root.flags & {"decode-error", "truncated"}, \
                f"{root.detected}: {sorted(root.flags)}"
        elif rel in ALONE:
            assert root in result.scannable(), "an unopened piece must be scanned as it is"
        else:
            assert root.children, (f"{rel} ({root.detected or 'undetected'}) gave no member; "
                                   f"flags {sorted(root.flags)}, {result.unchecked}")
        assert decoder_crashes(caplog) == []
    finally:
        result.cleanup()


def test_exceptions_are_real_files(corpus):
    missing = [rel for rel in [*EMPTY, *ALONE, *KNOWN_GAPS, *SIGNATURE_NOT_REQUIRED]
               if not (corpus / "archives" / rel).is_file()]
    assert missing == []
    assert len(signature_samples()) >= 25


# -- test viruses are found -----------------------------------------------------

@pytest.mark.parametrize("rel", cases(signature_samples()))
def test_signature_sample_is_infected(pipeline, corpus, tmp_path, rel):
    result = scan_attached(pipeline, corpus / "archives" / rel, tmp_path)
    assert result.verdict == "INFECTED", result.summary()
    # the first part so named, walking down: members may repeat the name (eicar.bz)
    attached = next(p for p in result.tree.walk()
                    if p.name == attached_name(corpus / "archives" / rel))
    found = {f.part for f in result.findings}
    assert any(path.startswith(attached.path + "/") for path in found), \
        f"only the attachment itself was flagged, not a member: {found}"


# -- encrypted: UNCHECKED, never CLEAN --------------------------------------------

@pytest.mark.parametrize("rel", listed("encrypted"))
def test_encrypted_sample_is_unchecked(pipeline, corpus, tmp_path, rel):
    result = scan_attached(pipeline, corpus / "archives" / rel, tmp_path)
    assert result.verdict == "UNCHECKED", result.summary()
    assert any(reason.kind == "encrypted" for reason in result.unchecked), result.unchecked


# -- corrupt: no exception ----------------------------------------------------------

@pytest.mark.parametrize("rel", listed("corrupt"))
def test_corrupt_sample_raises_nothing(corpus, tmp_path, caplog, rel):
    started = time.monotonic()
    result = decompose((corpus / "archives" / rel).read_bytes(), tempbase=str(tmp_path),
                       bare_file=True)
    parts = list(result.root.walk())
    result.cleanup()
    assert parts[0] is result.root
    assert decoder_crashes(caplog) == []
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == [], "the work dir was not cleaned up"


# -- bombs: UNCHECKED, in seconds, in bounded memory --------------------------------

BOMB_SECONDS = 10
BOMB_MIB = 200
# Run in a child so its peak RSS is its own: growth over the imports is what
# decoding the bomb cost; RUSAGE_CHILDREN is the biggest external unpacker.
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (a
# pytest grown by the whole suite), which would hide the growth.
DECODE_ONE = """
import json, resource, sys, time
from amavisd.decode.engine import decompose
def hwm_kib():
    return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
data = open(sys.argv[1], "rb").read()
before = hwm_kib()
started = time.monotonic()
result = decompose(data, tempbase=sys.argv[2], bare_file=True)
elapsed = time.monotonic() - started
grown = hwm_kib() - before
tool = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
result.cleanup()
print(json.dumps({"seconds": elapsed, "grown_mib": grown / 1024, "tool_mib": tool / 1024,
                  "unchecked": result.unchecked}))
"""


def decode_in_child(sample: Path, tempbase: Path) -> dict:
    tempbase.mkdir()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", DECODE_ONE, str(sample), str(tempbase)],
                          capture_output=True, text=True, timeout=BOMB_SECONDS * 6, cwd=REPO)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    report = json.loads(proc.stdout.splitlines()[-1])
    report["wall"] = time.monotonic() - started
    report["left"] = [p.name for p in tempbase.iterdir()]
    return report


@pytest.fixture(scope="module")
def bomb_reports(tmp_path_factory) -> dict[str, dict]:
    """Every bomb decoded once, two at a time (the machine has two cores)."""
    bombs = listed("bombs")
    if not bombs:
        pytest.skip(f"no bombs under {ARCHIVES}")
    base = tmp_path_factory.mktemp("bombs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = pool.map(lambda n_rel: decode_in_child(ARCHIVES / n_rel[1],
                                                         base / f"t{n_rel[0]}"),
                           enumerate(bombs))
        return dict(zip(bombs, reports, strict=True))


@pytest.mark.parametrize("rel", listed("bombs"))
def test_bomb_is_unchecked_fast_and_small(bomb_reports, rel):
    report = bomb_reports[rel]
    assert "error" not in report, report.get("error")
    print(f"{rel}: {report['seconds']:.2f}s, +{report['grown_mib']:.0f} MiB, "
          f"tool {report['tool_mib']:.0f} MiB")
    assert report["unchecked"], "a bomb must leave the message UNCHECKED"
    assert report["seconds"] < BOMB_SECONDS
    assert report["grown_mib"] < BOMB_MIB, "our process grew too much"
    assert report["tool_mib"] < BOMB_MIB, "an external unpacker used too much memory"
    assert report["left"] == [], "the work dir was left behind"


def fan_out_zip_bomb(work: Path, layers: int = 4, fan: int = 16, leaf_mib: int = 256) -> Path:
    """A 42.zip-like bomb made by the real zip: `fan` copies of the layer below
    in each of `layers` zips over one zip of `leaf_mib` MiB of zeros (16^4 x
    256 MiB = 16 TiB here). Deflate output of zeros deflates again, so each
    layer stays small; the corpus has no 42.zip. The copies are named .bin:
    zip stores members named .zip without compressing them."""
    work.mkdir()
    zeros = work / "0.dat"
    with open(zeros, "wb") as fh:
        fh.truncate(leaf_mib << 20)  # sparse: no disk needed to read zeros
    subprocess.run(["zip", "-q", "-j", str(work / "l0.zip"), str(zeros)], check=True)
    zeros.unlink()
    for layer in range(1, layers + 1):
        below = work / f"l{layer - 1}.zip"
        names = []
        for n in range(fan):
            copy = work / f"{n:x}.bin"
            copy.write_bytes(below.read_bytes())
            names.append(copy.name)
        subprocess.run(["zip", "-q", f"l{layer}.zip", *names], cwd=work, check=True)
        for name in names:
            (work / name).unlink()
        assert (work / f"l{layer}.zip").stat().st_size < 1 << 20, "a layer did not compress"
    return work / f"l{layers}.zip"


@pytest.mark.parametrize("leaf_mib", [256, 1])  # few huge leaves; 65,536 small ones
def test_generated_42_zip_like_nest_is_unchecked_fast_and_small(tmp_path, leaf_mib):
    bomb = fan_out_zip_bomb(tmp_path / "make", leaf_mib=leaf_mib)
    report = decode_in_child(bomb, tmp_path / "t")
    assert "error" not in report, report.get("error")
    print(f"42.zip-like ({bomb.stat().st_size} B): {report['seconds']:.2f}s, "
          f"+{report['grown_mib']:.0f} MiB")
    assert report["unchecked"], "a bomb must leave the message UNCHECKED"
    assert report["seconds"] < BOMB_SECONDS
    assert report["grown_mib"] < BOMB_MIB
    assert report["left"] == [], "the work dir was left behind"


# -- path traversal: nothing lands outside the work dir ---------------------------

# Where the samples' members try to go (lsar lists them): /tmp/evil.txt,
# /tmp/absolute_path.txt, ../evil1.txt, foo/../../evil2.txt, etc -> ../../etc/ or
# /tmp/ then etc/passwd, up -> .. then up/pwned.txt, ..\\..\\Temp\\evil.txt.
ESCAPE_NAMES = ("evil.txt", "absolute_path.txt", "evil1.txt", "evil2.txt", "pwned.txt",
                "passwd", "Temp", "etc", "up", "good.txt")
SPILL_OR_SCRATCH = re.compile(r"s?p\d+|xp\d+-.+")  # spill files and scratch dirs


def tree_listing(top: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under `top` but `skip`, with what would show a write through it."""
    seen = {}
    for dirpath, dirs, files in os.walk(top):
        if Path(dirpath) == skip:
            dirs[:] = []
            continue
        for name in dirs + files:
            if Path(dirpath, name) == skip:  # its own mtime moves: the work dir is made in it
                continue
            st = os.lstat(os.path.join(dirpath, name))
            seen[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def watched(places: list[Path]) -> dict[str, tuple | None]:
    out = {}
    for place in places:
        for name in ESCAPE_NAMES:
            try:
                st = os.lstat(place / name)
                # a directory's mtime moves with anything else written in it (/etc)
                out[str(place / name)] = (st.st_ino, st.st_mode) if stat.S_ISDIR(st.st_mode) \
                    else (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                out[str(place / name)] = None
    return out


@pytest.mark.parametrize("rel", listed("path-traversal"))
def test_traversal_sample_stays_in_the_work_dir(corpus, tmp_path, rel):
    top = tmp_path / "top"
    tempbase = top / "a" / "b" / "c" / "tempbase"  # deep, so ../../.. lands in `top`
    tempbase.mkdir(parents=True)
    sentinel = tempbase.parent / "sentinel"
    sentinel.mkdir()
    (sentinel / "passwd").write_bytes(b"sentinel: must not be read or changed\n")
    os.symlink(sentinel, tempbase.parent / "etc")  # a ready-made target for etc -> ../etc
    outside = [Path("/tmp"), Path("/"), Path.cwd(), Path.home()]
    before, before_watched = tree_listing(top, tempbase), watched(outside)
    passwd_before = os.stat("/etc/passwd").st_mtime_ns

    result = decompose((corpus / "archives" / rel).read_bytes(), tempbase=str(tempbase),
                       bare_file=True)
    try:
        workdirs = list(tempbase.iterdir())
        assert all(p.name.startswith("amavisd-") for p in workdirs), workdirs
        for workdir in workdirs:  # members never sit at the work dir's top as files
            strays = [p.name for p in workdir.iterdir()
                      if not SPILL_OR_SCRATCH.fullmatch(p.name)]
            assert strays == [], f"{strays} written beside the scratch dirs"
        parts = list(result.root.walk())
    finally:
        result.cleanup()

    assert tree_listing(top, tempbase) == before, "something was written outside the tempbase"
    assert watched(outside) == before_watched, "something was written in a shared place"
    assert os.stat("/etc/passwd").st_mtime_ns == passwd_before
    assert list(tempbase.iterdir()) == []
    for part in parts:  # no link was followed to read what lies outside
        assert not part.name.startswith("/") and ".." not in part.name.split("/"), part.name
        assert b"sentinel: must not" not in part.head(), f"{part.path} read through a link"
        assert not part.head().startswith(b"root:"), f"{part.path} read /etc/passwd"
    # Fail closed: the member that tried to escape is not dropped but kept
    # and scanned, like every other; bsdtar's listing says what is there.
    missing = Counter(listed_file_sizes(corpus / "archives" / rel)) - Counter(
        p.size for p in parts[1:] if "link" not in p.flags)
    assert not missing, f"members of these sizes were not kept for scanning: {dict(missing)}"


def listed_file_sizes(sample: Path) -> list[int]:
    """The sizes of the regular files libarchive lists in `sample`."""
    if shutil.which("bsdtar") is None:
        pytest.skip("bsdtar (libarchive-tools) not installed")
    out = subprocess.run(["bsdtar", "-tvf", str(sample)], capture_output=True, text=True,
                         timeout=30).stdout
    sizes = [int(line.split()[4]) for line in out.splitlines() if line.startswith("-")]
    assert sizes, f"bsdtar lists no file in {sample.name}"
    return sizes


# -- every bomb and traversal sample: the fuzz targets' invariants -------------

@pytest.mark.parametrize("rel", listed("bombs", "path-traversal"))
def test_hostile_sample_meets_the_fuzz_invariants(corpus, rel):
    """What each fuzz input must satisfy (tests/fuzz/harness.check): no
    exception, no link made on disk, nothing outside the work dir, output
    within the limits, bounded time; a bomb leaves the message UNCHECKED."""
    unchecked = check((corpus / "archives" / rel).read_bytes(), bare=True)
    if rel.startswith("bombs/"):
        assert {reason.kind for reason in unchecked} & {"limit", "undecipherable"}, unchecked
