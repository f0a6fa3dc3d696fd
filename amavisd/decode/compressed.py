"""Single-stream compressors: gzip (multi-member), bzip2, xz/lzma.

In-process (zlib, bz2, lzma are in the standard library and faster than a
fork of gzip(1)). Output is produced in bounded chunks and charged to the
budget as it comes, so a 4 GiB stream of zeros is stopped at the quota, in
constant memory.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable

from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, register

CHUNK = 1024 * 1024


def stream(part: Part, ctx: Context, new_decompressor: Callable[[], object], name: str,
           multi_member: bool = True) -> None:
    sink = ctx.sink(part, name=name)
    decompressor = new_decompressor()
    try:
        for chunk in part.chunks():
            data = chunk
            while True:
                sink.write(decompressor.decompress(data, CHUNK))
                # zlib keeps input it had no room for; bz2/lzma keep output instead.
                data = getattr(decompressor, "unconsumed_tail", b"")
                if decompressor.eof:
                    rest = decompressor.unused_data + data
                    if not (multi_member and rest.strip(b"\0")):
                        break
                    decompressor, data = new_decompressor(), rest  # next gzip member
                    continue
                if data or not getattr(decompressor, "needs_input", True):
                    continue
                break
            ctx.budget.check_time()
    except LimitExceeded:
        sink.finish(truncated=True)
        part.flags.add("expanded")
        raise
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as err:
        sink.finish(truncated=True)
        part.flags.add("expanded")
        raise DecodeError(f"{part.detected} stream corrupt: {err}") from None
    child = sink.finish(truncated=not decompressor.eof)
    part.flags.add("expanded")
    if child.flags & {"truncated"}:
        part.flags.add("truncated")


def _inner_name(part: Part, suffixes: tuple[str, ...]) -> str:
    name = part.name
    for suffix in suffixes:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@register("gzip")
def decode_gzip(part: Part, ctx: Context) -> None:
    name = _gzip_name(part.head(1024)) or _inner_name(part, (".gz", ".tgz", ".z"))
    stream(part, ctx, lambda: zlib.decompressobj(wbits=31), name)


@register("bzip2")
def decode_bzip2(part: Part, ctx: Context) -> None:
    stream(part, ctx, bz2.BZ2Decompressor, _inner_name(part, (".bz2", ".tbz")))


@register("xz")
def decode_xz(part: Part, ctx: Context) -> None:
    stream(part, ctx, lzma.LZMADecompressor, _inner_name(part, (".xz", ".txz")))


def _gzip_name(head: bytes) -> str:
    """The FNAME field of a gzip header, if any (RFC 1952)."""
    if len(head) < 10 or not head[3] & 0x08:
        return ""
    pos = 10
    if head[3] & 0x04:  # FEXTRA
        if len(head) < 12:
            return ""
        pos += 2 + int.from_bytes(head[10:12], "little")
    end = head.find(b"\0", pos)
    if end < 0:
        return ""
    return head[pos:end].decode("latin-1").translate({c: None for c in range(32)})[:255]
