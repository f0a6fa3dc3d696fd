"""Archive members as parts: their names made harmless, their bytes charged.

A member's name is hostile input. It is kept (cleaned) for the tree, the
logs and the banned-name rules, and never used as a path: in-process decoders
hold members in memory or in spill files named after the part id, so `..`,
absolute paths and drive letters cannot reach the file system through us.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part, clip_name
from amavisd.decode.registry import Context, WorkDirFailed
from amavisd.printable import printable

MAX_NAME = 1024
CHUNK = 1024 * 1024


def is_ours(err: BaseException) -> bool:
    """A failure of ours, not of the input: a limit, our work dir, memory, or
    an OSError with an errno (a real read or write: a library reporting bad
    data raises OSError without one, as bz2 and olefile do). A reader's broad
    `except` for hostile input re-raises these: the engine makes them a
    tempfail or a limit, never a decode error."""
    return isinstance(err, (LimitExceeded, WorkDirFailed, MemoryError)) or (
        isinstance(err, OSError) and err.errno is not None)


def clean_name(raw: str | bytes) -> str:
    """A member name as a relative, printable path: no NUL or control
    characters, no drive letter, no root, no `.`/`..` components."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("cp437")  # the zip default, and total
    name = printable(raw).replace("\\", "/")
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        name = name[2:]
    kept = [c for c in name.split("/") if c not in ("", ".", "..")]
    return clip_name("/".join(kept), MAX_NAME)


def add_member(ctx: Context, archive: Part, name: str | bytes, data: bytes,
               flags: Iterable[str] = (), **fields) -> Part:
    """One member read fully by an in-process decoder."""
    child = ctx.add(archive, data, name=clean_name(name), **fields)
    child.flags.update(flags)
    return child


def stream_member(ctx: Context, archive: Part, name: str | bytes, chunks: Iterable[bytes],
                  **fields) -> Part:
    """One member read in chunks: each is charged before it is kept, so a
    member that expands without end stops at the quota. The caller flags the
    archive; a member cut short by an error is flagged truncated here."""
    sink = ctx.sink(archive, name=clean_name(name), **fields)
    try:
        for chunk in chunks:
            sink.write(chunk)
    except BaseException:
        sink.finish(truncated=True)
        raise
    return sink.finish()


class Truncated(Exception):
    """The archive ends inside a header, a name or member data."""


def read_exact(fh: BinaryIO, size: int) -> bytes:
    """`size` bytes of a header, or Truncated."""
    data = fh.read(size)
    if len(data) != size:
        raise Truncated(f"needed {size} bytes, {len(data)} left")
    return data


def member_chunks(fh: BinaryIO, size: int, ctx: Context) -> Iterator[bytes]:
    """A member's `size` bytes from `fh` in bounded chunks (for stream_member),
    checking the clock between them; Truncated when the archive ends first."""
    while size > 0:
        chunk = fh.read(min(size, CHUNK))
        if not chunk:
            raise Truncated(f"member data cut short, {size} bytes missing")
        size -= len(chunk)
        yield chunk
        ctx.budget.check_time()


def harvest(ctx: Context, archive: Part, outdir: str) -> list[str]:
    """Turn what an external unpacker wrote under `outdir` into parts.

    The walk never follows a link: regular files become parts (opened with
    O_NOFOLLOW); a link becomes a part holding its target, flagged `link`
    (a link entry's data is its target, which some readers write as a
    regular file: it is scanned); devices and the like are skipped and their
    names returned, so the caller can record them. Files are consumed in
    name order, so the tree is the same from run to run.
    """
    skipped: list[str] = []
    for top, dirs, files in os.walk(outdir, followlinks=False):
        dirs.sort()
        for entry in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, entry)
            rel = os.path.relpath(path, outdir)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(os.fsencode(path))
                add_member(ctx, archive, os.fsencode(rel), target, flags=("link",))
                os.unlink(path)
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append(rel)
                continue
            ctx.budget.check_time()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                stream_member(ctx, archive, os.fsencode(rel),
                              iter(lambda fh=fh: fh.read(1 << 20), b""))
            os.unlink(path)
    return skipped
