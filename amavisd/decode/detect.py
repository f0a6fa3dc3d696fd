"""What a part *is*, from its bytes: never from its declared name or type alone.

Cheap signature checks cover the formats we decode (a zip labelled
image/jpeg is still a zip); libmagic (python-magic, in-process, no file(1)
fork) names everything else for the tree and the banned-type rules.
"""

from __future__ import annotations

import re

# (offset, magic bytes, short type); first match wins, most specific first.
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"\x78\x9f\x3e\x22", "tnef"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole2"),
    (0, b"%PDF-", "pdf"),
    (0, b"MZ", "exe"),
    (0, b"\x7fELF", "elf"),
    (257, b"ustar", "tar"),
)

_BINHEX = re.compile(rb"\(This file must be converted (with BinHex|; you knew that)")
_HEADER_LINE = re.compile(rb"^[!-9;-~]{1,76}:[ \t]?", re.M)
_MAIL_HEADERS = re.compile(
    rb"^(received|from|to|subject|date|message-id|mime-version|content-type|return-path)"
    rb"[ \t]*:", re.I | re.M)
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}\r?$")


def sniff(head: bytes) -> str:
    for offset, magic, kind in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return kind
    if looks_like_mail(head):
        return "mail"
    if _BINHEX.search(head):
        return "binhex"
    if looks_like_text(head):
        return "base64" if looks_like_base64(head) else "text"
    return "data"


def looks_like_mail(head: bytes) -> bool:
    """A header block: the first line is a header field and known fields follow."""
    first = head[:1000].lstrip(b"\r\n")
    if first.startswith(b"From ") and b"\n" in first:  # mbox separator line
        first = first.split(b"\n", 1)[1]
    if not _HEADER_LINE.match(first):
        return False
    return len(set(m.group(1).lower() for m in _MAIL_HEADERS.finditer(first[:4000]))) >= 2


def looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    sample = head[:4096]
    if b"\0" in sample:
        return False
    control = sum(1 for c in sample if c < 9 or 13 < c < 32)
    return control * 50 < len(sample)


def looks_like_base64(head: bytes) -> bool:
    """A body that is nothing but base64 lines (a base64 part with no headers)."""
    lines = [ln for ln in head.strip().splitlines()[:20] if ln.strip()]
    return len(lines) >= 2 and all(_BASE64_LINE.fullmatch(ln.strip()) for ln in lines[:-1])


_magic = None


def magic_mime(head: bytes) -> str:
    """libmagic's MIME type, or '' when python-magic is not available."""
    global _magic
    if _magic is None:
        try:
            import magic

            _magic = magic.Magic(mime=True)
        except Exception:  # ImportError, or libmagic missing
            _magic = False
    if not _magic:
        return ""
    try:
        return _magic.from_buffer(head)
    except Exception:
        return ""
