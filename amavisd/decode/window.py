"""Big messages a window at a time: mapped, searched and copied, never held.

Why: a 50 MiB message read into bytes, split as bytes and decoded whole cost
the worker twice to four times its size in RSS. A message or a spilled part
larger than MAP_ABOVE is mapped read-only instead (mmap): slicing and regexes
work on the mapping as on bytes. But the file pages a scan touches count in
RSS for as long as they are mapped, and one regex call over 50 MiB touches all
of it; so every long scan goes a WINDOW at a time and `release()` drops the
mapped pages after each (MADV_DONTNEED: they come back from the page cache if
needed again). Small buffers stay plain bytes and take the fast path: one
window, nothing to release.

What it must never do: map a file someone else may shrink while we read it
(a page past the new end is a SIGBUS that kills the worker): the pipeline
maps only files that are ours (`private`), and copies others first.
mmap has no `in`, `startswith` or `count` for byte strings (`in` silently
compares single bytes): code that may get a mapping uses `find` and slices.

A span that must be held whole (a part small enough to stay in memory) is
read from the mapping's file (`copy`, pread) rather than sliced: a slice
faults every page of the span in, so it cost twice its size at its peak
(the copy and the mapped pages). Decoded spans are gathered into one bytes
object as they come (`gather`), never joined from a list (twice again).
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import re
import weakref
from collections.abc import Iterable, Iterator

WINDOW = 4 * 1024 * 1024  # bytes one scan touches before the pages are dropped
LINES = 256 * 1024  # bytes one decoding step takes: its input and output are copies
MAP_ABOVE = 256 * 1024  # smaller messages and parts are read as bytes: faster (1 MiB cost 2.5x)
OVERLAP = 64 * 1024  # a heuristic match longer than this across a window edge is missed

Buffer = bytes | mmap.mmap


class Mapping(mmap.mmap):
    """A read-only mapping that keeps its file open (`fd`, closed with it),
    so what is copied out of it is read, not faulted in."""

    fd = -1

    def closing(self) -> None:
        """Closes `fd` (map_fd sets it; once only, or at collection)."""


def mapped(data: object) -> bool:
    return isinstance(data, mmap.mmap)


def release(data: object) -> None:
    """Give back the pages of a mapping touched so far (no-op for bytes)."""
    if isinstance(data, mmap.mmap) and not data.closed and len(data):
        data.madvise(mmap.MADV_DONTNEED)


def close(data: object) -> None:
    """Unmap now; a view still exported (a traceback's frame) leaves it to the GC."""
    if isinstance(data, mmap.mmap):
        if isinstance(data, Mapping):
            data.closing()  # its file: nothing reads it after this
        try:
            data.close()
        except BufferError:
            pass


def map_fd(fd: int, size: int) -> Mapping:
    """`fd` mapped read-only; the mapping holds a duplicate of it for `copy`."""
    data = Mapping(fd, size, access=mmap.ACCESS_READ)
    data.fd = os.dup(fd)
    data.closing = weakref.finalize(data, os.close, data.fd)
    return data


def map_file(path: str) -> Buffer:
    """A spilled part's bytes: read when small, mapped when large."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= MAP_ABOVE:
            return fh.read()
        return map_fd(fh.fileno(), size)


def private(fd: int) -> bool:
    """A file only we can change: nameless (O_TMPFILE, memfd, unlinked) and ours."""
    st = os.fstat(fd)
    return st.st_nlink == 0 and st.st_uid == os.geteuid()


def search(pattern: re.Pattern[bytes], data: Buffer, pos: int = 0, end: int | None = None,
           margin: int | None = None) -> re.Match[bytes] | None:
    """`pattern.search(data, pos, end)`, a window at a time on a mapping.

    Exact for patterns whose matches are found once `margin` bytes of them
    are in the window (a bounded prefix before any unbounded run, the end
    of the data matched by `$`, `\\Z` or a lookahead): a match that reaches
    the window's edge is decided again against the real end. Windows are
    at least four margins long, so a long margin (a hostile boundary) costs
    bigger windows, never a search per byte."""
    end = len(data) if end is None else end
    margin = OVERLAP if margin is None else margin
    size = max(WINDOW, 4 * margin)
    if not mapped(data) or end - pos <= size:
        return pattern.search(data, pos, end)
    while True:
        stop = min(end, pos + size)
        match = pattern.search(data, pos, stop)
        release(data)
        if match is None:
            if stop == end:
                return None
            pos = max(pos + 1, stop - margin)
        elif stop == end or match.end() + margin <= stop:
            return match
        else:
            again = pattern.match(data, match.start(), end)
            if again is not None:
                return again
            pos = match.start() + 1


def find(data: Buffer, needle: bytes, pos: int = 0, end: int | None = None) -> int:
    """`data.find(needle, pos, end)`, releasing a mapping's pages as it goes."""
    end = len(data) if end is None else end
    if not mapped(data):
        return data.find(needle, pos, end)
    while pos < end:
        stop = min(end, pos + max(WINDOW, 2 * len(needle)))  # a needle always fits
        found = data.find(needle, pos, stop)
        release(data)
        if found >= 0 or stop == end:
            return found
        pos = max(pos + 1, stop - len(needle) + 1)
    return -1


def spans(data: Buffer, start: int, end: int, size: int | None = None,
          whole_lines: bool = True) -> Iterator[tuple[int, int]]:
    """[start, end) cut into windows (of LINES bytes) that end after a line
    end where there is one, for decoders that work line by line; pages
    released between. A line longer than a window is one window, unless
    the decoder takes a cut anywhere (`whole_lines` False: base64)."""
    size = size or LINES
    while start < end:
        stop = min(end, start + size)
        if stop < end:
            cut = data.rfind(b"\n", start, stop)
            if cut < 0 and whole_lines:  # one line longer than a window: one window
                cut = data.find(b"\n", stop, end)
            if cut >= 0 or whole_lines:
                stop = end if cut < 0 else cut + 1
        yield start, stop
        release(data)
        start = stop


def copy(data: Buffer, start: int, end: int) -> bytes:
    """data[start:end] as bytes: of a mapping, read from its file (the copy
    is the only memory it costs), else sliced."""
    end = min(end, len(data))
    if not isinstance(data, Mapping) or end <= start:
        return data[start:end]
    out = os.pread(data.fd, end - start, start)
    if len(out) != end - start:  # a read may be short: the rest, a window at a time
        out = gather(itertools.chain([out], _preads(data, start + len(out), end, WINDOW)))
    return out


def _preads(data: Mapping, start: int, end: int, size: int) -> Iterator[bytes]:
    while start < end:
        chunk = os.pread(data.fd, min(size, end - start), start)
        if not chunk:
            raise OSError(f"mapped file ends at {start}, before {end}")
        start += len(chunk)
        yield chunk


def gather(chunks: Iterable[bytes]) -> bytes:
    """The chunks as one bytes object, at the cost of the result only (a
    BytesIO grows in place and hands its buffer over; a join or a
    bytearray's bytes() hold the pieces and the whole at once)."""
    out = io.BytesIO()
    for chunk in chunks:
        out.write(chunk)
    return out.getvalue()


def chunks(data: Buffer, start: int, end: int, size: int = 256 * 1024) -> Iterator[bytes]:
    """data[start:end] as bytes of `size`: of a mapping, read from its file,
    else sliced with the pages released every WINDOW."""
    if isinstance(data, Mapping):
        yield from _preads(data, start, end, size)
        return
    view = memoryview(data)
    try:
        done = 0
        for at in range(start, end, size):
            yield bytes(view[at:min(end, at + size)])
            done += size
            if done >= WINDOW:
                release(data)
                done = 0
    finally:
        view.release()
    release(data)
