"""MIME structure from bytes: where each entity, body, preamble and epilogue is.

Why our own splitter: the standard library's parser builds the whole tree at
once and recursively (nested message/rfc822 or multiparts reach Python's
recursion limit before any limit of ours applies), and it holds one str per
line (a 64 MB message of short lines took 2 GB). This one works on offsets
into the message's bytes, iteratively, with an explicit stack of the open
multiparts, and uses the stdlib only to parse one entity's Content-* fields
at a time. Sans-IO: bytes in, events out; it decodes no transfer encoding,
never recurses and never raises on any input. The bytes may be a read-only
mapping of a big message (`decode.window`): boundaries are looked for a
window at a time, its pages given back behind each, so splitting a 50 MiB
message does not hold 50 MiB.

It reads structure as the stdlib's compat32 parser does, so that the part
tree stays the one the rest of the code and its tests know:

- lines end at CRLF, LF or a bare CR;
- a header block ends at the first line that is neither a header field nor
  a continuation; a blank line there is consumed;
- a boundary line is `--boundary`, then optionally `--` (the close), then
  optional spaces and tabs; the line end before it belongs to it, so a
  part inside a multipart loses its last line end;
- a boundary line of ANY open multipart ends the current part (RFC 2046
  5.1.2), the outermost multipart it belongs to taking it;
- several delimiter lines in a row open one part, not empty ones;
- message/* bodies are not parsed here: they are handed back whole (a
  delivery-status too, where the stdlib made one message per block), for
  the engine to decompose one layer down under its own depth limit.

Where it departs from the stdlib, it does so to lose nothing: what follows a
close delimiter found before any open delimiter is an epilogue (the stdlib
drops it), and a last header line starting with "From " opens the body
together with the blank line after it.

Where mail readers could split differently, it says so (`Reread`): a
multipart cut short by an outer boundary is what a reader that only looks
for the innermost boundary reads on past that line.
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message

from amavisd.decode import window

MAX_NESTING = 100  # multiparts inside one message; deeper ones are handed back raw
MAX_FIELDS = 100  # Content-* header fields read in one entity
# A longer field is not parsed (the stdlib's parameter parser is quadratic:
# a 3.8 MB Content-Type of 64k parameters took 17 s), and the entity is UNCHECKED.
MAX_FIELD_BYTES = 16 * 1024
TICK_EVERY = 4096  # candidate boundary lines between two calls of `tick`

# A run of header field and continuation lines (the stdlib's headerRE, per line).
_HEADER_RUN = re.compile(
    rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])[^\r\n]*(?:\r\n|\r|\n|\Z))*+")
# The fields the tree needs, with their continuation lines: type, encoding,
# and the headers any client takes a part's name from (mime.names).
_CONTENT_FIELD = re.compile(
    rb"(?:^|(?<=\r))(?:content-(?:type|transfer-encoding|disposition|name|description)"
    rb"|x-sun-data-name):[^\r\n]*+(?:\r\n|\r|\n)?"
    rb"(?:[ \t][^\r\n]*+(?:\r\n|\r|\n)?)*+", re.I | re.M)
# Header blocks up to this size are searched for those fields line by line
# (content_fields); a bigger one (a hostile block in a mapped message) by the
# regex alone, never copied.
FIELD_SCAN_COPY = 1024 * 1024
_LINE = re.compile(rb"[^\r\n]*+")
_BLANKS = re.compile(rb"[ \t]*+")
_HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)


@dataclass(eq=False)
class Entity:
    """One MIME entity: its header block, where its body starts, and the
    boundaries of the multiparts it sits in (outermost first)."""

    start: int
    header_end: int
    body_start: int
    headers: Message  # its Content-* fields only, parsed by the stdlib (compat32)
    context: tuple[bytes, ...]
    fields_dropped: bool = False  # more than MAX_FIELDS Content-* fields, or one too long

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()

    @property
    def subpart(self) -> bool:
        return bool(self.context)


@dataclass
class Open:
    """A multipart whose first delimiter was found: a container opens."""
    entity: Entity


@dataclass
class Close:
    """The innermost open multipart ends (`closed`: by its close delimiter)."""
    entity: Entity
    closed: bool


@dataclass
class Body:
    """A non-multipart entity (message/* included, and a multipart without
    any delimiter of its own): its body is data[start:end]."""
    entity: Entity
    start: int
    end: int


@dataclass
class Text:
    """Preamble or epilogue of the innermost open multipart (or what follows
    a premature close delimiter): data[start:end]."""
    name: str
    start: int
    end: int


@dataclass
class TooDeep:
    """A multipart past MAX_NESTING: the whole entity, raw, data[start:end]."""
    entity: Entity
    start: int
    end: int


@dataclass
class Reread:
    """An entity that readers may split differently: data[start:end] read
    as a message of its own gives the other reading."""
    entity: Entity
    start: int
    end: int


Event = Open | Close | Body | Text | TooDeep | Reread


@dataclass
class Hit:
    """A boundary line: where it starts and ends, whose it is, open or close."""
    start: int
    end: int
    level: int
    close: bool


class Boundaries:
    """The boundaries of the open multiparts, outermost first, with a lookup
    from boundary to the outermost level that has it."""

    def __init__(self, boundaries: tuple[bytes, ...] = ()) -> None:
        self.stack: list[bytes] = []
        self._levels: dict[bytes, list[int]] = {}
        self._summary: tuple[int, re.Pattern[bytes]] | None = None
        for boundary in boundaries:
            self.push(boundary)

    def push(self, boundary: bytes) -> None:
        self._levels.setdefault(boundary, []).append(len(self.stack))
        self.stack.append(boundary)
        self._summary = None

    def pop(self) -> None:
        boundary = self.stack.pop()
        levels = self._levels[boundary]
        levels.pop()
        if not levels:
            del self._levels[boundary]
        self._summary = None

    def __len__(self) -> int:
        return len(self.stack)

    def level(self, boundary: bytes) -> int | None:
        levels = self._levels.get(boundary)
        return levels[0] if levels else None

    @property
    def longest(self) -> int:
        return self._summarize()[0]

    @property
    def pattern(self) -> re.Pattern[bytes]:
        """Finds lines that look like a boundary line of one of them (the
        literal "--" first lets the regex engine skip fast through bodies)."""
        return self._summarize()[1]

    def _summarize(self) -> tuple[int, re.Pattern[bytes]]:
        if self._summary is None:
            boundaries = tuple(sorted(self._levels, key=len, reverse=True))
            self._summary = (max(map(len, boundaries), default=0), _line_pattern(boundaries))
        return self._summary


@functools.lru_cache(maxsize=64)
def _delimiter_run(boundary: bytes) -> re.Pattern[bytes]:
    return re.compile(b"(?:--" + re.escape(boundary) + rb"(?:--)?[ \t]*+(?:\r\n|\r|\n|\Z))*+")


@functools.lru_cache(maxsize=256)
def _line_pattern(boundaries: tuple[bytes, ...]) -> re.Pattern[bytes]:
    alternatives = b"|".join(re.escape(boundary) for boundary in boundaries)
    return re.compile(b"--(?:" + alternatives + rb")(?:--)?[ \t]*+(?=[\r\n]|\Z)")


def content_fields(data: window.Buffer, pos: int, end: int) -> Iterator[re.Match[bytes]]:
    """`_CONTENT_FIELD.finditer(data, pos, end)`, tried only where a line
    starts with "content-" or "x-sun-data-name:" (any case), found by bytes.find in a lower-cased
    copy of the block: the regex alone tries its start at every byte (17 us
    on an 840-byte header block, every entity of every message; 2.5 us this way)."""
    if end - pos > FIELD_SCAN_COPY:
        yield from _CONTENT_FIELD.finditer(data, pos, end)
        return
    low = bytes(data[pos:end]).lower()  # ASCII only, as re.I on bytes
    starts = [pos] if low.startswith((b"content-", b"x-sun-data-name:")) else []
    for line_start in (b"\ncontent-", b"\rcontent-", b"\nx-sun-data-name:", b"\rx-sun-data-name:"):
        at = low.find(line_start)
        while at >= 0:
            starts.append(pos + at + 1)
            at = low.find(line_start, at + 1)
    done = pos  # where finditer would search on from: past the last match
    for start in sorted(starts):
        if start >= done and (match := _CONTENT_FIELD.match(data, start, end)) is not None:
            done = match.end()
            yield match


class Splitter:
    """Walks one message's bytes and yields its structure as events."""

    def __init__(self, data: window.Buffer, max_nesting: int = MAX_NESTING,
                 tick: Callable[[], None] | None = None) -> None:
        self.data = data
        self.end = len(data)
        self.max_nesting = max_nesting
        self.tick = tick
        self._seen = 0  # candidate boundary lines looked at

    # -- the walk ---------------------------------------------------------

    def walk(self) -> Iterator[Event]:
        opened: list[Entity] = []  # the open multiparts, outermost first
        bounds = Boundaries()
        pos = 0
        while True:
            entity = self.entity(pos, bounds, opened)
            hit = yield from self._one_entity(entity, bounds, opened)
            pos = yield from self._after(hit, bounds, opened)
            if pos is None:
                return

    def _one_entity(self, entity: Entity, bounds: Boundaries,
                    opened: list[Entity]) -> Iterator[Event]:
        """Events for one entity up to the line that ends it (returned: a Hit,
        or None at the end of the data)."""
        boundary = boundary_of(entity.headers)
        if boundary is None:
            stop, hit = self.next_boundary(entity.body_start, bounds)
            if entity.headers.get_content_maintype() != "multipart":
                # (a multipart without a boundary keeps its last line end, as in the stdlib)
                stop = self.trim(entity.body_start, stop, entity)
            yield Body(entity, entity.body_start, stop)
            return hit
        if len(opened) >= self.max_nesting:
            stop, hit = self.next_boundary(entity.start, bounds)
            yield TooDeep(entity, entity.start, self.trim(entity.start, stop, entity))
            return hit
        bounds.push(boundary)
        stop, hit = self.next_boundary(entity.body_start, bounds)
        if hit is not None and hit.level == len(opened) and not hit.close:
            opened.append(entity)
            yield Open(entity)
            yield from self.text("(preamble)", entity.body_start, self.trim(entity.body_start, stop))
            return hit
        bounds.pop()
        # No delimiter of its own: its lines are the body of a leaf (kept whole,
        # as the stdlib does).
        yield Body(entity, entity.body_start, stop)
        if hit is not None and hit.level == len(opened):
            # a close delimiter before any open one: what follows is kept (the
            # stdlib drops it), as text up to the next boundary around it
            after = hit.end
            stop, hit = self.next_boundary(after, bounds)
            yield from self.text("(after the close delimiter)", after, self.trim(after, stop, entity))
        elif hit is not None and hit.level == len(opened) - 1:
            yield self.reread(entity, boundary, hit)
        return hit

    def _after(self, hit: Hit | None, bounds: Boundaries,
               opened: list[Entity]) -> Iterator[Event]:
        """Close what `hit` ends; the position of the next part, or None when done."""
        while opened:
            innermost = len(opened) - 1
            if hit is not None and hit.level == innermost and not hit.close:
                return self.skip_delimiters(hit, bounds)
            entity = opened.pop()
            bounds_of_entity = bounds.stack[-1]
            bounds.pop()
            if hit is None:
                yield Close(entity, closed=False)
            elif hit.level < innermost:  # an outer boundary cuts it short
                yield Close(entity, closed=False)
                if hit.level == innermost - 1:  # the outermost of those it cuts
                    yield self.reread(entity, bounds_of_entity, hit)
            else:  # its close delimiter: the epilogue runs to the next outer boundary
                after = hit.end
                stop, hit = self.next_boundary(after, bounds)
                yield from self.text("(epilogue)", after, self.trim(after, stop, entity))
                yield Close(entity, closed=True)
        return None

    @staticmethod
    def text(name: str, start: int, end: int) -> Iterator[Text]:
        if end > start:
            yield Text(name, start, end)

    def skip_delimiters(self, hit: Hit, bounds: Boundaries) -> int:
        """Past this delimiter and any more of the same multipart right after it."""
        pos = hit.end
        own = bounds.stack[hit.level]
        if self.data[pos:pos + len(own) + 2] == b"--" + own and bounds.level(
                own + b"--") is None and not (
                own.endswith(b"--") and bounds.level(own[:-2]) is not None):
            # another delimiter line follows (rare: the regex is compiled only
            # then) and no outer boundary can claim these lines: skip the run
            # at C speed
            pos = _delimiter_run(own).match(self.data, pos).end()
        while (next_hit := self.boundary_at(pos, bounds)) is not None \
                and next_hit.level == hit.level:
            self.count_line()
            pos = next_hit.end
        return pos

    def reread(self, entity: Entity, boundary: bytes, cut: Hit) -> Reread:
        """The entity as a reader that ignores outer boundaries sees it: on
        past the line that cut it, up to its own close delimiter (or the end)."""
        own = Boundaries((boundary,))
        pos = cut.start
        while True:
            stop, hit = self.next_boundary(pos, own)
            if hit is None or hit.close:
                return Reread(entity, entity.start, hit.end if hit else stop)
            pos = hit.end

    # -- entities -----------------------------------------------------------

    def entity(self, pos: int, bounds: Boundaries, opened: list[Entity]) -> Entity:
        """Parse the header block at `pos`."""
        data = self.data
        run_end = _HEADER_RUN.match(data, pos).end()
        # a boundary line may look like a header field: it ends the block
        cut, _ = self.next_boundary(pos, bounds, run_end)
        header_end = min(cut, run_end)
        last = self.last_line_start(pos, header_end)
        if last > pos and data[last:last + 5] == b"From ":
            header_end = body_start = last  # the stdlib's first line of the body
        elif cut < run_end:
            body_start = cut
        else:  # a blank line ends the block and is not part of the body
            body_start = run_end + eol_length(data, run_end)
        fields = []
        dropped = False
        for match in content_fields(data, pos, header_end):
            if len(fields) == MAX_FIELDS:
                dropped = True
                break
            if match.end() - match.start() > MAX_FIELD_BYTES:
                dropped = True
                continue
            fields.append(match.group())
        headers = _HEADER_PARSER.parsebytes(b"".join(fields)) if fields \
            else Message(policy=email.policy.compat32)
        if opened and opened[-1].content_type == "multipart/digest":
            headers.set_default_type("message/rfc822")
        return Entity(pos, header_end, body_start, headers, tuple(bounds.stack), dropped)

    def body_end(self, entity: Entity) -> int:
        """Where the body of `entity` ends: the next boundary line around it."""
        stop, _ = self.next_boundary(entity.body_start, Boundaries(entity.context))
        return self.trim(entity.body_start, stop, entity)

    def last_line_start(self, pos: int, end: int) -> int:
        end -= eol_before(self.data, end)
        return max(self.data.rfind(b"\n", pos, end), self.data.rfind(b"\r", pos, end), pos - 1) + 1

    def trim(self, start: int, stop: int, entity: Entity | None = None) -> int:
        """`stop` less the line end before it, which belongs to the boundary
        line (or, inside a multipart, to the end of the data)."""
        if entity is not None and not entity.subpart:
            return stop
        return max(start, stop - eol_before(self.data, stop))

    # -- boundary lines -----------------------------------------------------

    def next_boundary(self, pos: int, bounds: Boundaries,
                      end: int | None = None) -> tuple[int, Hit | None]:
        """The first boundary line starting in [pos, end) (pos a line start):
        (its start, the hit), or (the end of the data, None)."""
        data = self.data
        end = self.end if end is None else end
        if not len(bounds):
            return self.end, None
        pattern = bounds.pattern
        margin = bounds.longest + 8  # "--", the boundary, "--", a line end: then it is found
        while (match := window.search(pattern, data, pos, end, margin)) is not None:
            line = match.start()
            self.count_line()
            if line == 0 or data[line - 1] in b"\r\n":
                hit = self.boundary_at(line, bounds)
                if hit is not None:
                    return line, hit
            pos = line + 1
        return self.end, None

    def count_line(self) -> None:
        """One more candidate boundary line: now and then, `tick` (which may
        raise to stop a message that takes too long)."""
        self._seen += 1
        if self.tick is not None and self._seen % TICK_EVERY == 0:
            self.tick()

    def boundary_at(self, line: int, bounds: Boundaries) -> Hit | None:
        """The boundary line at `line`, if it is one of an open multipart's."""
        data = self.data
        if not len(bounds) or data[line:line + 2] != b"--":
            return None
        start = line + 2
        content_end = _LINE.match(data, start).end()
        longest = bounds.longest + 2
        if content_end - start > longest:  # only blanks may follow a boundary and "--"
            if _BLANKS.match(data, start + longest, content_end).end() != content_end:
                return None
            content = data[start:start + longest]
        else:
            content = data[start:content_end]
        content = content.rstrip(b" \t")
        level, close = bounds.level(content), False
        if content.endswith(b"--"):
            closing = bounds.level(content[:-2])
            if closing is not None and (level is None or closing < level):
                level, close = closing, True
        if level is None:
            return None
        return Hit(line, content_end + eol_length(data, content_end), level, close)


def boundary_of(headers: Message) -> bytes | None:
    """The boundary of a multipart entity as bytes, or None (not a multipart,
    or one without a boundary: the stdlib reads its body as one leaf)."""
    if headers.get_content_maintype() != "multipart":
        return None
    try:
        boundary = headers.get_boundary()
    except Exception:  # a parameter the stdlib cannot take apart
        return None
    if boundary is None:
        return None
    try:  # the stdlib compares it with lines decoded as ASCII + surrogateescape
        return boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # RFC 2231-decoded: a UTF-8 reader would match this
        return boundary.encode("utf-8", "surrogateescape")


def eol_length(data: window.Buffer, pos: int) -> int:
    """Length of the line end at `pos` (0 if none)."""
    if data[pos:pos + 2] == b"\r\n":
        return 2
    return 1 if data[pos:pos + 1] in (b"\r", b"\n") else 0


def eol_before(data: window.Buffer, pos: int) -> int:
    """Length of the line end just before `pos` (0 if none)."""
    if pos >= 2 and data[pos - 2:pos] == b"\r\n":
        return 2
    return 1 if pos >= 1 and data[pos - 1:pos] in (b"\r", b"\n") else 0
