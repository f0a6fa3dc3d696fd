"""tar, cpio, ar/deb, rpm and ISO 9660: the corpus, and fixtures made with the real tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from amavisd.testing.eicar import CLAM_EXE_PATH
from tests.unit.decoding import cleanup_decoded, decode_bare  # noqa: F401 (fixture)

FOLDERS = {"tar": "tar", "cpio": "cpio", "deb-ar": "ar", "rpm": "rpm", "iso": "iso"}
# Corpus samples with no member to give (an empty image, a tar holding one directory).
NO_MEMBERS = {"libarchive__test_read_format_iso.iso",
              "libarchive__test_read_format_tar_empty_filename.tar"}
# A header declaring 2^31 index entries: refused before anything is read.
REFUSED = {"libarchive__test_read_format_huge_rpm.rpm"}
TEXT = b"".join(b"line %d of a member\n" % i for i in range(300))


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def run(argv: list[str], cwd: Path, **kwargs) -> bytes:
    return subprocess.run(argv, cwd=cwd, capture_output=True, check=True, **kwargs).stdout


def decoded(data: bytes):
    dec = decode_bare(data)
    return dec, dec.root


def members(part) -> dict[str, bytes]:
    """The members with data of their own (links' targets apart: links())."""
    return {child.name: child.read() for child in part.children if "link" not in child.flags}


def links(part) -> dict[str, bytes]:
    """Symlinks: a part holding the target, flagged, never followed."""
    return {child.name: child.read() for child in part.children if "link" in child.flags}


def find(part, kind: str):
    return next(p for p in part.walk() if p.detected == kind)


def clam_exe() -> bytes:
    if not os.path.exists(CLAM_EXE_PATH):
        pytest.skip("clamav-testfiles not installed")
    return Path(CLAM_EXE_PATH).read_bytes()


# --- the corpus ----------------------------------------------------------------------------

def corpus_samples(corpus: Path) -> list[tuple[Path, str]]:
    samples = []
    for folder, kind in FOLDERS.items():
        for path in sorted((corpus / "archives" / folder).iterdir()):
            samples.append((path, "compress" if path.suffix == ".Z" else
                            "gzip" if path.suffix == ".gz" else kind))
    return samples


def test_every_corpus_sample_opens(corpus):
    for path, kind in corpus_samples(corpus):
        started = time.monotonic()
        dec, root = decoded(path.read_bytes())
        assert time.monotonic() - started < 5, path.name
        assert root.detected == kind, path.name
        archive = root if kind in FOLDERS.values() else root.children[0]
        wanted = {"compress": "iso", "gzip": "tar"}.get(kind, kind)
        assert archive.detected == wanted, path.name
        assert ("decode-error" in archive.flags) == (path.name in REFUSED), path.name
        if path.name not in NO_MEMBERS | REFUSED:
            assert archive.children, path.name
        assert not dec.unchecked, (path.name, dec.unchecked)
        dec.cleanup()


def test_corpus_huge_rpm_header_is_refused_not_read(corpus):
    dec, root = decoded((corpus / "archives/rpm/libarchive__test_read_format_huge_rpm.rpm")
                        .read_bytes())
    assert root.detected == "rpm" and "decode-error" in root.flags and not root.children


@pytest.mark.parametrize("name", ["clamav__clam.bin-be.cpio", "clamav__clam.bin-le.cpio",
                                  "clamav__clam.newc.cpio", "clamav__clam.odc.cpio"])
def test_corpus_cpio_formats_hold_clam_exe(corpus, name):
    _, root = decoded((corpus / "archives/cpio" / name).read_bytes())
    assert members(root) == {"clam.exe": clam_exe()} and root.expanded


@pytest.mark.parametrize("folder, name, expected", [
    ("tar", "patool__t.tar", {"t/t.txt": b"42"}),
    ("tar", "libarchive__test_read_format_tar_concatenated.tar", {"file1": b"", "file2": b""}),
    ("tar", "sflock__tar_noext", {"foo/bar.txt": b"hello world\n"}),
    ("cpio", "libarchive__test_read_format_cpio_bin_be.cpio",
     {"file1111222233334444": b"abcde"}),
    ("cpio", "libarchive__test_read_format_cpio_filename_utf8_ru.cpio",
     {"ПРИВЕТ": "ПРИВЕТ".encode("koi8-r"), "привет": "ПРИВЕТ".encode("koi8-r")}),
    ("deb-ar", "libarchive__test_read_format_ar.ar",
     {"yyytttsssaaafff.o": b"55667788", "gghh.o": b"3333", "hhhhjjjjkkkkllll.o": b"987654321"}),
    ("deb-ar", "patool__t.txt.a", {"t.txt": b"42"}),
])
def test_corpus_member_names_and_bytes(corpus, folder, name, expected):
    _, root = decoded((corpus / "archives" / folder / name).read_bytes())
    got = members(root)
    assert {k: got[k] for k in expected} == expected and set(got) == set(expected)
    assert root.expanded


def test_corpus_gnu_and_bsd_ar_agree(corpus):
    gnu = members(decoded((corpus / "archives/deb-ar/recursiveextractor__TestData.a")
                          .read_bytes())[1])
    bsd = members(decoded((corpus / "archives/deb-ar/recursiveextractor__TestData.bsd.ar")
                          .read_bytes())[1])
    assert gnu == bsd and set(gnu) == {"Lorem.txt", "Ipsum.txt", "Dolor.txt"}


def test_corpus_gtar_long_name_and_sparse_files(corpus):
    _, root = decoded((corpus / "archives/tar/libarchive__test_compat_gtar_1.tar").read_bytes())
    assert [len(n) for n in members(root)] == [200]
    assert [len(target) for target in links(root).values()] == [200]  # the symlink's target
    need("tar")
    path = corpus / "archives/tar/libarchive__test_read_format_gtar_sparse_1_17_posix10.tar"
    dec, root = decoded(path.read_bytes())
    got = members(root)
    assert got["sparse"] == run(["tar", "-xOf", str(path), "sparse"], path.parent)
    assert len(got["sparse2"]) == 99000001 and got["non-sparse"] == b""
    dec.cleanup()


def test_corpus_debs_decode_down_to_their_files(corpus):
    _, root = decoded((corpus / "archives/deb-ar/recursiveextractor__sysvbanner_1.0-17fakesync1"
                       "_amd64.deb").read_bytes())
    assert list(members(root)) == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    names = {p.name: p for p in root.walk()}
    assert names["usr/bin/banner"].detected == "elf" and "control" in names


def test_corpus_rpm_payloads_match_rpm2cpio(corpus):
    need("rpm2cpio", "cpio")
    for path in sorted((corpus / "archives/rpm").glob("*.rpm")):
        if "huge" in path.name:
            continue
        listing = subprocess.run(f"rpm2cpio '{path}' | cpio -it --quiet", shell=True,
                                 capture_output=True, check=True, text=True).stdout.split()
        _, root = decoded(path.read_bytes())
        cpio = find(root, "cpio")
        assert [c.name for c in cpio.children] == [n.removeprefix("./") for n in listing]
        assert root.expanded and [c.name for c in root.children] == ["header", "payload"]


def test_corpus_iso_names_and_data(corpus):
    clam = clam_exe()
    iso = corpus / "archives/iso"
    assert members(decoded((iso / "clamav-upstream__clam.iso").read_bytes())[1]) == \
        {"DIR/CLAM.EXE": clam}
    assert members(decoded((iso / "clamav-upstream__clamjol.iso").read_bytes())[1]) == \
        {"long_dir_is_long/clam_exe_with_a_long_name.exe": clam}
    rock = members(find(decoded((iso / "libarchive__test_read_format_iso_rockridge.iso.Z")
                                .read_bytes())[1], "iso"))
    assert set(rock) == {"file", "hardlink"}  # six symlinks give no part
    assert rock["file"] == rock["hardlink"] and rock["file"].startswith(b"hello\n")
    zisofs = members(find(decoded((iso / "libarchive__test_read_format_iso_zisofs.iso.Z")
                                  .read_bytes())[1], "iso"))
    assert zisofs["file"] == rock["file"]  # inflated, not the zisofs blocks
    multi = members(find(decoded((iso / "libarchive__test_read_format_iso_multi_extent.iso.Z")
                                 .read_bytes())[1], "iso"))["file"]
    assert len(multi) == 262280 and multi.startswith(b"head--") and multi.endswith(b"--tail")
    # a file only in the ISO 9660 tree, the Joliet tree empty: 7-Zip (Joliet) lists nothing
    hidden = members(decoded((iso / "clamav-upstream__iso_no_joliet.logo.iso").read_bytes())[1])
    logo = members(decoded((iso / "clamav-upstream__iso_normal.logo.iso").read_bytes())[1])
    assert hidden == {"EICAR.PNG": logo["logo.png"]}
    test_data = members(decoded((iso / "recursiveextractor__TestData.iso").read_bytes())[1])
    assert set(test_data) == {"TestData/Lorem.txt", "TestData/Foo/Ipsum.txt",
                              "TestData/Foo/Bar/Dolor.txt"}


@pytest.mark.parametrize("name", ["cpython__recursion.tar",
                                  "libarchive__test_read_format_tar_V_negative_size.tar",
                                  "libarchive__test_read_format_tar_invalid_pax_size.tar",
                                  "recursiveextractor__TestDataCorrupt.tar",
                                  "sflock__tar_garbage.tar"])
def test_corpus_corrupt_tars_never_raise(corpus, name):
    from amavisd.decode.limits import Limits
    from amavisd.decode.registry import REGISTRY, Context, DecodeError

    data = (corpus / "archives/corrupt" / name).read_bytes()
    ctx = Context(Limits(), len(data))
    part = ctx.new_part(data, detected="tar")  # forced: some are not even sniffed as tar
    try:
        REGISTRY["tar"](part, ctx)
    except DecodeError:
        assert not part.expanded
    else:
        assert part.children  # tar_garbage.tar: a tar member named garbage.tar
    finally:
        ctx.cleanup()


# --- fixtures made with the real tools ------------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Files of every kind: regular (one 150 chars deep), a symlink escaping,
    a hard link, an empty file, a FIFO, a directory."""
    root = tmp_path / "src"
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (root / "a.txt").write_bytes(TEXT)
    (root / "odd.bin").write_bytes(os.urandom(1001))
    (deep / "deep.txt").write_bytes(b"deep\n")
    (root / "empty").write_bytes(b"")
    (root / "ünïcode.txt").write_bytes(b"unicode\n")
    (root / "escape").symlink_to("/etc/passwd")
    os.link(root / "a.txt", root / "hard.txt")
    os.mkfifo(root / "fifo")
    return root


REGULAR = {"a.txt", "odd.bin", f"{'d' * 60}/{'e' * 60}/deep.txt", "empty", "ünïcode.txt"}


def expected_bytes(root: Path, names) -> dict[str, bytes]:
    return {n: (root / n).read_bytes() for n in names}


@pytest.mark.parametrize("fmt", ["gnu", "ustar", "pax", "v7", "oldgnu"])
def test_tar_formats(tree, fmt):
    need("tar")
    if fmt == "v7":  # v7 has no FIFOs and 100-char names
        (tree / "fifo").unlink()
        shutil.rmtree(tree / ("d" * 60))
    if fmt == "ustar":
        (tree / "fifo").unlink()
    data = run(["tar", f"--format={fmt}", "-cf", "-", "."], tree)
    _, root = decoded(data)
    got = members(root)
    regular = {n for n in REGULAR if (tree / n).exists()} - {"a.txt"}
    # one of the two hard-linked names carries the data, the other is a link: no part
    (linked,) = set(got) & {"a.txt", "hard.txt"}
    assert set(got) - {linked} == regular and got[linked] == TEXT
    assert links(root) == {"escape": b"/etc/passwd"}
    for name, data in expected_bytes(tree, regular).items():
        assert got[name] == data
    assert root.expanded and root.detected == "tar"


def test_tar_sparse_file(tmp_path):
    need("tar")
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as fh:
        fh.seek(3 << 20)
        fh.write(b"middle")
        fh.seek(6 << 20)
        fh.write(b"end")
    for fmt in ("gnu", "pax"):
        data = run(["tar", f"--format={fmt}", "--sparse", "-cf", "-", "sparse.img"], tmp_path)
        assert len(data) < 64 * 1024  # really stored sparse
        _, root = decoded(data)
        assert members(root) == {"sparse.img": sparse.read_bytes()}


def test_tar_truncated_member_keeps_what_was_read(tmp_path):
    need("tar")
    (tmp_path / "first.txt").write_bytes(b"first\n")
    (tmp_path / "second.bin").write_bytes(os.urandom(50_000))
    data = run(["tar", "-cf", "-", "first.txt", "second.bin"], tmp_path)
    dec, root = decoded(data[:30_000])
    got = {c.name: c for c in root.children}
    assert got["first.txt"].read() == b"first\n"
    assert "truncated" in got["second.bin"].flags and 0 < got["second.bin"].size < 50_000
    assert {"truncated", "decode-error"} <= root.flags and not root.expanded


def test_tar_garbage_between_members_is_skipped_and_reported(tmp_path):
    need("tar")
    for name in ("one", "two"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    one = run(["tar", "-cf", "-", "one"], tmp_path)
    two = run(["tar", "-cf", "-", "two"], tmp_path)
    body = one.rstrip(b"\0")
    body += bytes(-len(body) % 512) + b"\x99" * 1024 + two
    _, root = decoded(body)
    assert set(members(root)) == {"one", "two"}
    assert "decode-error" in root.flags and not root.expanded


def test_tar_oversized_pax_header_is_refused(tmp_path):
    import tarfile

    info = tarfile.TarInfo("x")
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[156:157] = b"x"  # a pax extended header ...
    header[124:136] = b"%011o\0" % (200 << 20)  # ... of 200 MiB
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    started = time.monotonic()
    _, root = decoded(bytes(header) + b"10 path=a\n" + bytes(1014))
    assert time.monotonic() - started < 1
    assert "decode-error" in root.flags and not root.children


def test_tar_hostile_names_are_labels(tmp_path):
    need("tar")
    (tmp_path / "x").write_bytes(b"payload")
    data = run(["tar", "-cf", "-", "-P", "--transform=s,^,../../../etc/,", "x"], tmp_path)
    _, root = decoded(data)
    assert members(root) == {"etc/x": b"payload"}


@pytest.mark.parametrize("fmt", ["newc", "odc", "bin", "crc"])
def test_cpio_formats(tree, fmt):
    need("cpio")
    names = run(["find", "."], tree)
    data = run(["cpio", "-o", "--quiet", "-H", fmt], tree, input=names)
    _, root = decoded(data)
    got = members(root)
    assert set(got) == REGULAR | {"hard.txt"}
    # newc/crc store a hard link's data once, with its last name; odc/bin with each
    assert TEXT in (got.pop("a.txt"), got.pop("hard.txt"))
    assert got == expected_bytes(tree, REGULAR - {"a.txt"})
    assert links(root) == {"escape": b"/etc/passwd"}
    assert root.expanded and root.detected == "cpio"


def test_cpio_truncated_and_concatenated(tmp_path):
    need("cpio")
    (tmp_path / "a").write_bytes(TEXT)
    (tmp_path / "b").write_bytes(b"bbb")
    one = run(["cpio", "-o", "--quiet", "-H", "newc"], tmp_path, input=b"a\n")
    two = run(["cpio", "-o", "--quiet", "-H", "odc"], tmp_path, input=b"b\n")
    _, root = decoded(one + two)
    assert members(root) == {"a": TEXT, "b": b"bbb"} and root.expanded
    _, root = decoded(one[:2000])
    (child,) = root.children
    assert child.name == "a" and "truncated" in child.flags and child.size == 2000 - 112
    assert "truncated" in root.flags and "decode-error" in root.flags


def newc_header(name: bytes, size: int, namesize: int | None = None) -> bytes:
    fields = (1, 0o100644, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize or len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    return header + bytes(-len(header) % 4)


@pytest.mark.parametrize("field", [b"-0000001", b"+0000010", b" 0000010", b"0000_010"])
def test_a_cpio_number_with_a_sign_space_or_underscore_is_a_bad_header(field):
    # Found by the mutation driver: int() took "-..." and the negative mode
    # or size broke the reader (OverflowError, negative seek) instead of
    # ending in a decode error.
    good = newc_header(b"a", 3) + b"abc\0"
    bad = good[:6 + 8] + field + good[6 + 16:]  # the mode field
    _, root = decoded(bad)
    assert "decode-error" in root.flags and not root.children


def test_cpio_and_ar_declared_sizes_are_bounded_by_the_data():
    started = time.monotonic()
    _, root = decoded(newc_header(b"big", 0xFFFFFFFF) + b"only this")
    (child,) = root.children
    assert child.read() == b"only this" and "truncated" in child.flags
    assert {"truncated", "decode-error"} <= root.flags
    _, root = decoded(newc_header(b"n", 1, namesize=0xFFFFFFF0) + b"x" * 100)
    assert "decode-error" in root.flags and not root.children
    ar = b"!<arch>\n" + ar_header(b"big/", 9999999999) + b"short"
    _, root = decoded(ar)
    (child,) = root.children
    assert child.read() == b"short" and {"truncated", "decode-error"} <= root.flags
    assert time.monotonic() - started < 1


def test_ar_long_names_and_odd_sizes(tmp_path):
    need("ar")
    files = {"short.o": b"x" * 7, "a_name_longer_than_sixteen.o": TEXT,
             "another_long_member_name.txt": b"odd"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    run(["ar", "rc", "lib.a", *files], tmp_path)
    _, root = decoded((tmp_path / "lib.a").read_bytes())
    assert members(root) == files and root.expanded


def ar_header(name: bytes, size: int) -> bytes:
    return b"%-16s%-12s%-6s%-6s%-8s%-10d`\n" % (name, b"0", b"0", b"0", b"644", size)


def test_bsd_ar_names_lead_the_data_and_count_in_the_padding():
    # GNU ar cannot write BSD names; "abc"+"xy" is 5 bytes, so a pad byte follows
    ar = b"!<arch>\n" + ar_header(b"#1/3", 5) + b"abcxy\n" + ar_header(b"#1/8", 10) + \
        b"long.txtzz"
    _, root = decoded(ar)
    assert members(root) == {"abc": b"xy", "long.txt": b"zz"} and root.expanded


def test_ar_truncated(tmp_path):
    need("ar")
    (tmp_path / "m.bin").write_bytes(os.urandom(5000))
    run(["ar", "rc", "lib.a", "m.bin"], tmp_path)
    _, root = decoded((tmp_path / "lib.a").read_bytes()[:3000])
    (child,) = root.children
    assert "truncated" in child.flags and {"truncated", "decode-error"} <= root.flags


def test_deb_built_with_dpkg_deb(tmp_path):
    need("dpkg-deb")
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(
        "Package: amtest\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.test>\n"
        "Description: test\n")
    (package / "usr/share/amtest").mkdir(parents=True)
    (package / "usr/share/amtest/hello.txt").write_bytes(TEXT)
    for compression in ("xz", "gzip", "zstd"):
        deb = tmp_path / f"t-{compression}.deb"
        run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(package),
             str(deb)], tmp_path)
        dec, root = decoded(deb.read_bytes())
        assert root.detected == "ar" and root.expanded
        (hello,) = [p for p in root.walk() if p.name == "usr/share/amtest/hello.txt"]
        assert hello.read() == TEXT and hello.depth == 3  # ar > data.tar.* > data.tar > file
        assert any(p.name == "control" for p in root.walk())
        dec.cleanup()


@pytest.mark.parametrize("payload", ["w9.gzdio", "w6.xzdio", "w19.zstdio", "w9.bzdio",
                                     "w6.lzdio"])
def test_rpm_built_with_rpmbuild(tmp_path, payload):
    need("rpmbuild")
    spec = tmp_path / "t.spec"
    spec.write_text(
        "Name: amtest\nVersion: 1.0\nRelease: 1\nSummary: t\nLicense: MIT\nBuildArch: noarch\n"
        "%description\nt\n%install\nmkdir -p %{buildroot}/usr/share/amtest\n"
        "printf 'hello rpm\\n' > %{buildroot}/usr/share/amtest/hello.txt\n"
        "%files\n/usr/share/amtest/hello.txt\n")
    try:
        run(["rpmbuild", "-bb", "--define", f"_topdir {tmp_path / 'top'}",
             "--define", f"_binary_payload {payload}", str(spec)], tmp_path)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"rpmbuild cannot write {payload}: {err.stderr[-200:]!r}")
    (rpm,) = (tmp_path / "top/RPMS/noarch").glob("*.rpm")
    _, root = decoded(rpm.read_bytes())
    assert root.detected == "rpm" and root.expanded
    (hello,) = [p for p in root.walk() if p.name == "usr/share/amtest/hello.txt"]
    assert hello.read() == b"hello rpm\n"
    assert find(root, "cpio").expanded


def test_rpm_truncated_payload(tmp_path, corpus):
    data = (corpus / "archives/rpm/patool__t.rpm").read_bytes()
    _, root = decoded(data[:-500])
    payload = root.children[1]
    assert payload.name == "payload" and payload.flags & {"truncated", "decode-error"}
    _, root = decoded(data[:1000])  # inside the main header
    assert {"truncated", "decode-error"} <= root.flags


def make_iso(tree: Path, *options: str) -> bytes:
    need("genisoimage")
    return run(["genisoimage", "-quiet", *options, "-o", "-", "."], tree)


def test_iso_rock_ridge_and_joliet_names(tree):
    (tree / "fifo").unlink()
    data = make_iso(tree, "-J", "-R")
    _, root = decoded(data)
    got = members(root)
    assert set(got) == REGULAR | {"hard.txt"}  # the symlink gives no part
    for name, content in expected_bytes(tree, REGULAR | {"hard.txt"}).items():
        assert got[name] == content, name


def test_iso_joliet_only_and_plain(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/A Long Name.txt").write_bytes(TEXT)
    joliet = members(decoded(make_iso(tmp_path / "src", "-J"))[1])
    assert joliet == {"A Long Name.txt": TEXT}
    plain = members(decoded(make_iso(tmp_path / "src"))[1])
    assert list(plain.values()) == [TEXT] and list(plain)[0].isupper()


def test_iso_hidden_sector_leaves_the_image_unexpanded(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src/f.txt").write_bytes(b"f\n")
    data = bytearray(make_iso(tmp_path / "src", "-R", "-J"))
    banner = data.find(b"MKI ", 17 * 2048)  # genisoimage's banner sector after the descriptors
    if banner > 0 and banner % 2048 == 0:
        data[banner:banner + 2048] = bytes(2048)
    _, root = decoded(bytes(data))
    assert root.expanded  # every other byte is accounted for
    data[-4096:-4096 + 5] = b"HIDE!"  # genisoimage's zero padding at the end
    _, root = decoded(bytes(data))
    assert not root.expanded and members(root) == {"f.txt": b"f\n"}


def test_iso_directory_loop_and_outside_extent(tmp_path):
    (tmp_path / "src/sub").mkdir(parents=True)
    (tmp_path / "src/sub/f.txt").write_bytes(b"f\n")
    data = bytearray(make_iso(tmp_path / "src"))
    root_extent = int.from_bytes(data[16 * 2048 + 158:16 * 2048 + 162], "little")
    sub = data.find(b"SUB", root_extent * 2048) - 33  # the SUB record in the root directory
    data[sub + 2:sub + 6] = root_extent.to_bytes(4, "little")  # SUB is now the root itself
    started = time.monotonic()
    _, root = decoded(bytes(data))
    assert time.monotonic() - started < 1 and not root.children
    data = bytearray(make_iso(tmp_path / "src"))
    record = data.find(b"F.TXT", root_extent * 2048) - 33
    data[record + 2:record + 6] = (10**6).to_bytes(4, "little")  # far beyond the image
    _, root = decoded(bytes(data))
    assert {"truncated", "decode-error"} <= root.flags
