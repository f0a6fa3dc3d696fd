"""Archive fixtures only the tests need, beside the shipped real-archiver builders.

`amavisd.testing.archivers` ships with the package (`make check` nests EICAR
with it); what only the test suite uses lives here: encrypted archives, a 7z
whose entries shadow each other, and byte surgery that damages a real
archive in one known way. The shipped module's names are re-exported, so a
test imports one `archivers`.

Never store the output in the repository: EICAR fixtures exist only at run time.
"""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from amavisd.testing.archivers import (
    BUILDERS,
    EXTENSIONS,
    NO_CREATOR,
    SINGLE_STREAM,
    TOOLS,
    Files,
    _populate,
    _run,
    as_attachment,
    available,
    build,
    chain,
    make_7z,
    make_zip,
    mixed_files,
)

__all__ = [
    # shipped, re-exported
    "BUILDERS", "EXTENSIONS", "NO_CREATOR", "SINGLE_STREAM", "TOOLS", "Files",
    "as_attachment", "available", "build", "chain", "mixed_files",
    # tests only
    "PASSWORD", "ENCRYPTED", "build_encrypted", "build_7z_shadowed", "CHECK_BYTE",
    "with_bad_check", "zip_records", "zip_with_method", "zip_without_entry",
]

PASSWORD = "infected"

# Encrypted variants: the decoder must say UNCHECKED, never CLEAN.
ENCRYPTED: dict[str, Callable[..., bytes]] = {"zip": make_zip, "7z": make_7z}


def build_encrypted(fmt: str, files: Files, workdir: Path | str | None = None,
                    password: str = PASSWORD) -> bytes:
    """`fmt` (zip: ZipCrypto; 7z: AES with encrypted headers) under `password`."""
    reason = available(fmt)
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="amfix", dir=workdir) as tmp:
        return ENCRYPTED[fmt](files, Path(tmp), password=password)


def build_7z_shadowed(first: Files, then: Files, workdir: Path | str | None = None,
                      links: dict[str, str] | None = None, method: str = "LZMA2") -> bytes:
    """A 7z made by two runs of the real 7zz: `first` (plus `links`, name ->
    target, stored as symlinks with -snl), then `then` added from another dir.
    An entry of the first run may shadow a directory of the second (a link or
    a file `docs`, then `docs/invoice.txt`): `7zz x` cannot write the second,
    `7zz e` can. `method` other than LZMA/LZMA2 (PPMd, say) sends the archive
    to 7zz instead of py7zr."""
    if shutil.which("7zz") is None:
        raise RuntimeError("7zz not installed")
    with tempfile.TemporaryDirectory(prefix="amfix", dir=workdir) as tmp:
        top = Path(tmp)
        one, _ = _populate(first, top, "one")
        for name, target in (links or {}).items():
            (one / name).symlink_to(target)
        two, second = _populate(then, top, "two")
        out = top / "out.7z"
        entries = sorted([*first, *(links or {})])
        _run(["7zz", "a", "-snl", f"-m0={method}", "-bd", "-y", str(out), "--", *entries],
             cwd=one)
        _run(["7zz", "a", f"-m0={method}", "-bd", "-y", str(out), "--", *second], cwd=two)
        return out.read_bytes()


# -- byte surgery: damage a real archive in one known way ----------------------

def _xz_block_check(data: bytes) -> int:
    """The last byte of the (one) block's check, just before the index: the
    footer's backward size says how long the index is."""
    (backward,) = struct.unpack_from("<I", data, len(data) - 8)
    return len(data) - 12 - (backward + 1) * 4 - 1


# single-stream format -> where a byte of its integrity check sits, data untouched
CHECK_BYTE: dict[str, Callable[[bytes], int]] = {
    "gz": lambda data: len(data) - 8,  # the trailer's CRC-32
    "bz2": lambda data: 10,  # the first block's CRC, after "BZh9" and the block magic
    "xz": _xz_block_check,  # the block's CRC-64
    "zst": lambda data: len(data) - 1,  # the frame's content checksum
    "lz4": lambda data: len(data) - 1,  # the frame's content checksum
    "lz": lambda data: len(data) - 20,  # the member trailer's CRC-32
}


def with_bad_check(fmt: str, data: bytes) -> bytes:
    """`data` (one stream of `fmt`, as the builders make it) with a byte of its
    check value changed: every byte of content still decodes."""
    out = bytearray(data)
    out[CHECK_BYTE[fmt](data)] ^= 0x5A
    return bytes(out)


def zip_records(data: bytes, signature: bytes) -> list[int]:
    """Offsets of a zip's local headers (PK\3\4), directory entries (PK\1\2), ..."""
    found, pos = [], data.find(signature)
    while pos >= 0:
        found.append(pos)
        pos = data.find(signature, pos + 1)
    return found


def zip_with_method(data: bytes, index: int, method: int, local: bool = True,
                    central: bool = True) -> bytes:
    """Member `index`'s method number changed in its local header and/or its
    directory entry (its bytes left as they are)."""
    out = bytearray(data)
    if local:
        struct.pack_into("<H", out, zip_records(data, b"PK\x03\x04")[index] + 8, method)
    if central:
        struct.pack_into("<H", out, zip_records(data, b"PK\x01\x02")[index] + 10, method)
    return bytes(out)


def zip_without_entry(data: bytes, index: int) -> bytes:
    """The zip with member `index`'s directory entry removed (its local header
    and data stay): unzip no longer lists it, a streaming reader still does."""
    central = zip_records(data, b"PK\x01\x02")
    (end,) = zip_records(data, b"PK\x05\x06")[-1:]
    bounds = central + [end]
    kept = b"".join(data[bounds[i]:bounds[i + 1]] for i in range(len(central)) if i != index)
    record = bytearray(data[end:])
    struct.pack_into("<HHII", record, 8, len(central) - 1, len(central) - 1, len(kept),
                     central[0])
    return data[:central[0]] + kept + bytes(record)


def tar_pax_size_covering(hidden: bytes) -> bytes:
    """a.txt's pax record says its data runs over the next header and its
    data (tarfile and GNU tar read one member), its header says 6 bytes (a
    reader ignoring pax headers reads a.txt, then `hidden.gz`)."""
    import tarfile

    packed = gzip.compress(hidden)
    covered = in_blocks(6) + 512 + in_blocks(len(packed))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a.txt")
        info.size, info.pax_headers = 6, {"size": str(covered)}
        tf.addfile(info, io.BytesIO(b"hello\n"))
        info = tarfile.TarInfo("hidden.gz")
        info.size = len(packed)
        tf.addfile(info, io.BytesIO(packed))
    return buf.getvalue()


def in_blocks(size: int) -> int:
    """`size` rounded up to whole tar blocks."""
    return -(-size // 512) * 512
