"""The decoder registry and the context a decoder works in.

A decoder is a function `decode(part, ctx)` registered for one or more
detected types. It reads `part`, and adds children through `ctx.add()`,
which charges the budget, numbers the part and spills big ones to disk.
A decoder raises `DecodeError` for bad input (the part is flagged and still
scanned as it is) and never needs to catch `LimitExceeded`.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from amavisd.decode.limits import Budget, Limits
from amavisd.decode.parts import Part, PartNumbering, create_private
from amavisd.verdict import Unchecked

Decoder = Callable[[Part, "Context"], None]
REGISTRY: dict[str, Decoder] = {}
# Optional cheap test "would this decoder find anything?", for decoders that
# usually find nothing (text): at the depth limit only a real find is UNCHECKED.
PROBES: dict[str, Callable[[Part], bool]] = {}


class DecodeError(Exception):
    """The input is not what it claimed; the message says what was wrong."""


class WorkDirFailed(Exception):
    """Our own work dir failed (disk full, quota, I/O error): a tempfail for
    the whole message, never a property of the input. Deliberately not an
    OSError, so a decoder's `except OSError` for bad input cannot swallow it."""


RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS,
                             errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@contextmanager
def work_dir_io(what: str) -> Iterator[None]:
    """Our own file work (creating, spilling, writing): any OSError there is
    WorkDirFailed, whatever the decoder around it catches."""
    try:
        yield
    except OSError as err:
        raise WorkDirFailed(f"{what}: {err.strerror or err}") from None


class Undecipherable(DecodeError):
    """A part positively identified as an archive or compressed stream holds
    content we could not read (an unknown method, a failed integrity check, a
    tool's failure). What could be read is kept and scanned; the message is
    UNCHECKED of kind `undecipherable`, never CLEAN."""


def register(*kinds: str, probe: Callable[[Part], bool] | None = None
             ) -> Callable[[Decoder], Decoder]:
    """Register `fn` for each detected type. A type has one decoder: a second
    one for it is refused at import (a silent overwrite would leave one of
    them dead, and which one would depend on the order of imports)."""

    def wrap(fn: Decoder) -> Decoder:
        for kind in kinds:
            taken = REGISTRY.get(kind)
            if taken is not None and taken is not fn:
                raise ValueError(f"two decoders for type {kind!r}: {_name(taken)} and "
                                 f"{_name(fn)}")
        for kind in kinds:
            REGISTRY[kind] = fn
            if probe is not None:
                PROBES[kind] = probe
        return fn

    return wrap


def _name(fn: Decoder) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class Context:
    def __init__(self, limits: Limits, message_size: int, tempbase: str | None = None):
        self.limits = limits
        self.budget = Budget(limits, message_size)
        self.numbering = PartNumbering()
        self.unchecked: list[Unchecked] = []
        self.logged_failure = False  # a decoder's traceback was logged for this message
        self.in_memory = 0  # bytes of decoded parts held in memory, not spilled
        # what they may add up to (a big message is mapped, so what is held is
        # most of its cost)
        self.hold = limits.memory_for(message_size)
        self.tempbase = tempbase
        self._workdir: str | None = None

    def workdir(self) -> str:
        """The message's private work dir, created only when something needs it."""
        if self._workdir is None:
            with work_dir_io("cannot create a work dir"):
                self._workdir = tempfile.mkdtemp(prefix=f"amavisd-{os.getpid()}-",
                                                 dir=self.tempbase)
        return self._workdir

    def new_part(self, data: bytes = b"", **fields) -> Part:
        return Part(id=self.numbering.next(), data=data, **fields)

    def add(self, parent: Part, data: bytes, layer: bool = True, **fields) -> Part:
        """A decoded child of `parent`: counted, charged, spilled if large."""
        self.budget.charge_part()
        self.budget.check_part_size(len(data), parent.path)
        self.budget.charge_bytes(len(data))
        child = parent.add(self.new_part(data, **fields), layer=layer)
        if self.may_hold(len(data)):
            self.in_memory += len(data)
        else:
            with work_dir_io(f"cannot spill {child.path}"):
                child.spill(self.workdir())
        return child

    def may_hold(self, size: int) -> bool:
        """Whether a part of `size` bytes may stay in memory: a large part, or
        many small ones past max_memory (a bomb of small members), go to disk,
        so a worker never holds the whole expansion quota in RAM."""
        return (size <= self.limits.spill_threshold
                and self.in_memory + size <= self.hold)

    def sink(self, parent: Part, layer: bool = True, **fields) -> Sink:
        """A child written chunk by chunk (decompressors): charged as it grows."""
        return Sink(self, parent, layer, fields)

    def add_container(self, parent: Part, layer: bool = True, **fields) -> Part:
        """A structural node (e.g. a multipart) that holds no bytes of its own."""
        self.budget.charge_part()
        return parent.add(self.new_part(b"", **fields), layer=layer)

    def note_unchecked(self, part: Part, reason: str, kind: str = "limit") -> None:
        """`kind` (see verdict.Unchecked) is what policy acts on, not `reason`."""
        self.unchecked.append(Unchecked(f"{reason} ({part.path})", kind))

    def scratch_dir(self, part: Part) -> str:
        """A fresh private (0700) dir in the work dir, e.g. for an external unpacker."""
        with work_dir_io("cannot create a scratch dir"):
            return tempfile.mkdtemp(prefix=f"x{part.id}-", dir=self.workdir())

    def cleanup(self) -> None:
        """Remove the work dir; rmtree never follows links out of it."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


class Sink:
    """Collects a streamed child in memory, moving to a file past the spill threshold.

    Every chunk is charged to the budget before it is kept, so a bomb stops
    within one chunk of the quota. `finish()` adds the part; on a limit the
    caller still calls `finish(truncated=True)` so what was decoded is scanned.
    """

    def __init__(self, ctx: Context, parent: Part, layer: bool, fields: dict):
        self.ctx = ctx
        self.parent = parent
        self.layer = layer
        self.fields = fields
        self.buffer = io.BytesIO()  # getvalue() hands its buffer over: no second copy
        self.file = None
        self.path: str | None = None
        self.size = 0
        ctx.budget.charge_part()

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.ctx.budget.check_part_size(self.size + len(chunk), self.parent.path)
        self.ctx.budget.charge_bytes(len(chunk))
        self.size += len(chunk)
        with work_dir_io(f"cannot write {self.parent.path}'s child"):
            if self.file is None and not self.ctx.may_hold(self.buffer.tell() + len(chunk)):
                self.path = os.path.join(self.ctx.workdir(), "s" + self.ctx.numbering.next())
                self.file = create_private(self.path)
                self.file.write(self.buffer.getbuffer())
                self.buffer = io.BytesIO()
            if self.file is not None:
                self.file.write(chunk)
            else:
                self.buffer.write(chunk)

    def finish(self, truncated: bool = False) -> Part:
        child = self.parent.add(self.ctx.new_part(b"", **self.fields), layer=self.layer)
        if self.file is not None:
            with work_dir_io(f"cannot write {child.path}"):
                self.file.close()
            child.spill_path = self.path
            child.spilled_size = self.size
        else:
            child.data = self.buffer.getvalue()
            self.ctx.in_memory += len(child.data)
        if truncated:
            child.flags.add("truncated")
        return child


def add_streamed(ctx: Context, parent: Part, chunks: Iterable[bytes], layer: bool = True,
                 **fields) -> Part:
    """A child of `parent` decoded chunk by chunk straight into a file of the
    work dir (a big MIME body), never whole in memory. It is charged once
    written, with the checks `Context.add` makes, so the tree and the limits
    are those of the in-memory path; the file is at most as big as the span
    it came from, so writing before charging cannot be a bomb."""
    with work_dir_io(f"cannot spill {parent.path}'s child"):
        fd, path = tempfile.mkstemp(prefix="d", dir=ctx.workdir())
    size = 0
    try:
        with work_dir_io(f"cannot spill {parent.path}'s child"), os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
        ctx.budget.charge_part()
        ctx.budget.check_part_size(size, parent.path)
        ctx.budget.charge_bytes(size)
    except BaseException:
        os.unlink(path)
        raise
    child = parent.add(ctx.new_part(b"", **fields), layer=layer)
    child.spill_path, child.spilled_size = path, size
    return child
