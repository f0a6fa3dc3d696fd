"""Archive fixtures made at test time by the REAL archivers.

A decoder tested only on archives written by our own code proves little: the
bytes here come from zip, 7zz, arj, jlha, gcab, rpmbuild, ... as a sender's
machine would make them. `BUILDERS` maps a format name to
`builder(files, workdir) -> bytes`; each builder writes `files` (relative name
-> bytes) into a private dir under `workdir` and runs its tool with an argv
list (never a shell). `available(fmt)` says why a format cannot be made here
(a skip reason) or None. `chain()` nests formats, innermost first.

Shipped with the package because `make check` (tools/check.py) nests EICAR
in every format it can make here; what only the tests need (encrypted and
shadowed archives, byte surgery) is in the checkout's tests/rigs/archivers.py.

Never store the output in the repository: EICAR fixtures exist only at run time.
"""

from __future__ import annotations

import base64
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

Files = dict[str, bytes]
Builder = Callable[[Files, Path], bytes]

BUILDERS: dict[str, Builder] = {}
TOOLS: dict[str, tuple[str, ...]] = {}  # format -> programs it needs
EXTENSIONS: dict[str, str] = {}  # format -> file name suffix, for chain layers
# Formats no Debian 12 package can write; the shared corpus has real samples.
NO_CREATOR = {
    "zoo": "no zoo creator on Debian 12 (the corpus covers zoo)",
    "freeze": "no freeze creator on Debian 12 (the corpus covers .F)",
    "rar": "rar is non-free, no creator on Debian 12 (the corpus covers rar)",
}
TIMEOUT = 60  # seconds; rpmbuild and the Java jlha are the slow ones
# Formats that hold one stream, not named members: give them exactly one file.
SINGLE_STREAM = frozenset({"gz", "bz2", "xz", "lzma", "zst", "lz4", "lz", "Z"})


def builder(fmt: str, *tools: str, ext: str | None = None) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        BUILDERS[fmt] = fn
        TOOLS[fmt] = tools
        EXTENSIONS[fmt] = ext or fmt
        return fn

    return wrap


def available(fmt: str) -> str | None:
    """Why `fmt` cannot be built here (a pytest skip reason), or None."""
    if fmt in NO_CREATOR:
        return NO_CREATOR[fmt]
    if fmt not in BUILDERS:
        return f"no fixture builder for {fmt!r}"
    missing = [tool for tool in TOOLS[fmt] if shutil.which(tool) is None]
    return f"{fmt}: {', '.join(missing)} not installed" if missing else None


def build(fmt: str, files: Files, workdir: Path | str | None = None) -> bytes:
    """`fmt` made of `files`, in a throw-away dir under `workdir` (or /tmp)."""
    reason = available(fmt)
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="amfix", dir=workdir) as tmp:
        return BUILDERS[fmt](files, Path(tmp))


def chain(formats: list[str], files: Files, workdir: Path | str | None = None) -> bytes:
    """Nest `formats`, innermost first: chain(["zip", "gz"], f) is f.zip.gz.
    Each outer layer holds one member, the layer below, named layerN.<ext>."""
    data = build(formats[0], files, workdir)
    for n, fmt in enumerate(formats[1:], 1):
        data = build(fmt, {f"layer{n}.{EXTENSIONS[formats[n - 1]]}": data}, workdir)
    return data


# -- helpers -----------------------------------------------------------------

def _populate(files: Files, workdir: Path, sub: str = "in") -> tuple[Path, list[str]]:
    """Write `files` under workdir/sub; the sorted relative names are returned."""
    top = workdir / sub
    top.mkdir(mode=0o700)
    for name, data in files.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"fixture member name must be relative and plain: {name!r}")
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return top, sorted(files)


def _run(argv: list[str], cwd: Path, stdin: bytes | None = None,
         stdout: Path | None = None) -> None:
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C", "HOME": str(cwd),
           "TZ": "UTC"}
    out = open(stdout, "wb") if stdout else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, input=stdin, stdout=out,
                              stderr=subprocess.PIPE, timeout=TIMEOUT,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    finally:
        if stdout:
            out.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-500:]}")


def _one(files: Files, fmt: str) -> tuple[str, bytes]:
    if len(files) != 1:
        raise ValueError(f"{fmt} compresses one stream, got {len(files)} files")
    return next(iter(files.items()))


def _archive(argv_of: Callable[[str, list[str]], list[str]], files: Files, workdir: Path,
             out_name: str) -> bytes:
    """Run an archiver that takes `archive names...` in the dir holding the files."""
    top, names = _populate(files, workdir)
    out = workdir / out_name
    _run(argv_of(str(out), names), cwd=top)
    return out.read_bytes()


def _stream(argv: list[str], files: Files, workdir: Path, fmt: str) -> bytes:
    """Run a single-stream compressor `argv + [file]` writing to stdout."""
    name, _ = _one(files, fmt)
    top, _names = _populate(files, workdir)
    out = workdir / "out"
    _run(argv + ["--", name], cwd=top, stdout=out)
    return out.read_bytes()


# -- archivers ---------------------------------------------------------------

@builder("zip", "zip")
def make_zip(files: Files, workdir: Path, password: str | None = None) -> bytes:
    secret = ["-P", password] if password else []
    return _archive(lambda out, names: ["zip", "-q", "-X", *secret, out, "--", *names],
                    files, workdir, "out.zip")


@builder("7z", "7zz")
def make_7z(files: Files, workdir: Path, password: str | None = None) -> bytes:
    secret = [f"-p{password}", "-mhe=on"] if password else []
    return _archive(lambda out, names: ["7zz", "a", "-bd", "-y", *secret, out, "--", *names],
                    files, workdir, "out.7z")


def _tar(flag: str) -> Builder:
    def make(files: Files, workdir: Path) -> bytes:
        return _archive(lambda out, names: ["tar", "--format=gnu", flag, out, "--", *names],
                        files, workdir, "out.tar")
    return make


builder("tar", "tar")(_tar("-cf"))
builder("tgz", "tar", "gzip")(_tar("-czf"))
builder("tar.bz2", "tar", "bzip2")(_tar("-cjf"))
builder("tar.xz", "tar", "xz")(_tar("-cJf"))


@builder("gz", "gzip")
def make_gz(files: Files, workdir: Path) -> bytes:
    return _stream(["gzip", "-c", "-n"], files, workdir, "gz")  # -n: no name/time: reproducible


@builder("bz2", "bzip2")
def make_bz2(files: Files, workdir: Path) -> bytes:
    return _stream(["bzip2", "-c"], files, workdir, "bz2")


@builder("xz", "xz")
def make_xz(files: Files, workdir: Path) -> bytes:
    return _stream(["xz", "-c"], files, workdir, "xz")


@builder("lzma", "xz")
def make_lzma(files: Files, workdir: Path) -> bytes:
    return _stream(["xz", "--format=lzma", "-c"], files, workdir, "lzma")


@builder("zst", "zstd")
def make_zst(files: Files, workdir: Path) -> bytes:
    return _stream(["zstd", "-q", "-c"], files, workdir, "zst")


@builder("lz4", "lz4")
def make_lz4(files: Files, workdir: Path) -> bytes:
    name, _ = _one(files, "lz4")
    top, _names = _populate(files, workdir)
    _run(["lz4", "-q", "-f", name, "out.lz4"], cwd=top)  # lz4 takes no "--"
    return (top / "out.lz4").read_bytes()


@builder("lz", "lzip")
def make_lz(files: Files, workdir: Path) -> bytes:
    return _stream(["lzip", "-c"], files, workdir, "lz")


@builder("Z", "compress")
def make_z(files: Files, workdir: Path) -> bytes:
    # -f: write even when the output is not smaller (tiny fixtures)
    return _stream(["compress", "-c", "-f"], files, workdir, "Z")


@builder("arj", "arj")
def make_arj(files: Files, workdir: Path) -> bytes:
    return _archive(lambda out, names: ["arj", "a", "-y", "-i", out, *names],
                    files, workdir, "out.arj")


@builder("lha", "jlha", ext="lzh")
def make_lha(files: Files, workdir: Path) -> bytes:
    # lhasa's `lha` only extracts; jlha-utils (Java) is Debian's only LHA writer.
    # o5: -lh5-, the common method (jlha stores tiny files as -lh0- regardless).
    return _archive(lambda out, names: ["jlha", "ao5q", out, *names], files, workdir,
                    "out.lzh")


@builder("arc", "arc")
def make_arc(files: Files, workdir: Path) -> bytes:
    # SEA ARC keeps DOS 8.3 names, so members should have short names.
    return _archive(lambda out, names: ["arc", "anw", out, *names], files, workdir, "out.arc")


@builder("cab", "gcab")
def make_cab(files: Files, workdir: Path) -> bytes:
    return _archive(lambda out, names: ["gcab", "-c", "-z", out, *names], files, workdir,
                    "out.cab")


@builder("cpio", "cpio")
def make_cpio(files: Files, workdir: Path) -> bytes:
    top, names = _populate(files, workdir)
    listing = "".join(f"{n}\n" for n in names).encode()
    out = workdir / "out.cpio"
    _run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=top, stdin=listing, stdout=out)
    return out.read_bytes()


@builder("ar", "ar", ext="a")
def make_ar(files: Files, workdir: Path) -> bytes:
    if any("/" in n for n in files):
        raise ValueError("ar members are flat: no '/' in names")
    return _archive(lambda out, names: ["ar", "rcD", out, *names], files, workdir, "out.a")


@builder("deb", "dpkg-deb")
def make_deb(files: Files, workdir: Path) -> bytes:
    payload = {f"usr/share/amavisd-fixture/{n}": d for n, d in files.items()}
    top, _names = _populate(payload, workdir, "pkg")
    (top / "DEBIAN").mkdir()
    (top / "DEBIAN" / "control").write_text(
        "Package: amavisd-fixture\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Test <test@example.test>\nDescription: amavisd test fixture\n")
    out = workdir / "out.deb"
    _run(["dpkg-deb", "--root-owner-group", "--build", str(top), str(out)], cwd=workdir)
    return out.read_bytes()


RPM_SPEC = """\
Name: amavisd-fixture
Version: 1.0
Release: 1
Summary: amavisd test fixture
License: MIT
BuildArch: noarch
%global debug_package %{nil}
%global __os_install_post %{nil}
%description
A test fixture.
%install
mkdir -p %{buildroot}/opt/amavisd-fixture
cp -a SOURCE/. %{buildroot}/opt/amavisd-fixture/
%files
/opt/amavisd-fixture
"""


@builder("rpm", "rpmbuild")
def make_rpm(files: Files, workdir: Path) -> bytes:
    source, _names = _populate(files, workdir)
    topdir = workdir / "rpmtop"
    topdir.mkdir()
    spec = workdir / "fixture.spec"
    spec.write_text(RPM_SPEC.replace("SOURCE", str(source)))
    _run(["rpmbuild", "-bb", "--nodeps", "--quiet", "--define", f"_topdir {topdir}",
          "--define", "_build_id_links none", str(spec)], cwd=workdir)
    (rpm,) = (topdir / "RPMS" / "noarch").glob("*.rpm")
    return rpm.read_bytes()


@builder("iso", "genisoimage")
def make_iso(files: Files, workdir: Path) -> bytes:
    top, _names = _populate(files, workdir)
    out = workdir / "out.iso"
    _run(["genisoimage", "-quiet", "-J", "-R", "-o", str(out), str(top)], cwd=workdir)
    return out.read_bytes()


def mixed_files(count: int = 10, total: int = 1 << 20, seed: int = 1) -> Files:
    """`count` members, about `total` bytes: half text (compressible), half random."""
    rng = random.Random(seed)
    size = total // count
    files: Files = {}
    words = [b"mail", b"virus", b"scanner", b"archive", b"message", b"quota", b"header"]
    for n in range(count):
        if n % 2:
            files[f"bin{n}.dat"] = rng.randbytes(size)
        else:
            text = b" ".join(rng.choice(words) for _ in range(size // 6))
            files[f"text{n}.txt"] = text[:size]
    return files


def as_attachment(data: bytes, filename: str, subject: str = "archive") -> bytes:
    """A MIME mail with `data` as a base64 application/octet-stream attachment."""
    body = base64.encodebytes(data).decode()
    return (
        "From: sender@example.test\nTo: rcpt@example.test\n"
        f"Subject: {subject}\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="=_fixture"\n\n'
        "--=_fixture\nContent-Type: text/plain\n\nThe file you asked for.\n"
        f'--=_fixture\nContent-Type: application/octet-stream; name="{filename}"\n'
        f'Content-Disposition: attachment; filename="{filename}"\n'
        f"Content-Transfer-Encoding: base64\n\n{body}--=_fixture--\n"
    ).encode()
