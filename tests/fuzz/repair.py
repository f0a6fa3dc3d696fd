"""Checksum repairs: give a mutant back the sums its reader checks first.

A flipped byte in a tar header, a zip member or a 7z header is otherwise
refused at the first gate (a bad header sum, a CRC mismatch), and the code
behind the gate never sees hostile bytes. Each repair recomputes what it
cheaply can (header sums, CRCs of data it can inflate within a bound, the
directory's count and offset) and leaves the rest. A repair never raises on
a mangled input other than the few errors `REPAIR_ERRORS` names (the driver
then passes the mutant on as it is), and it never changes a valid sample
(tests/fuzz/test_fuzz_archives.py checks that on every seed).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Callable

INFLATE_BOUND = 4 * 1024 * 1024  # output a repair inflates to recompute a CRC
REPAIR_ERRORS = (struct.error, IndexError, ValueError, zlib.error, lzma.LZMAError, EOFError)


def _inflated(body: bytes | bytearray, wbits: int = -15) -> tuple[bytes, int] | None:
    """The output of one deflate stream and the input it took, or None when
    it does not end within the bound."""
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(bytes(body), INFLATE_BOUND)
    if not inflater.eof:
        return None
    return out, len(body) - len(inflater.unused_data)


def fix_tar(data: bytearray) -> None:
    """Every 512-byte block that looks like a ustar/gnu header gets its sum back."""
    for off in range(0, len(data) - 511, 512):
        block = data[off:off + 512]
        if block[257:262] != b"ustar" and not (off == 0 and any(block[:100])):
            continue
        stored = block[148:156]
        block[148:156] = b" " * 8
        total = sum(block) & 0o777777
        try:
            if int(bytes(stored).strip(b" \0") or b"-1", 8) == total:
                continue
        except ValueError:
            pass
        data[off + 148:off + 156] = b"%06o\0 " % total


def fix_7z(data: bytearray) -> None:
    """The next header's CRC, then the start header's CRC over it, wherever
    the signature is (a self-extractor has a stub in front)."""
    at = data.find(b"7z\xbc\xaf\x27\x1c")
    if at == -1 or len(data) < at + 32:
        return
    offset, size = struct.unpack_from("<QQ", data, at + 12)
    header = data[at + 32 + offset:at + 32 + offset + size]
    if size and len(header) == size:
        struct.pack_into("<I", data, at + 28, zlib.crc32(header))
    struct.pack_into("<I", data, at + 8, zlib.crc32(data[at + 12:at + 32]))


def _member_crc(method: int, body: bytes | bytearray) -> tuple[int, int] | None:
    if method == 0:
        return zlib.crc32(body), len(body)
    if method == 8:
        inflated = _inflated(body)
        return None if inflated is None else (zlib.crc32(inflated[0]), len(inflated[0]))
    return None


def _central_start(data: bytearray, eocd: int) -> int:
    """Where the central directory is: where the end record says, or right
    before the end record, or the first central header there is."""
    if eocd != -1 and eocd + 22 <= len(data):
        size, offset = struct.unpack_from("<II", data, eocd + 12)
        for start in (offset, eocd - size):
            if 0 <= start and data[start:start + 4] == b"PK\x01\x02":
                return start
    return data.find(b"PK\x01\x02")


def fix_zip(data: bytearray) -> None:
    """Each member's CRC and uncompressed size (stored, or deflate that
    inflates within the bound) in both headers; the local header's method
    and compressed size from the directory's (so a mutated directory entry is
    read as it says, not refused as inconsistent); the end record's count,
    size and offset from the directory as found."""
    eocd = data.rfind(b"PK\x05\x06")
    cd = start = _central_start(data, eocd)
    if cd == -1:
        return
    shift = 0  # an SFX stub in front: offsets count from the zip's start
    if eocd != -1 and eocd + 22 <= len(data):
        shift = cd - struct.unpack_from("<I", data, eocd + 16)[0]
    count = 0
    while data[cd:cd + 4] == b"PK\x01\x02" and cd + 46 <= len(data):
        count += 1
        method, = struct.unpack_from("<H", data, cd + 10)
        csize, usize = struct.unpack_from("<II", data, cd + 20)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, cd + 28)
        local, = struct.unpack_from("<I", data, cd + 42)
        if data[local:local + 4] != b"PK\x03\x04" and 0 <= local + shift:
            local += shift
        if data[local:local + 4] == b"PK\x03\x04" and local + 30 <= len(data) \
                and 0xFFFFFFFF not in (csize, usize):
            flags, = struct.unpack_from("<H", data, local + 6)
            lname, lextra = struct.unpack_from("<HH", data, local + 26)
            body = data[local + 30 + lname + lextra:local + 30 + lname + lextra + csize]
            sums = _member_crc(method, body)
            if sums is not None:
                crc, usize = sums
                struct.pack_into("<II", data, cd + 16, crc, csize)
                struct.pack_into("<I", data, cd + 24, usize)
            if not flags & 0x08:  # sizes and CRC are in a data descriptor otherwise
                struct.pack_into("<H", data, local + 8, method)
                struct.pack_into("<III", data, local + 14, *struct.unpack_from("<III", data,
                                                                              cd + 16))
        cd += 46 + name_len + extra_len + comment_len
    if eocd != -1 and eocd + 22 <= len(data) and count:
        entries, = struct.unpack_from("<H", data, eocd + 10)
        if entries != 0xFFFF:  # zip64 keeps them in its own record
            struct.pack_into("<HHII", data, eocd + 8, count, count, cd - start, start - shift)


def fix_gzip(data: bytearray) -> None:
    """Each member's header CRC-16 (FHCRC) and its CRC-32 and size trailer."""
    at = 0
    while data[at:at + 3] == b"\x1f\x8b\x08" and at + 10 <= len(data):
        flags, pos = data[at + 3], at + 10
        if flags & 4:
            pos += 2 + struct.unpack_from("<H", data, pos)[0]
        for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
            if flags & bit:
                pos = data.index(0, pos) + 1
        if flags & 2:
            struct.pack_into("<H", data, pos, zlib.crc32(data[at:pos]) & 0xFFFF)
            pos += 2
        inflated = _inflated(data[pos:])
        if inflated is None:
            return
        out, used = inflated
        struct.pack_into("<II", data, pos + used, zlib.crc32(out), len(out) & 0xFFFFFFFF)
        at = pos + used + 8


def fix_lzip(data: bytearray) -> None:
    """The one member's trailer: CRC-32, data size and member size."""
    if data[:5] != b"LZIP\x01" or len(data) < 26:
        return
    code = data[5]
    if not 12 <= code & 0x1F <= 29:  # lzip's range; the reader refuses the rest unread,
        return  # and a 2 GiB dictionary would be allocated here first (MemoryError)
    dictionary = (1 << (code & 0x1F)) - (1 << (code & 0x1F)) // 16 * (code >> 5)
    inflater = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{
        "id": lzma.FILTER_LZMA1, "dict_size": dictionary, "lc": 3, "lp": 0, "pb": 2}])
    try:
        out = inflater.decompress(bytes(data[6:]), INFLATE_BOUND)
    except lzma.LZMAError:
        return
    if not inflater.eof:
        return
    end = len(data) - len(inflater.unused_data)
    struct.pack_into("<IQQ", data, end, zlib.crc32(out), len(out), end + 20)


def fix_xz(data: bytearray) -> None:
    """The stream header's and footer's CRCs, the first block header's and
    the index's (the block's own check covers data we do not inflate)."""
    if data[:6] != b"\xfd7zXZ\0" or len(data) < 24:
        return
    struct.pack_into("<I", data, 8, zlib.crc32(data[6:8]))
    size = (data[12] + 1) * 4
    if data[12] and 12 + size <= len(data):
        struct.pack_into("<I", data, 12 + size - 4, zlib.crc32(data[12:12 + size - 4]))
    end = len(data)
    while end > 12 and data[end - 4:end] == b"\0\0\0\0":  # stream padding
        end -= 4
    if data[end - 2:end] != b"YZ":
        return
    struct.pack_into("<I", data, end - 12, zlib.crc32(data[end - 8:end - 2]))
    index = end - 12 - (struct.unpack_from("<I", data, end - 8)[0] + 1) * 4
    if 12 <= index and data[index] == 0:
        struct.pack_into("<I", data, end - 16, zlib.crc32(data[index:end - 16]))


def _xxh32(data: bytes) -> int:
    """XXH32 with seed 0, for inputs under 16 bytes (an lz4 frame descriptor)."""
    mask, p1, p3, p4, p5 = 0xFFFFFFFF, 2654435761, 3266489917, 668265263, 374761393

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask
    acc, pos = (p5 + len(data)) & mask, 0
    while pos + 4 <= len(data):
        acc = rotl((acc + struct.unpack_from("<I", data, pos)[0] * p3) & mask, 17) * p4 & mask
        pos += 4
    for byte in data[pos:]:
        acc = rotl((acc + byte * p5) & mask, 11) * p1 & mask
    acc = (acc ^ acc >> 15) * 2246822519 & mask
    acc = (acc ^ acc >> 13) * p3 & mask
    return acc ^ acc >> 16


def fix_lz4(data: bytearray) -> None:
    """The frame descriptor's header checksum byte."""
    if data[:4] != b"\x04\x22\x4d\x18" or len(data) < 7:
        return
    end = 6 + (8 if data[4] & 0x08 else 0) + (4 if data[4] & 0x01 else 0)
    if end < len(data):
        data[end] = _xxh32(bytes(data[4:end])) >> 8 & 0xFF


def _vint(data: bytearray, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80 or shift > 63:
            return value, pos


def fix_rar(data: bytearray) -> None:
    """Every block header's CRC: RAR 4's CRC-16 (the low half of a CRC-32),
    RAR 5's CRC-32 over the size field and the header."""
    at = data.find(b"Rar!\x1a\x07")
    if at == -1:
        return
    if data[at + 6] == 0:  # RAR 4
        pos = at + 7
        while pos + 7 <= len(data):
            flags, size = struct.unpack_from("<HH", data, pos + 3)
            extra = struct.unpack_from("<I", data, pos + 7)[0] if flags & 0x8000 else 0
            if size < 7 or pos + size > len(data):
                return
            struct.pack_into("<H", data, pos, zlib.crc32(data[pos + 2:pos + size]) & 0xFFFF)
            pos += size + extra
    elif data[at + 6:at + 8] == b"\x01\x00":  # RAR 5
        pos = at + 8
        while pos + 5 <= len(data):
            size, body = _vint(data, pos + 4)
            if not size or body + size > len(data):
                return
            struct.pack_into("<I", data, pos, zlib.crc32(data[pos + 4:body + size]))
            _kind, cursor = _vint(data, body)
            flags, cursor = _vint(data, cursor)
            if flags & 1:
                _extra, cursor = _vint(data, cursor)
            area = _vint(data, cursor)[0] if flags & 2 else 0
            pos = body + size + area


def chain(*repairs: Callable[[bytearray], None]) -> Callable[[bytearray], None]:
    """Several repairs in turn (a self-extractor may hold any of them)."""
    def repair(data: bytearray) -> None:
        for one in repairs:
            one(data)
    return repair


# target or format name -> its repair
FIXUPS: dict[str, Callable[[bytearray], None]] = {
    "tar": fix_tar, "7z": fix_7z, "zip": fix_zip, "gzip": fix_gzip, "gz": fix_gzip,
    "lzip": fix_lzip, "lz": fix_lzip, "xz": fix_xz, "lz4": fix_lz4, "rar": fix_rar,
    "sfx": chain(fix_zip, fix_7z, fix_rar),
}
