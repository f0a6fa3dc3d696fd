"""OLE2 compound files (doc, xls, ppt, msg, msi, vbaProject.bin, password-encrypted OOXML).

In-process with `olefile` (pure Python, no fork, reads every OLE2 variant):
every stream becomes a child named by its storage path ("Macros/VBA/Module1").
On top of the streams, what a scanner could not otherwise see:
- VBA macros: module source is stored compressed ([MS-OVBA] 2.4.1); it is
  decompressed here and added as "<module>.vba", and the part flagged "macros"
  (informational, for the banned rules);
- embedded files: an `\\x01Ole10Native` stream is unwrapped to the file it
  carries (named as it was), a PowerPoint ExOleObjStg record to the
  compound file it holds (zlib-compressed in the record);
- encryption: an EncryptedPackage (OOXML with a password), a Workbook FILEPASS
  record, the WordDocument fEncrypted bit or a PowerPoint crypt session make
  the part "encrypted" and the message UNCHECKED.
The document stays unexpanded: scanners also match on the compound file
itself (and its slack), so it is scanned as it is as well.

Never: hand olefile bytes (under 1536 bytes it takes them for a file name),
or read a stream whose declared size exceeds the file (a looping FAT chain
would otherwise be read over and over into memory).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator

import olefile

from amavisd.decode.archives.members import add_member, clean_name, is_ours, stream_member
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

OUT_CHUNK = 256 * 1024
MAX_DIR_STREAM = 16 * 1024 * 1024  # a VBA project's decompressed "dir" (real ones: a few KB)


@register("ole2")
def decode_ole2(part: Part, ctx: Context) -> None:
    with part.open() as source:
        try:
            ole = olefile.OleFileIO(source)
        except Exception as err:  # olefile raises many kinds on hostile input
            if is_ours(err):
                raise
            raise DecodeError(f"not a readable OLE2 file: {err}") from None
        with ole:
            OleDecoding(part, ctx, ole).run()


class OleDecoding:
    def __init__(self, part: Part, ctx: Context, ole: olefile.OleFileIO):
        self.part, self.ctx, self.ole = part, ctx, ole
        self.problems: list[str] = []
        self.encryption: set[str] = set()

    def run(self) -> None:
        try:
            paths = self.ole.listdir(streams=True, storages=False)
        except Exception as err:  # a broken directory: olefile raises many kinds
            if is_ours(err):
                raise
            raise DecodeError(f"OLE2 directory unreadable: {err}") from None
        for path in paths:
            self.ctx.budget.check_time()
            data = self.read(path)
            if data is None:
                continue
            child = add_member(self.ctx, self.part, "/".join(path), data)
            if len(data) < self.ole.get_size("/".join(path)):
                child.flags.add("truncated")
            handler = STREAM_HANDLERS.get(path[-1].lower())
            if handler is not None:
                handler(self, child, data)
        for storage in _vba_storages(paths):
            self.part.flags.add("macros")
            self.add_vba_sources(storage)
        if self.ole.parsing_issues:  # defects olefile worked around: streams may be cut
            _, first = self.ole.parsing_issues[0]
            self.problems.append(f"{len(self.ole.parsing_issues)} OLE2 defects, first: {first}")
        if self.problems:
            raise DecodeError("; ".join(self.problems[:3]))

    def read(self, path: list[str]) -> bytes | None:
        name = "/".join(path)
        try:
            size = self.ole.get_size(name)
            if size > self.part.size:
                raise DecodeError(f"declares {size} bytes, more than the file")
            return self.ole.openstream(path).read()
        except Exception as err:  # olefile's defects come as many kinds; no budget in here
            if is_ours(err):
                raise
            self.problems.append(f"stream {clean_name(name)}: {err}")
            return None

    def encrypted(self, how: str) -> None:
        self.part.flags.add("encrypted")
        if not self.encryption:
            self.ctx.note_unchecked(self.part, f"encrypted Office document ({how})",
                                    kind="encrypted")
        self.encryption.add(how)

    # -- VBA ------------------------------------------------------------------------------------

    def add_vba_sources(self, storage: list[str]) -> None:
        dir_stream = self.read(storage + ["dir"])
        try:
            if dir_stream is None:
                raise DecodeError("no dir stream")
            listing = b"".join(_bounded_vba(dir_stream, MAX_DIR_STREAM))
            modules = _vba_modules(listing)
        except DecodeError as err:
            self.problems.append(f"VBA project {'/'.join(storage)}: {err}")
            return
        for module, stream_name, offset in modules:
            data = self.read(storage + [stream_name])
            if data is None:
                continue
            if offset > len(data):
                self.problems.append(f"VBA module {module}: source offset past the stream")
                continue
            try:
                stream_member(self.ctx, self.part, f"{module}.vba",
                              self.timed(_blocks(vba_decompress(data[offset:]))))
            except DecodeError as err:
                self.problems.append(f"VBA module {module}: {err}")

    def timed(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            yield chunk
            self.ctx.budget.check_time()

    # -- per-stream handlers ----------------------------------------------------------------------

    def ole10native(self, stream: Part, data: bytes) -> None:
        name, payload = _native_payload(data)
        if payload:
            add_member(self.ctx, stream, name, payload)

    def powerpoint(self, stream: Part, data: bytes) -> None:
        number = 0
        for record, instance, body in _ppt_records(data):
            if record == 0x2F14:  # CryptSession10Container
                self.encrypted("PowerPoint crypt session")
            elif record == 0x1011:  # ExOleObjStg or VbaProjectStg: a compound file
                number += 1
                name = f"ExOleObjStg{number}"
                try:  # instance 1: a 4-byte decompressed size, then zlib
                    chunks = _inflated(body[4:]) if instance == 1 else iter([body])
                    stream_member(self.ctx, stream, name, self.timed(chunks))
                except zlib.error as err:
                    self.problems.append(f"{name}: {err}")

    def workbook(self, stream: Part, data: bytes) -> None:
        if _biff_has_filepass(data):
            self.encrypted("Excel FILEPASS")

    def word(self, stream: Part, data: bytes) -> None:
        if len(data) >= 12 and data[:2] in (b"\xec\xa5", b"\xdc\xa5"):
            (fib_flags,) = struct.unpack_from("<H", data, 10)
            if fib_flags & 0x0100:  # FibBase.fEncrypted (also set for XOR obfuscation)
                self.encrypted("Word fEncrypted")

    def encrypted_package(self, stream: Part, data: bytes) -> None:
        self.encrypted("EncryptedPackage")

    def encrypted_summary(self, stream: Part, data: bytes) -> None:
        self.encrypted("PowerPoint EncryptedSummary")


# stream name (last path component, lower case) -> what else it holds
STREAM_HANDLERS: dict[str, Callable[[OleDecoding, Part, bytes], None]] = {
    "\x01ole10native": OleDecoding.ole10native,
    "powerpoint document": OleDecoding.powerpoint,
    "workbook": OleDecoding.workbook,
    "book": OleDecoding.workbook,
    "worddocument": OleDecoding.word,
    "encryptedpackage": OleDecoding.encrypted_package,
    "encryptioninfo": OleDecoding.encrypted_package,
    "encryptedsummary": OleDecoding.encrypted_summary,
}


# -- formats ------------------------------------------------------------------------------------


def vba_decompress(data: bytes) -> Iterator[bytes]:
    """[MS-OVBA] 2.4.1 CompressedContainer: a 0x01 signature byte, then chunks
    that each decompress to at most 4096 bytes; yields one chunk at a time."""
    if not data or data[0] != 1:
        raise DecodeError("not a VBA compressed container")
    pos = 1
    while pos + 2 <= len(data):
        (header,) = struct.unpack_from("<H", data, pos)
        if header >> 12 & 0b111 != 0b011:
            raise DecodeError("bad VBA chunk signature")
        end = min(pos + (header & 0x0FFF) + 3, len(data))
        if header & 0x8000:
            yield _vba_chunk(data, pos + 2, end)
        else:  # stored: 4096 raw bytes
            yield data[pos + 2:end]
        pos = end


def _vba_chunk(data: bytes, pos: int, end: int) -> bytes:
    out = bytearray()
    while pos < end:
        flags = data[pos]
        pos += 1
        for bit in range(8):
            if pos >= end:
                break
            if not flags >> bit & 1:
                out.append(data[pos])
                pos += 1
                continue
            if pos + 2 > end:
                raise DecodeError("VBA copy token cut short")
            (token,) = struct.unpack_from("<H", data, pos)
            pos += 2
            # the split between offset and length bits grows with the chunk's output
            bit_count = max((len(out) - 1).bit_length(), 4)
            length = (token & 0xFFFF >> bit_count) + 3
            offset = (token >> 16 - bit_count) + 1
            if offset > len(out):
                raise DecodeError("VBA copy token before the chunk start")
            start = len(out) - offset
            if offset >= length:
                out += out[start:start + length]
            else:  # overlapping copy: repeats the last `offset` bytes
                for index in range(length):
                    out.append(out[start + index])
        if len(out) > 4096:
            raise DecodeError("VBA chunk larger than 4096 bytes")
    return bytes(out)


def _bounded_vba(data: bytes, limit: int) -> Iterator[bytes]:
    total = 0
    for chunk in vba_decompress(data):
        total += len(chunk)
        if total > limit:
            raise DecodeError(f"decompresses past {limit} bytes")
        yield chunk


def _vba_modules(listing: bytes) -> list[tuple[str, str, int]]:
    """(module name, stream name, source offset) from a decompressed dir
    stream ([MS-OVBA] 2.3.4.2): records of id (2 bytes), size (4), data."""
    codec = "cp1252"
    modules: list[tuple[str, str, int]] = []
    current: dict[str, object] = {}
    pos = 0
    while pos + 6 <= len(listing):
        record, size = struct.unpack_from("<HI", listing, pos)
        if record == 0x0009:  # PROJECTVERSION: its Size says 4, 6 bytes follow
            size = 6
        value = listing[pos + 6:pos + 6 + size]
        pos += 6 + size
        if record == 0x0003 and size == 2:  # PROJECTCODEPAGE
            codec = _codec(int.from_bytes(value, "little"))
        elif record in _MODULE_TEXT:
            key, unicode = _MODULE_TEXT[record]
            current[key] = value.decode("utf-16-le" if unicode else codec, "replace")
        elif record == 0x0031 and size == 4:  # MODULEOFFSET
            current["offset"] = int.from_bytes(value, "little")
        elif record == 0x002B:  # module terminator
            stream = current.get("ustream") or current.get("stream")
            if stream and "offset" in current:
                name = current.get("uname") or current.get("name") or stream
                modules.append((str(name), str(stream), int(current["offset"])))
            current = {}
    return modules


# record id -> (field, is UTF-16)
_MODULE_TEXT = {0x0019: ("name", False), 0x0047: ("uname", True),
                0x001A: ("stream", False), 0x0032: ("ustream", True)}


def _codec(codepage: int) -> str:
    name = f"cp{codepage}"
    try:
        "".encode(name)
    except LookupError:
        return "cp1252"
    return name


def _vba_storages(paths: list[list[str]]) -> list[list[str]]:
    """Storages holding a VBA project: both a _VBA_PROJECT and a dir stream."""
    names: dict[tuple[str, ...], set[str]] = {}
    for path in paths:
        names.setdefault(tuple(path[:-1]), set()).add(path[-1].lower())
    return [list(storage) for storage, held in names.items()
            if {"_vba_project", "dir"} <= held]


def _blocks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Join small chunks (4 KiB VBA chunks) into OUT_CHUNK blocks."""
    block = bytearray()
    for chunk in chunks:
        block += chunk
        if len(block) >= OUT_CHUNK:
            yield bytes(block)
            block.clear()
    if block:
        yield bytes(block)


def _native_payload(data: bytes) -> tuple[str, bytes]:
    """The file inside an Ole10Native stream: after the total size, a Package
    ("type 2") holds a label, the source path, a temp path and the data;
    anything else is native data as it is."""
    if len(data) < 4:
        return "", b""
    (total,) = struct.unpack_from("<I", data)
    if data[4:6] != b"\x02\x00":
        return "Ole10Native.bin", data[4:4 + total]
    pos = 6
    label, pos = _cstring(data, pos)
    source, pos = _cstring(data, pos)
    if pos + 8 > len(data):
        return "", b""
    (temp_size,) = struct.unpack_from("<I", data, pos + 4)  # after 4 reserved bytes
    pos += 8 + temp_size
    if pos + 4 > len(data):
        return "", b""
    (size,) = struct.unpack_from("<I", data, pos)
    name = os.path.basename(source.replace("\\", "/")) or label
    return name, data[pos + 4:pos + 4 + size]


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        end = len(data)
    return data[pos:end].decode("cp1252", "replace"), end + 1


def _ppt_records(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, instance, body) of the top-level records of a PowerPoint
    Document stream ([MS-PPT] 2.3.1: recVer/recInstance, recType, recLen)."""
    pos = 0
    while pos + 8 <= len(data):
        version_instance, record, size = struct.unpack_from("<HHI", data, pos)
        yield record, version_instance >> 4, data[pos + 8:pos + 8 + size]
        pos += 8 + size


def _inflated(data: bytes) -> Iterator[bytes]:
    inflater = zlib.decompressobj()
    while data and not inflater.eof:
        yield inflater.decompress(data, OUT_CHUNK)
        data = inflater.unconsumed_tail
    yield inflater.flush()  # what a full output buffer held back: a few bytes


def _biff_has_filepass(data: bytes) -> bool:
    """A FILEPASS record (0x002F) in the workbook globals, which end at EOF (0x000A)."""
    pos = 0
    while pos + 4 <= len(data):
        record, size = struct.unpack_from("<HH", data, pos)
        if record == 0x002F:
            return True
        if record == 0x000A:
            return False
        pos += 4 + size
    return False
