"""The part tree: every message becomes a tree of parts.

A part keeps its decoded bytes in memory (scanners get them by INSTREAM, no
temp files), its declared name and MIME type, its depth (the message is level
0, each decoded layer adds one) and flags such as `decode-error`. Decoders
build children; scanners look at leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class Part:
    id: str
    data: bytes = b""
    name: str = ""
    mime_type: str = ""
    depth: int = 0
    parent: Part | None = field(default=None, repr=False)
    children: list[Part] = field(default_factory=list, repr=False)
    flags: set[str] = field(default_factory=set)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def path(self) -> str:
        """Location in the tree, e.g. 'p001/p003', for logs and reports."""
        chain = []
        node: Part | None = self
        while node is not None:
            chain.append(node.id)
            node = node.parent
        return "/".join(reversed(chain))

    def add(self, child: Part) -> Part:
        child.parent = self
        child.depth = self.depth + 1
        self.children.append(child)
        return child

    def walk(self) -> Iterator[Part]:
        yield self
        for child in self.children:
            yield from child.walk()

    def leaves(self) -> Iterator[Part]:
        for part in self.walk():
            if not part.children:
                yield part

    def describe(self) -> dict:
        return {
            "id": self.id,
            "path": self.path,
            "name": self.name,
            "mime_type": self.mime_type,
            "size": self.size,
            "depth": self.depth,
            "flags": sorted(self.flags),
            "children": [c.describe() for c in self.children],
        }


class PartNumbering:
    """Hands out p001, p002, ... in discovery order (amavisd-new's naming)."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"p{self._n:03d}"
