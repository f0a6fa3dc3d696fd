"""Hostile mails that hide EICAR, built at test time (issue 10's acceptance set).

Each builder returns one message whose only way to CLEAN is a decoder failing
open: nests deeper than Python's recursion limit, compressed streams with a
broken integrity check, archives whose tool fails half-way, methods we cannot
read, MIME read differently by different readers. EICAR is always compressed
or encoded, so a clamd that decodes nothing (the tests' clamd) sees it only
in a part we hand it. `EXPECT` says what each must be at least: "INFECTED"
(all the bytes are there: we must find it) or "NOT CLEAN" (INFECTED or
UNCHECKED).

Byte surgery follows the formats' documented layouts (RFC 1952 gzip trailer,
the xz stream footer, lzip's member trailer, zip's local/central headers).
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from amavisd.testing.eicar import EICAR
from tests.rigs import archivers

PAYLOAD = EICAR + b"\n" + b"padding to make it compress " * 40
BUILDERS: dict[str, Callable[[], bytes]] = {}
EXPECT: dict[str, str] = {}
NEEDS: dict[str, tuple[str, ...]] = {}


def hostile(name: str, expect: str = "NOT CLEAN", needs: tuple[str, ...] = ()):
    def wrap(fn: Callable[[], bytes]) -> Callable[[], bytes]:
        BUILDERS[name], EXPECT[name], NEEDS[name] = fn, expect, needs
        return fn
    return wrap


def missing_tools(name: str) -> list[str]:
    return [tool for tool in NEEDS[name] if shutil.which(tool) is None]


def attach(data: bytes, filename: str, ctype: str = "application/octet-stream") -> bytes:
    return (b"From: mallory@example.test\nTo: bob@example.test\nSubject: hostile\n"
            b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="h0"\n\n'
            b"--h0\nContent-Type: text/plain\n\nsee attached\n"
            + f'--h0\nContent-Type: {ctype}; name="{filename}"\n'.encode()
            + f'Content-Disposition: attachment; filename="{filename}"\n'.encode()
            + b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(data)
            + b"--h0--\n")


def eicar_mail(subject: str = "inner") -> bytes:
    return attach(PAYLOAD, "notes.txt").replace(b"Subject: hostile", b"Subject: " +
                                                subject.encode())


# -- nesting -----------------------------------------------------------------------


def rfc822_nest(levels: int) -> bytes:
    raw = eicar_mail()
    for _ in range(levels):
        raw = b"From: a@example.test\nMIME-Version: 1.0\nContent-Type: message/rfc822\n\n" + raw
    return raw


def multipart_nest(levels: int) -> bytes:
    head = b"".join(b'Content-Type: multipart/mixed; boundary="n%d"\n\n--n%d\n' % (i, i)
                    for i in range(levels))
    tail = b"".join(b"\n--n%d--\n" % i for i in reversed(range(levels)))
    leaf = (b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(gzip.compress(PAYLOAD)))
    return b"From: a@example.test\nMIME-Version: 1.0\n" + head + leaf + tail


for _levels in (250, 2000):
    hostile(f"rfc822-nest-{_levels}")(lambda n=_levels: rfc822_nest(n))
for _levels in (1000, 20000):
    hostile(f"multipart-nest-{_levels}")(lambda n=_levels: multipart_nest(n))


@hostile("mixed-nest-600")
def mixed_nest() -> bytes:
    raw = eicar_mail()
    for level in range(600):
        if level % 2:
            raw = b"MIME-Version: 1.0\nContent-Type: message/rfc822\n\n" + raw
        else:
            raw = (b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="m%d"\n\n'
                   b"--m%d\n" % (level, level)) + raw + b"\n--m%d--\n" % level
    return raw


@hostile("gzip-nest-40")
def gzip_nest() -> bytes:
    data = PAYLOAD
    for _ in range(40):
        data = gzip.compress(data)
    return attach(data, "a.gz")


# -- broken integrity checks: all the data is there, only the check fails ---------


def gzip_bad_crc() -> bytes:
    data = bytearray(gzip.compress(PAYLOAD))
    data[-8] ^= 0xFF  # CRC32 of the trailer (RFC 1952)
    return bytes(data)


def bzip2_bad_crc() -> bytes:
    data = bytearray(bz2.compress(PAYLOAD))
    data[10] ^= 0xFF  # the first block's CRC, after "BZh9" and the block magic
    return bytes(data)


def xz_bad_crc() -> bytes:
    data = bytearray(lzma.compress(PAYLOAD, check=lzma.CHECK_CRC32))
    backward = struct.unpack("<I", data[-8:-4])[0]
    index = len(data) - 12 - (backward + 1) * 4
    data[index - 4] ^= 0xFF  # the block's CRC32 check, just before the index
    return bytes(data)


def lzip_bad_crc() -> bytes:
    data = bytearray(_tool_stream(["lzip", "-c"]))
    data[-20] ^= 0xFF  # CRC32 in the member trailer
    return bytes(data)


def zstd_bad_checksum() -> bytes:
    data = bytearray(_tool_stream(["zstd", "-c", "--check", "-q"]))
    data[-1] ^= 0xFF  # content checksum, the frame's last 4 bytes
    return bytes(data)


def lz4_bad_checksum() -> bytes:
    data = bytearray(_tool_stream(["lz4", "-c", "-q"]))
    data[-1] ^= 0xFF  # content checksum after the end mark
    return bytes(data)


def _tool_stream(argv: list[str]) -> bytes:
    return subprocess.run(argv, input=PAYLOAD, capture_output=True, check=True).stdout


for _name, _make, _ext, _needs in (
        ("gzip", gzip_bad_crc, "gz", ()), ("bzip2", bzip2_bad_crc, "bz2", ()),
        ("xz", xz_bad_crc, "xz", ()), ("lzip", lzip_bad_crc, "lz", ("lzip",)),
        ("zstd", zstd_bad_checksum, "zst", ("zstd",)), ("lz4", lz4_bad_checksum, "lz4", ("lz4",))):
    hostile(f"{_name}-bad-check", "INFECTED", _needs)(
        lambda m=_make, e=_ext: attach(m(), f"invoice.{e}"))


def _zip_patched(field: int, value: bytes | None) -> bytes:
    """A one-member deflated zip with a field changed in both its local header
    and its central directory entry (`field`: the offset in the local one;
    the central one has it 2 bytes further); `value` None flips its first byte."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("invoice.txt", PAYLOAD)
    data = bytearray(buf.getvalue())
    for signature, offset in ((b"PK\x03\x04", field), (b"PK\x01\x02", field + 2)):
        at = data.find(signature) + offset
        if value is None:
            data[at] ^= 0xFF
        else:
            data[at:at + len(value)] = value
    return bytes(data)


@hostile("zip-bad-crc", "INFECTED")
def zip_bad_crc() -> bytes:
    return attach(_zip_patched(14, None), "invoice.zip")  # the member's CRC-32


@hostile("gzip-bad-crc-in-zip", "INFECTED")
def gzip_in_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("invoice.gz", gzip_bad_crc())
    return attach(buf.getvalue(), "invoice.zip")


@hostile("gzip-truncated", "NOT CLEAN")
def gzip_truncated() -> bytes:
    return attach(gzip.compress(PAYLOAD + os.urandom(2000))[:-12], "cut.gz")


# -- methods nobody here can read -----------------------------------------------------


for _method in (97, 98, 19, 200):
    hostile(f"zip-method-{_method}")(
        lambda m=_method: attach(_zip_patched(8, struct.pack("<H", m)), "a.zip"))


# -- tools that fail half-way, readers that disagree --------------------------------------


@hostile("7z-symlink-dir", "NOT CLEAN", ("7zz",))
def sevenzip_symlink_dir() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp, "one"), Path(tmp, "two")
        one.mkdir()
        (two / "docs").mkdir(parents=True)
        os.symlink("/etc", one / "docs")
        (two / "docs" / "invoice.txt").write_bytes(PAYLOAD)
        archive = Path(tmp, "a.7z")
        for cwd, member in ((one, "docs"), (two, "docs/invoice.txt")):
            subprocess.run(["7zz", "a", "-snl", "-bd", str(archive), member], cwd=cwd,
                           capture_output=True, check=True)
        return attach(archive.read_bytes(), "docs.7z")


@hostile("tar-symlink-dir", "INFECTED")
def tar_symlink_dir() -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("docs")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tf.addfile(link)
        info = tarfile.TarInfo("docs/invoice.txt")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))
    return attach(buf.getvalue(), "docs.tgz")


@hostile("mime-two-encodings", "INFECTED")
def mime_two_encodings() -> bytes:
    return (b"From: a@example.test\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="q"\n\n--q\n'
            b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: 7bit\n"
            b"Content-Transfer-Encoding: base64\n\n"
            + base64.encodebytes(gzip.compress(PAYLOAD))
            + b"--q--\n")


# -- review 2: readings a hostile review found CLEAN ------------------------------------------


def _tool_output(argv: list[str], files: dict[str, bytes], out: str,
                 links: dict[str, str] | None = None) -> bytes:
    """Run an archiver in a throw-away dir holding `files` (and `links`,
    name -> target); return the file `out` it made."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            Path(tmp, name).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, name).write_bytes(data)
        for name, target in (links or {}).items():
            os.symlink(target, Path(tmp, name))
        subprocess.run(argv, cwd=tmp, capture_output=True, check=True)
        return Path(tmp, out).read_bytes()


def _zip(members: dict[str, bytes], info: zipfile.ZipInfo | None = None,
         data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
        if info is not None:
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


@hostile("zip-ppmd-zip-in-front", "INFECTED", ("7zz",))
def zip_in_front() -> bytes:
    """`cat a.zip b.zip`: 7-Zip reads the first (PPMd), zipfile the last."""
    front = _tool_output(["7zz", "a", "-tzip", "-mm=PPMd", "-bd", "a.zip", "invoice.com"],
                         {"invoice.com": PAYLOAD}, "a.zip")
    return attach(front + _zip({"hi.txt": b"hello\n"}), "invoice.zip")


@hostile("zip-symlink-entry-data", "INFECTED")
def zip_symlink_data() -> bytes:
    """Python's extractall writes a link entry's data as a regular file."""
    info = zipfile.ZipInfo("invoice.com")
    info.create_system, info.external_attr = 3, 0o120777 << 16
    return attach(_zip({"readme.txt": b"hello\n"}, info, PAYLOAD), "invoice.zip")


@hostile("zip-directory-centrally-file-locally", "INFECTED")
def zip_directory_centrally() -> bytes:
    """Central name "aaaaaaaaa/", local "aaaaaaaa.c": bsdtar writes the file."""
    data = bytearray(_zip({"aaaaaaaa.c": PAYLOAD}))
    at = data.find(b"PK\x01\x02") + 46
    data[at:at + 10] = b"aaaaaaaaa/"
    return attach(bytes(data), "a.zip")


def _7z_with_attributes(attributes: Callable[[int], int]) -> bytes:
    import py7zr

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "a.7z")
        archive = py7zr.SevenZipFile(path, "w")
        archive.writestr(b"hello\n", "readme.txt")
        archive.writestr(PAYLOAD, "invoice.com")
        for entry in archive.header.files_info.files:
            if entry["filename"] == "invoice.com":
                entry["attributes"] = attributes(entry["attributes"])
        archive.close()
        return path.read_bytes()


@hostile("7z-directory-attribute-with-data", "INFECTED", ("7zz",))
def sevenzip_directory_attribute() -> bytes:
    """7zz x writes a "directory" that has a stream as a regular file."""
    return attach(_7z_with_attributes(lambda a: a | 0x10), "a.7z")


@hostile("7z-symlink-entry-data", "INFECTED")
def sevenzip_symlink_data() -> bytes:
    return attach(_7z_with_attributes(lambda a: 0x8000 | (0o120777 << 16) | (a & 0xFFFF)),
                  "a.7z")


@hostile("tgz-symlink-target", "INFECTED")
def tar_symlink_target() -> bytes:
    """7-Zip without -snl writes a link as a file holding its target."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        link = tarfile.TarInfo("invoice.com")
        link.type, link.linkname = tarfile.SYMTYPE, EICAR.decode()
        tf.addfile(link)
    return attach(buf.getvalue(), "a.tgz")


@hostile("tgz-pax-size-over-the-next-member", "INFECTED")
def tar_pax_size() -> bytes:
    return attach(gzip.compress(archivers.tar_pax_size_covering(PAYLOAD)), "a.tgz")


@hostile("cab-two-members-of-one-name", "INFECTED", ("gcab", "cabextract", "7zz"))
def cab_one_name() -> bytes:
    """cabextract writes the second d1/ab.txt over the first, exit 0."""
    data = _tool_output(["gcab", "-c", "-z", "out.cab", "d1/ab.txt", "d2/ab.txt"],
                        {"d1/ab.txt": PAYLOAD, "d2/ab.txt": b"harmless\n"}, "out.cab")
    return attach(data.replace(b"d2\\ab.txt", b"d1\\ab.txt").replace(b"d2/ab.txt", b"d1/ab.txt"),
                  "a.cab")


@hostile("arc-two-members-of-one-name", "INFECTED", ("arc", "nomarch"))
def arc_one_name() -> bytes:
    """nomarch keeps the last AB.TXT (ARC headers carry no checksum)."""
    data = _tool_output(["arc", "anw", "out.arc", "AB.TXT", "BA.TXT"],
                        {"AB.TXT": PAYLOAD, "BA.TXT": b"harmless\n"}, "out.arc")
    return attach(data.replace(b"BA.TXT\0", b"AB.TXT\0"), "a.arc")


def _member_after(fmt: str, separator: bytes) -> bytes:
    """A harmless member, `separator`, then a member holding the payload."""
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[fmt]
    return compress(b"hello\n") + separator + compress(PAYLOAD)


for _fmt in ("gz", "bz2", "xz"):
    # Python's gzip module reads on past zero padding (gzip(1) stops)
    hostile(f"{_fmt}-member-after-zero-padding", "INFECTED")(
        lambda f=_fmt: attach(_member_after(f, bytes(1024)), f"a.{f}"))
    hostile(f"{_fmt}-member-after-garbage")(
        lambda f=_fmt: attach(_member_after(f, b"JUNK"), f"a.{f}"))


def build_all(directory: Path) -> dict[str, Path]:
    """Write every buildable hostile mail into `directory`; name -> path."""
    made = {}
    for name, build in BUILDERS.items():
        if missing_tools(name):
            continue
        path = directory / f"{name}.eml"
        path.write_bytes(build())
        made[name] = path
    return made
