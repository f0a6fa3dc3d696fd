"""Issue 4 acceptance: EICAR inside archives made by the real archivers, attached
to a mail, found by a real clamd that opens no archive itself (clamd_nodecomp).

A hit alone proves little (clamd's body signature finds EICAR in a stored tar
too), so each test also checks WHERE: the infected part holds EICAR itself and
lies below the attachment, i.e. our decoder opened the archive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.decode.parts import Part
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing.eicar import EICAR
from tests.rigs import archivers

pytestmark = pytest.mark.integration

FORMATS = sorted(archivers.BUILDERS) + sorted(archivers.NO_CREATOR)
# What `detect.sniff` calls the outermost layer of each fixture.
KIND = {"zip": "zip", "7z": "7z", "tar": "tar", "tgz": "gzip", "tar.bz2": "bzip2",
        "tar.xz": "xz", "gz": "gzip", "bz2": "bzip2", "xz": "xz", "lzma": "lzma",
        "zst": "zstd", "lz4": "lz4", "lz": "lzip", "Z": "compress", "arj": "arj",
        "lha": "lha", "arc": "arc", "cab": "cab", "cpio": "cpio", "ar": "ar", "deb": "ar",
        "rpm": "rpm", "iso": "iso"}
# Layers that must be opened on the way to EICAR, where more than the outer one.
INNER = {"tgz": ["tar"], "tar.bz2": ["tar"], "tar.xz": ["tar"], "deb": ["tar"]}
# One member a layer, each format once: the deepest nest the fixtures allow.
# The attachment is at depth 1, so 18 layers put EICAR at depth 19 (< max_depth 20).
DEEP_NEST = ["zip", "7z", "tar", "gz", "cab", "arj", "cpio", "bz2", "lha", "xz",
             "arc", "Z", "ar", "zst", "lz4", "lz", "lzma", "iso"]
TEN_FORMATS = DEEP_NEST[:10]
README = b"Quarterly figures attached, see the sheet.\n" * 20


@pytest.fixture(scope="module")
def pipeline(clamd_nodecomp):
    return Pipeline(configuration.load(None, {"clamd": clamd_nodecomp.address}))


def scan(pipeline: Pipeline, raw: bytes, tmp_path: Path):
    path = tmp_path / "msg.eml"
    path.write_bytes(raw)
    return pipeline.process(Job(log_id="arc-01", mail_path=str(path)))


def need(*formats: str) -> None:
    for fmt in formats:
        reason = archivers.available(fmt)
        if reason:
            pytest.skip(reason)


def payload(fmt: str, infected: bool) -> dict[str, bytes]:
    inner = {"eicar.com": EICAR} if infected else {"notes.txt": README}
    if fmt in archivers.SINGLE_STREAM:
        return inner
    return {"readme.txt": README, **inner}


def attachment(result, filename: str) -> Part:
    (part,) = [p for p in result.tree.walk() if p.name == filename]
    return part


def ancestors(part: Part) -> list[Part]:
    chain = []
    while part.parent is not None:
        part = part.parent
        chain.append(part)
    return chain


def eicar_parts_below(result, archive: Part) -> list[Part]:
    """Parts clamd flagged that hold EICAR itself and descend from `archive`."""
    infected = {f.part for f in result.findings}
    return [p for p in result.parts
            if p.path in infected and p.read() == EICAR and archive in ancestors(p)]


def assert_opened(result, filename: str, layers: list[str]) -> None:
    """INFECTED, and EICAR sits below the attachment, under each of `layers`."""
    assert result.verdict == "INFECTED", result.summary()
    archive = attachment(result, filename)
    found = eicar_parts_below(result, archive)
    assert found, f"EICAR not found inside {filename}: {result.summary()} at " \
                  f"{[f.part for f in result.findings]}, attachment {archive.path}"
    below = [p for p in reversed(ancestors(found[0])) if p is archive or archive in ancestors(p)]
    kinds = [p.detected for p in below]
    for kind in layers:
        assert kind in kinds, f"no {kind} layer on the way to EICAR: {kinds}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_eicar_in_archive_is_infected(pipeline, tmp_path, fmt):
    need(fmt)
    data = archivers.build(fmt, payload(fmt, infected=True), tmp_path)
    filename = f"sample.{archivers.EXTENSIONS[fmt]}"
    result = scan(pipeline, archivers.as_attachment(data, filename), tmp_path)
    assert_opened(result, filename, [KIND[fmt], *INNER.get(fmt, [])])
    assert attachment(result, filename).detected == KIND[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_look_alike_is_clean(pipeline, tmp_path, fmt):
    need(fmt)
    data = archivers.build(fmt, payload(fmt, infected=False), tmp_path)
    filename = f"sample.{archivers.EXTENSIONS[fmt]}"
    result = scan(pipeline, archivers.as_attachment(data, filename), tmp_path)
    assert result.verdict == "CLEAN", result.summary()
    archive = attachment(result, filename)
    assert archive.children, f"{fmt} archive was not opened"
    assert not archive.flags & {"decode-error", "truncated"}, archive.flags


def test_ten_formats_nested_is_infected(pipeline, tmp_path):
    need(*TEN_FORMATS)
    data = archivers.chain(TEN_FORMATS, {"eicar.com": EICAR}, tmp_path)
    result = scan(pipeline, archivers.as_attachment(data, "nest.xz"), tmp_path)
    assert_opened(result, "nest.xz", [KIND[f] for f in TEN_FORMATS])
    (found,) = eicar_parts_below(result, attachment(result, "nest.xz"))
    assert found.depth == 1 + len(TEN_FORMATS)


def test_deepest_nest_of_distinct_formats_is_infected(pipeline, tmp_path):
    nest = [f for f in DEEP_NEST if not archivers.available(f)]
    if len(nest) < 11:
        pytest.skip(f"only {len(nest)} formats can be made here")
    data = archivers.chain(nest, {"eicar.com": EICAR}, tmp_path)
    filename = f"nest.{archivers.EXTENSIONS[nest[-1]]}"
    result = scan(pipeline, archivers.as_attachment(data, filename), tmp_path)
    assert_opened(result, filename, [KIND[f] for f in nest])
    assert not result.unchecked, result.unchecked


@pytest.mark.parametrize("fmt", sorted(archivers.ENCRYPTED))
def test_encrypted_archive_is_unchecked(pipeline, tmp_path, fmt):
    need(fmt)
    data = archivers.build_encrypted(fmt, {"readme.txt": README, "eicar.com": EICAR}, tmp_path)
    filename = f"secret.{fmt}"
    result = scan(pipeline, archivers.as_attachment(data, filename), tmp_path)
    assert result.verdict == "UNCHECKED", result.summary()
    assert any("encrypted" in reason for reason in result.unchecked), result.unchecked
    assert any("encrypted" in p.flags for p in attachment(result, filename).walk())


# -- issue 10: EICAR hidden by damage or by a reader's failure ----------------------------
# A clamd that opens nothing must still see EICAR, or the message is UNCHECKED; never CLEAN.

def _bad_check(fmt: str, tmp_path: Path) -> bytes:
    need(fmt)
    return archivers.with_bad_check(fmt, archivers.build(fmt, {"invoice.txt": EICAR}, tmp_path))


def _zip(members: dict[str, bytes], method: int = 0) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def _shadowed_7z(tmp_path: Path) -> bytes:
    need("7z")
    return archivers.build_7z_shadowed({}, {"docs/invoice.txt": EICAR}, tmp_path,
                                       links={"docs": "/etc"}, method="PPMd")


# name -> (fixture maker, what the verdict must be): INFECTED where the bytes can be
# produced (a failed check, a second reading gives them), else UNCHECKED
HIDDEN = {
    **{f"{fmt} with a bad check": (lambda tmp, fmt=fmt: _bad_check(fmt, tmp), "INFECTED")
       for fmt in sorted(archivers.CHECK_BYTE)},
    "7z link shadowing docs/": (_shadowed_7z, "INFECTED"),
    # deflated bytes under another method number: no EICAR in the zip's own bytes
    "zip member of method 97": (
        lambda tmp: archivers.zip_with_method(_zip({"a.txt": README, "e.txt": EICAR}, 8), 1,
                                              97), "UNCHECKED"),
    "zip member of an unknown method": (
        lambda tmp: archivers.zip_with_method(_zip({"e.com": EICAR}, 8), 0, 200), "UNCHECKED"),
    "zip local header says deflate": (
        lambda tmp: archivers.zip_with_method(_zip({"e.com": EICAR}, 8), 0, 0, local=False),
        "INFECTED"),
    "zip member with a local header only": (
        lambda tmp: archivers.zip_without_entry(_zip({"a.txt": README, "e.com": EICAR}, 8), 1),
        "INFECTED"),
}


@pytest.mark.parametrize("case", sorted(HIDDEN))
def test_eicar_hidden_by_damage_is_never_clean(pipeline, tmp_path, case):
    make, verdict = HIDDEN[case]
    result = scan(pipeline, archivers.as_attachment(make(tmp_path), "files.bin"), tmp_path)
    assert result.verdict == verdict, result.summary()
    if verdict == "UNCHECKED":
        assert [reason.kind for reason in result.unchecked] == ["undecipherable"]
    else:  # found in a part our decoding produced, not in the attachment's own bytes
        attached = next(p for p in result.tree.walk() if p.name == "files.bin")
        assert eicar_parts_below(result, attached), result.summary()
