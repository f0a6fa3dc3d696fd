"""The part tree: every message becomes a tree of parts.

A part knows its parent, its depth (the message is level 0; each decoded
layer adds one, while multipart nesting inside one MIME message does not),
its declared name and MIME type, the type detected from its content, its size
and flags (encrypted, truncated, decode-error, ambiguous, ...).

Bytes stay in memory while small; a large part is spilled to the message's
work dir, so a message whose parts are all small never touches the disk. A
big message's root holds a read-only mapping of it (`decode.window`), and a
big part is written to its file as it is decoded (`add_streamed`), never
built whole in memory.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from amavisd.decode import window

CHUNK = 256 * 1024

# Flags that say "we could not fully look at this part".
PROBLEM_FLAGS = frozenset({"decode-error", "truncated", "encrypted", "too-deep", "limit",
                           "undecipherable", "internal-error"})
# Informational flags for policy (banned rules), not problems: "macros" marks an
# Office document or OOXML zip that carries a VBA project.
INFO_FLAGS = frozenset({"macros"})


def clip_name(name: str, most: int) -> str:
    """A declared name kept to `most` characters without losing its ends:
    the banned rules read a name's extensions at its end (and sometimes its
    start), so a plain cut let "AAA...(300)....vbs" through as "AAA...".
    The middle gives way ("…", which no rule reads as a dot); a run of
    trailing dots and spaces (Windows drops them when it saves the file)
    is kept as its first character, so what Windows would save still ends
    the name the rules see."""
    if len(name) <= most:
        return name
    body = name.rstrip(". ")
    trail = name[len(body):len(body) + 1]
    if len(body) + len(trail) <= most:
        return body + trail
    head = (most - len(trail) - 1) // 2
    tail = most - len(trail) - 1 - head
    return body[:head] + "\u2026" + body[len(body) - tail:] + trail


_CONTROL_AS_MARK = {c: "?" for c in range(32)}


def declared_name(text: str, most: int = 255) -> str:
    """A name a sender declared (MIME, uuencode, yEnc), as every part keeps
    it: control characters as "?" (it is shown in replies, notices, logs),
    clipped to `most` without losing its ends."""
    return clip_name(text.translate(_CONTROL_AS_MARK), most)


def other_names(name: str, found: Iterable[str]) -> tuple[str, ...]:
    """`found` less empties, repeats and `name` itself: a part's alt_names."""
    return tuple(n for n in dict.fromkeys(found) if n and n != name)


def create_private(path: str) -> BinaryIO:
    """A new file for our eyes only (0600): never over an existing file, never
    through a link planted at `path`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


@dataclass(eq=False)
class Part:
    id: str
    data: window.Buffer = b""  # bytes, or for a big message's root a read-only mmap
    name: str = ""  # declared file name (MIME filename, archive member name, ...)
    # other names a reader may give it (a mail client, an unzipper), checked too
    alt_names: tuple[str, ...] = ()
    mime_type: str = ""  # declared MIME type
    detected: str = ""  # short type found from the content ("zip", "mail", "text", ...)
    detected_mime: str = ""  # libmagic's MIME type, where asked
    depth: int = 0
    parent: Part | None = field(default=None, repr=False)
    children: list[Part] = field(default_factory=list, repr=False)
    flags: set[str] = field(default_factory=set)
    spill_path: str | None = None  # set when the bytes live on disk instead of in `data`
    spilled_size: int = 0

    @property
    def size(self) -> int:
        return len(self.data) or self.spilled_size  # spilled, or detached (see detach)

    @property
    def path(self) -> str:
        """Location in the tree, e.g. 'p001/p003', for logs and reports."""
        chain = []
        node: Part | None = self
        while node is not None:
            chain.append(node.id)
            node = node.parent
        return "/".join(reversed(chain))

    @property
    def expanded(self) -> bool:
        """True when the children fully stand for this part's content."""
        return "expanded" in self.flags

    def head(self, size: int = 8192) -> bytes:
        """The first bytes, for type detection, wherever the part lives."""
        if self.spill_path:
            with open(self.spill_path, "rb") as fh:
                return fh.read(size)
        return self.data[:size]

    def chunks(self) -> Iterator[bytes]:
        if self.spill_path:
            with open(self.spill_path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        else:
            yield from window.chunks(self.data, 0, len(self.data), CHUNK)

    def open(self) -> BinaryIO:
        """The bytes as a seekable binary file, for readers that seek
        (archive directories): the spill file, or a view of memory (of a
        mapping too: a BytesIO of it would copy it whole)."""
        if self.spill_path:
            return open(self.spill_path, "rb")
        if window.mapped(self.data):
            return io.BufferedReader(_MappedReader(self.data))  # type: ignore[arg-type]
        return io.BytesIO(self.data)

    @contextlib.contextmanager
    def mapped(self) -> Iterator[window.Buffer]:
        """The bytes for decoders that search them (mail, text): in memory as
        they are, a big spill file mapped read-only for the time of the block."""
        if not self.spill_path:
            yield self.data
            return
        data = window.map_file(self.spill_path)
        try:
            yield data
        finally:
            window.close(data)

    def detach(self) -> None:
        """Drop a mapping about to be closed (the message's, after the
        pipeline), keeping the size the tree reports."""
        if window.mapped(self.data):
            self.spilled_size, self.data = len(self.data), b""

    def read(self) -> bytes:
        if self.spill_path:
            with open(self.spill_path, "rb") as fh:
                return fh.read()
        return self.data

    def write_to(self, path: str) -> None:
        """A private copy of the bytes at `path` (for external tools and scanners)."""
        with create_private(path) as fh:
            for chunk in self.chunks():
                fh.write(chunk)

    def spill(self, directory: str) -> None:
        """Move the bytes to a file (0600) in the message's work dir."""
        if self.spill_path:
            return
        path = os.path.join(directory, self.id)
        with create_private(path) as fh:
            fh.write(self.data)
        self.spilled_size = len(self.data)
        self.spill_path = path
        self.data = b""

    def add(self, child: Part, layer: bool = True) -> Part:
        child.parent = self
        child.depth = self.depth + (1 if layer else 0)
        self.children.append(child)
        return child

    def walk(self) -> Iterator[Part]:
        stack = [self]
        while stack:
            part = stack.pop()
            yield part
            stack.extend(reversed(part.children))

    def scannable(self) -> Iterator[Part]:
        """What the scanners must see: every part with bytes whose content is
        not entirely represented by its children (and the partial ones too)."""
        for part in self.walk():
            if part.size and (not part.expanded or part.flags & PROBLEM_FLAGS):
                yield part

    def describe(self) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "name": self.name,
            "mime_type": self.mime_type,
            "detected": self.detected,
            "detected_mime": self.detected_mime,
            "size": self.size,
            "depth": self.depth,
            "flags": sorted(self.flags - {"expanded"}),
            "children": [c.describe() for c in self.children],
        }


class _MappedReader(io.RawIOBase):
    """A seekable file over a mapping that copies only what is read."""

    def __init__(self, data: window.Buffer) -> None:
        super().__init__()
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        chunk = self._data[self._pos:self._pos + len(buffer)]
        buffer[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class PartNumbering:
    """Hands out p001, p002, ... in discovery order (amavisd-new's naming)."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"p{self._n:03d}"
