"""MIME: every entity of a message, transfer-decoded, text included.

The structure comes from our own splitter (mimesplit.py), which reads it as
the standard library does but iteratively and on offsets into the bytes, so
neither nesting nor size can take the worker's stack or memory: this module
turns its events into parts. What the stdlib would not do we add:

- An attached message/rfc822 becomes a child part that the engine
  decomposes again, one layer deeper, under its depth limit: forwarded mail
  is opened, unlike in amavisd-new, and is never parsed inside its parent.
- Ambiguity (CVE-2024-28054): when an entity carries conflicting
  Content-Type or Content-Transfer-Encoding headers, or several boundary
  parameters, a mail client may read it another way than we do. The entity's
  parent is flagged `ambiguous` and every alternative reading is decoded as
  well; so is a multipart cut short by an outer boundary, read on past it.
- Multiparts nested past MAX_NESTING inside one message (nesting that adds no
  depth) are scanned raw and make the message UNCHECKED, as does a
  message/partial fragment, which cannot be reassembled safely.

Multipart nesting inside one message does not add depth; the message's
entities are one layer below it. Broken MIME (missing boundaries, bad
base64, bare CR line ends, NULs, huge header lines) is read as the stdlib
reads it, and bad transfer encodings are flagged, never fatal.

A big message comes as a read-only mapping (`decode.window`): a span that
would be spilled anyway is copied or decoded straight into its part's file
(`parts.add_streamed`), never sliced whole into memory; smaller ones take
the in-memory path, which is faster.
"""

from __future__ import annotations

import email.utils
import itertools
import re
from collections.abc import Callable
from email.message import Message

from amavisd.decode import mimesplit, window
from amavisd.decode.mimesplit import Body, Close, Entity, Open, Reread, Text, TooDeep
from amavisd.decode.parts import Part, declared_name, other_names
from amavisd.decode.registry import Context, add_streamed, register
from amavisd.decode.textual import uu_blocks
from amavisd.decode.transfer import UUENCODE, NotStreamable, decode_body, stream_body

_BOUNDARY = re.compile(r"""boundary\s*=\s*(?:"([^"]*)"|([^;\s]+))""", re.I)
_TYPE_OR_ENCODING = re.compile(rb"(?i)content-(type|transfer-encoding)\s*:")
MAX_READINGS = 8  # alternative readings of one entity, and rereads in one message
_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.strip() strips of ASCII
_NOT_WHITESPACE = re.compile(b"[^" + re.escape(_WHITESPACE) + b"]")


@register("mail")
def decode_mail(part: Part, ctx: Context) -> None:
    if part.parent is None or part.mime_type.startswith("message/"):
        # A text part that merely looks like mail is also scanned as it is.
        part.flags.add("expanded")
    with part.mapped() as data:
        MessageParts(part, data, ctx).add_all()


class MessageParts:
    """The parts of one message, added as the splitter's events come."""

    def __init__(self, mail: Part, data: window.Buffer, ctx: Context) -> None:
        self.mail = mail
        self.data = data
        self.ctx = ctx
        self.splitter = mimesplit.Splitter(data, tick=ctx.budget.check_time)
        self.containers: list[Part] = []
        self.rereads = 0

    def add_all(self) -> None:
        for event in self.splitter.walk():
            HANDLERS[type(event)](self, event)

    def parent(self) -> tuple[Part, bool]:
        """Where the next part goes, and whether it is one layer down."""
        if self.containers:
            return self.containers[-1], False
        return self.mail, True

    def on_open(self, event: Open) -> None:
        parent, layer = self.parent()
        self.add_readings(parent, event.entity, lambda: self.splitter.body_end(event.entity))
        self.containers.append(self.ctx.add_container(parent, layer=layer,
                                                      mime_type=event.entity.content_type))

    def on_close(self, event: Close) -> None:
        self.containers.pop()

    def add_span(self, parent: Part, start: int, end: int, layer: bool,
                 head: bytes = b"", **fields) -> Part:
        """A child holding `head` + data[start:end]: sliced when it may stay
        in memory, else copied to its file a window at a time."""
        if self.ctx.may_hold(len(head) + end - start):
            return self.ctx.add(parent, head + window.copy(self.data, start, end), layer=layer,
                                **fields)
        body = window.chunks(self.data, start, end)
        return add_streamed(self.ctx, parent, itertools.chain([head], body), layer, **fields)

    def add_decoded(self, parent: Part, start: int, end: int, encoding: str, layer: bool,
                    **fields) -> tuple[Part, bool]:
        """A leaf's body transfer-decoded: whole in memory when it may stay
        there, else streamed to its file (the same bytes, see transfer)."""
        allowance = self.ctx.budget.allowance()
        stream = None if self.ctx.may_hold(end - start) else \
            stream_body(self.data, start, end, encoding, allowance)
        if stream is not None:
            try:
                return add_streamed(self.ctx, parent, stream, layer, **fields), stream.clean
            except NotStreamable:
                pass
        data, clean = decode_body(self.data, start, end, encoding, allowance)
        return self.ctx.add(parent, data, layer=layer, **fields), clean

    def on_text(self, event: Text) -> None:
        parent, layer = self.parent()
        if window.search(_NOT_WHITESPACE, self.data, event.start, event.end, 1) is not None:
            self.add_span(parent, event.start, event.end, layer,
                          mime_type="text/plain", name=event.name)

    def on_body(self, event: Body) -> None:
        parent, layer = self.parent()
        entity = event.entity
        self.add_readings(parent, entity, lambda: event.end)
        content_type = entity.content_type
        if content_type == "message/partial":
            # Scanned as it is, never re-parsed: a fragment of a message is not a message.
            fragment = self.add_span(parent, entity.start, event.end, layer,
                                     mime_type=content_type, detected="partial")
            fragment.flags.add("partial")
            self.ctx.note_unchecked(fragment, "message/partial fragment", kind="partial")
        elif entity.headers.get_content_maintype() == "message":
            # message/rfc822 (and message/global...): decomposed again, one layer down.
            self.add_span(parent, event.start, event.end, layer,
                          mime_type=content_type, **names(entity.headers))
        else:
            encoding = str(entity.headers.get("content-transfer-encoding", "")).lower()
            fields = names(entity.headers)
            if encoding.strip() in UUENCODE:  # the blocks' own names: Outlook's, if no other
                fields = uu_names(fields, self.data, event.start, event.end)
            child, clean = self.add_decoded(parent, event.start, event.end, encoding, layer,
                                            mime_type=content_type, **fields)
            if not clean:
                child.flags.add("decode-error")

    def on_too_deep(self, event: TooDeep) -> None:
        parent, layer = self.parent()
        self.add_readings(parent, event.entity, lambda: event.end)
        # Scanned raw, never decoded further (a type no decoder takes).
        child = self.add_span(parent, event.start, event.end, layer,
                              mime_type=event.entity.content_type, detected="multipart")
        child.flags.add("too-deep")
        self.ctx.note_unchecked(
            child, f"multiparts nested deeper than {self.splitter.max_nesting} levels")

    def on_reread(self, event: Reread) -> None:
        parent, _ = self.parent()
        parent.flags.add("ambiguous")
        self.rereads += 1
        if self.rereads > MAX_READINGS:
            if self.rereads == MAX_READINGS + 1:
                self.ctx.note_unchecked(parent, f"more than {MAX_READINGS} multiparts "
                                        "cut short by an outer boundary")
            return
        self.add_span(parent, event.start, event.end, True, mime_type="message/rfc822",
                      name="(read past an outer boundary)", detected="mail")

    def add_readings(self, parent: Part, entity: Entity, body_end: Callable[[], int]) -> None:
        """Other readings of an entity with conflicting headers (its body's end
        is only looked for then: a multipart's is not known yet)."""
        if entity.fields_dropped:
            self.ctx.note_unchecked(parent, f"more than {mimesplit.MAX_FIELDS} Content-* "
                                    f"header fields, or one over {mimesplit.MAX_FIELD_BYTES} "
                                    "bytes, in one entity")
        if not conflicting(entity.headers):
            return
        heads = reading_heads(entity.headers, self.data[entity.start:entity.header_end])
        if heads:
            parent.flags.add("ambiguous")
            end = body_end()
        for number, head in enumerate(heads, 1):
            self.add_span(parent, entity.body_start, end, True, head, mime_type="message/rfc822",
                          name=f"(alternative reading {number})", detected="mail")


HANDLERS = {
    Open: MessageParts.on_open,
    Close: MessageParts.on_close,
    Text: MessageParts.on_text,
    Body: MessageParts.on_body,
    TooDeep: MessageParts.on_too_deep,
    Reread: MessageParts.on_reread,
}


def conflicting(headers: Message) -> bool:
    """Whether an entity has more than one Content-Type, Content-Transfer-Encoding
    or boundary: then other parsers may read it differently."""
    fields = headers.get_all("content-type") or []
    return (len(fields) > 1 or len(headers.get_all("content-transfer-encoding") or []) > 1
            or any(len(_boundaries(value)) > 1 for value in fields))


def alternative_readings(headers: Message, head: bytes, body: bytes) -> list[bytes]:
    """The same entity as other parsers could read it: one variant per combination
    of its conflicting Content-Type / Content-Transfer-Encoding / boundary.
    `headers` holds its Content-* fields; `head` is its raw header block."""
    return [reading + body for reading in reading_heads(headers, head)]


def _quoted_boundary(boundary: str):
    """The replacement `boundary="..."` as a function, so re.sub takes the
    boundary (as it stood between the quotes) literally: a backslash in it
    is no escape, `\\g<0>` no group."""
    return lambda _match: f'boundary="{boundary}"'


def reading_heads(headers: Message, head: bytes) -> list[bytes]:
    """The header block (blank line included) of each alternative reading."""
    types = _distinct(headers.get_all("content-type") or [])
    encodings = _distinct(headers.get_all("content-transfer-encoding") or [])
    boundaries = _distinct(b for value in (headers.get_all("content-type") or [])
                           for b in _boundaries(value))
    if len(types) < 2 and len(encodings) < 2 and len(boundaries) < 2:
        return []
    base_type = types[0] if types else "text/plain"
    type_values = types if len(boundaries) < 2 else [
        _BOUNDARY.sub(_quoted_boundary(b), _strip_extra_boundaries(base_type), count=1)
        for b in boundaries]
    variants = list(itertools.product(type_values or [base_type], encodings or [None]))
    default = (headers.get("content-type"), headers.get("content-transfer-encoding"))
    kept = [line for line in _unfold(head) if not _TYPE_OR_ENCODING.match(line)]
    readings = []
    for ctype, cte in variants:
        if (ctype, cte) == default:
            continue
        lines = kept + [f"Content-Type: {ctype}".encode("utf-8", "surrogateescape")]
        if cte:
            lines.append(f"Content-Transfer-Encoding: {cte}".encode("utf-8", "surrogateescape"))
        readings.append(b"\n".join(lines) + b"\n\n")
        if len(readings) >= MAX_READINGS:
            break
    return readings


def _distinct(values) -> list[str]:
    seen: dict[str, str] = {}
    for value in values:
        text = str(value).strip()
        seen.setdefault(re.sub(r"\s+", " ", text).lower(), text)
    return list(seen.values())


def _boundaries(value: str) -> list[str]:
    return [m.group(1) if m.group(1) is not None else m.group(2)
            for m in _BOUNDARY.finditer(str(value))]


def _strip_extra_boundaries(value: str) -> str:
    first = _BOUNDARY.search(value)
    if not first:
        return value
    return value[:first.end()] + _BOUNDARY.sub("", value[first.end():])


def _unfold(head: bytes) -> list[bytes]:
    lines: list[bytes] = []
    for line in re.split(rb"\r\n|\r|\n", head):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\n" + line
        elif line:
            lines.append(line)
    return lines


def filename(headers: Message) -> str:
    try:
        name = headers.get_filename() or headers.get_param("name") or ""
    except Exception:
        return ""
    return _clean(name)


def _clean(name: object) -> str:
    if isinstance(name, tuple):  # an RFC 2231 value the stdlib left undecoded
        name = email.utils.collapse_rfc2231_value(name)
    return declared_name(str(name))


def uu_names(fields: dict[str, object], data: window.Buffer, start: int,
             end: int) -> dict[str, object]:
    """`fields` with the names of the uuencoded blocks of data[start:end]
    among the alt_names (the body is decoded to one part; its names would
    otherwise be lost)."""
    alts = other_names(fields["name"], [*fields.get("alt_names", ()),
                                        *(n for n, *_ in uu_blocks(data, start, end))])
    return {**fields, "alt_names": alts} if alts else fields


# Headers some clients take a name from: Thunderbird (Content-Name,
# X-Sun-Data-Name), Outlook when nothing else names the part (Content-Description).
_NAME_HEADERS = ("content-name", "x-sun-data-name")
_OTHER_NAMING = (*_NAME_HEADERS, "content-description")


def names(headers: Message) -> dict[str, object]:
    """The part's name (`filename`) and every other name a client may read
    for it (`alt_names`): each filename/name parameter of both headers,
    RFC 2231 ones included, also one after a "," where a ";" belongs
    (Thunderbird reads on), and the name headers. The banned rules check
    them all: a reader that saves the part as a.vbs must not find it passed
    as the a.txt we read. (Most parts, a body's text, name nothing: one look
    at two headers says so, before any parameter is parsed.)"""
    ct, cd = headers.get("content-type"), headers.get("content-disposition")
    if "name" not in f"{ct}{cd}".lower() and not any(map(headers.get, _OTHER_NAMING)):
        return {"name": ""}
    name = filename(headers)
    found: list[str] = []
    try:
        for header in ("content-disposition", "content-type"):
            for key, value in headers.get_params(header=header, failobj=[]) or []:
                if key.strip().lower().endswith("name") and value:
                    found.append(_clean(value))
        found += [_clean(headers[h]) for h in _NAME_HEADERS if headers.get(h)]
        if not (name or found) and headers.get("content-description"):
            found.append(_clean(headers["content-description"]))
    except Exception:  # noqa: BLE001 - the stdlib on a hostile header: the name stands
        pass
    alts = other_names(name, found)
    return {"name": name, "alt_names": alts} if alts else {"name": name}
