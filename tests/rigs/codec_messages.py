"""Messages whose virus only a working decoder (and its codec) can reach.

For the tests of amavisd/preload.py: after the drop to `amavis`, with an
interpreter only root can read, each of these needs something loaded
lazily: the zip reader decodes member names as cp437 (and names with the
UTF-8 flag as utf-8), the ISO reader Joliet names as utf-16-be, the TNEF
reader titles as cp1252.

EICAR is padded with the trailing blanks its definition allows (128 bytes
at most), so the zip tool deflates it: a stored member would show clamd the
signature in the raw archive, and a broken decoder would go unnoticed. The
ISO and TNEF hold that zip, so the raw bytes never show EICAR either. Every
archive is made by the real tools (amavisd.testing.archivers).
"""

from __future__ import annotations

import struct
from pathlib import Path

from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR

PADDED_EICAR = EICAR + b" " * 60  # still EICAR: the string, then whitespace, <= 128 bytes
# Info-ZIP stores a name that is not UTF-8 as it is, without the UTF-8 flag:
# readers take it as cp437 ("über-ö.com"). surrogateescape gives the raw bytes.
CP437_NAME = b"\x81ber-\x94.com".decode("utf-8", "surrogateescape")
CP437_SHOWN = "über-ö.com"


def eicar_zip(workdir: Path | str | None = None, name: str = "eicar.com") -> bytes:
    data = archivers.build("zip", {name: PADDED_EICAR}, workdir)
    if EICAR in data:
        raise RuntimeError("zip stored EICAR instead of deflating it")
    return data


def eicar_iso(workdir: Path | str | None = None) -> bytes:
    """A Joliet + Rock Ridge ISO (genisoimage) holding the zip."""
    return archivers.build("iso", {"Rechnungen/eicar.zip": eicar_zip(workdir)}, workdir)


def _tnef_attribute(level: int, attr_id: int, data: bytes) -> bytes:
    checksum = sum(data) & 0xFFFF
    return struct.pack("<BII", level, attr_id, len(data)) + data + struct.pack("<H", checksum)


def winmail_dat(payload: bytes, title: str) -> bytes:
    """A minimal TNEF stream as Outlook writes it ([MS-OXTNEF] 2.1.3): the
    signature, a key, attTnefVersion, then one attachment: attAttachRendData,
    attAttachTitle (8-bit, cp1252) and attAttachData."""
    version = _tnef_attribute(1, 0x00089006, struct.pack("<I", 0x00010000))
    rend = _tnef_attribute(2, 0x00069002, struct.pack("<HIHHH", 1, 0xFFFFFFFF, 0, 0, 1) + b"\0\0")
    name = _tnef_attribute(2, 0x00018010, title.encode("cp1252") + b"\0")
    data = _tnef_attribute(2, 0x0006800F, payload)
    return struct.pack("<IH", 0x223E9F78, 0x0101) + version + rend + name + data


def eicar_tnef(workdir: Path | str | None = None) -> bytes:
    return winmail_dat(eicar_zip(workdir), "Rechnung März.zip")


def messages(workdir: Path | str | None = None) -> dict[str, bytes]:
    """name -> message: EICAR behind each codec. Skips none: raises when a
    tool is missing (call archivers.available("zip"/"iso") first)."""
    return {
        "zip": archivers.as_attachment(eicar_zip(workdir), "invoice.zip"),
        "zip-cp437-name": archivers.as_attachment(eicar_zip(workdir, CP437_NAME), "docs.zip"),
        "iso": archivers.as_attachment(eicar_iso(workdir), "disk.iso"),
        "tnef": archivers.as_attachment(eicar_tnef(workdir), "winmail.dat"),
    }
