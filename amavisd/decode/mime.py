"""MIME: every entity of a message, transfer-decoded, text included.

Built on the standard library's parser, which already survives most broken
MIME (missing closing boundaries, bad base64, bare CR/LF, NULs, huge header
lines) and records defects instead of failing. What it does not do we add:

- An attached message/rfc822 becomes a child part that is decomposed again
  (one layer deeper): forwarded mail is opened, unlike in amavisd-new.
- Ambiguity (CVE-2024-28054): when an entity carries conflicting
  Content-Type or Content-Transfer-Encoding headers, or several boundary
  parameters, a mail client may read it another way than we do. The entity
  is flagged `ambiguous` and every alternative reading is decoded as well.
- message/partial cannot be reassembled safely: flagged, and UNCHECKED.

Multipart nesting inside one message does not add depth; the message's
entities are one layer below it.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import itertools
import re
from email.message import Message

from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, register

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)
_BOUNDARY = re.compile(r"""boundary\s*=\s*(?:"([^"]*)"|([^;\s]+))""", re.I)
MAX_READINGS = 8


@register("mail")
def decode_mail(part: Part, ctx: Context) -> None:
    message = _PARSER.parsebytes(part.read())
    if part.parent is None or part.mime_type.startswith("message/"):
        # A text part that merely looks like mail is also scanned as it is.
        part.flags.add("expanded")
    _add_entity(part, message, ctx, layer=True)


def _add_entity(parent: Part, entity: Message, ctx: Context, layer: bool) -> None:
    readings = alternative_readings(entity)
    if readings:
        parent.flags.add("ambiguous")
        for number, data in enumerate(readings, 1):
            ctx.add(parent, data, layer=True, mime_type="message/rfc822",
                    name=f"(alternative reading {number})", detected="mail")
    content_type = entity.get_content_type()
    if content_type == "message/partial":
        # Scanned as it is, never re-parsed: a fragment of a message is not a message.
        fragment = ctx.add(parent, _raw_payload(entity), layer=layer, mime_type=content_type,
                           detected="partial")
        fragment.flags.add("partial")
        ctx.note_unchecked(fragment, "message/partial fragment", kind="partial")
        return
    if entity.is_multipart() and content_type.startswith("message/"):
        # message/rfc822 (and message/global...): decompose it again, one layer down.
        for sub in entity.get_payload():
            if isinstance(sub, Message):
                ctx.add(parent, _serialize(sub), layer=layer, mime_type=content_type,
                        name=_filename(entity))
        return
    if entity.is_multipart():
        container = ctx.add_container(parent, layer=layer, mime_type=content_type)
        _add_text(container, entity.preamble, ctx, "(preamble)")
        for sub in entity.get_payload():
            if isinstance(sub, Message):
                _add_entity(container, sub, ctx, layer=False)
        _add_text(container, entity.epilogue, ctx, "(epilogue)")
        return
    cte = str(entity.get("content-transfer-encoding", "")).strip().lower()
    try:
        if cte in ("x-uuencode", "uuencode", "x-uue", "uue"):
            data = _uudecode_body(entity, ctx)
        else:
            data = entity.get_payload(decode=True)
    except Exception:  # e.g. a body the stdlib cannot take
        data = None
    flags = {type(d).__name__ for d in entity.defects}
    if data is None:
        data = _raw_payload(entity)
        flags.add("decode-error")
    child = ctx.add(parent, data, layer=layer, mime_type=content_type, name=_filename(entity))
    if flags & {"decode-error", "InvalidBase64CharactersDefect",
                "InvalidBase64PaddingDefect", "InvalidBase64LengthDefect"}:
        child.flags.add("decode-error")


def _uudecode_body(entity: Message, ctx: Context) -> bytes:
    """Our own uudecoder: the stdlib pads cut-off lines with zeros."""
    from amavisd.decode.textual import find_uuencoded, uudecode_lines

    raw = _raw_payload(entity)
    blocks = find_uuencoded(raw, ctx.budget.allowance())
    if blocks:
        return b"".join(payload for _, payload, _ in blocks)
    return uudecode_lines(raw, ctx.budget.allowance())[0]


def alternative_readings(entity: Message) -> list[bytes]:
    """The same entity as other parsers could read it: one variant per combination
    of its conflicting Content-Type / Content-Transfer-Encoding / boundary."""
    types = _distinct(entity.get_all("content-type") or [])
    encodings = _distinct(entity.get_all("content-transfer-encoding") or [])
    boundaries = _distinct(b for value in (entity.get_all("content-type") or [])
                           for b in _boundaries(value))
    if len(types) < 2 and len(encodings) < 2 and len(boundaries) < 2:
        return []
    base_type = types[0] if types else "text/plain"
    variants = []
    type_values = types if len(boundaries) < 2 else [
        _BOUNDARY.sub(f'boundary="{b}"', _strip_extra_boundaries(base_type), count=1)
        for b in boundaries]
    for ctype, cte in itertools.product(type_values or [base_type], encodings or [None]):
        variants.append((ctype, cte))
    default = (entity.get("content-type"), entity.get("content-transfer-encoding"))
    readings = []
    body = _serialize(entity).split(b"\n\n", 1)
    head, rest = (body[0], body[1]) if len(body) == 2 else (body[0], b"")
    kept = [line for line in _unfold(head) if not re.match(
        rb"(?i)content-(type|transfer-encoding)\s*:", line)]
    for ctype, cte in variants:
        if (ctype, cte) == default:
            continue
        lines = kept + [f"Content-Type: {ctype}".encode("utf-8", "surrogateescape")]
        if cte:
            lines.append(f"Content-Transfer-Encoding: {cte}".encode("utf-8", "surrogateescape"))
        readings.append(b"\n".join(lines) + b"\n\n" + rest)
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
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\n" + line
        else:
            lines.append(line)
    return lines


def _add_text(parent: Part, text: str | None, ctx: Context, name: str) -> None:
    if text and text.strip():
        ctx.add(parent, text.encode("utf-8", "surrogateescape"), layer=False,
                mime_type="text/plain", name=name)


def _serialize(entity: Message) -> bytes:
    try:
        return entity.as_bytes(unixfrom=False, policy=email.policy.compat32)
    except Exception:
        return entity.as_string().encode("utf-8", "surrogateescape")


def _raw_payload(entity: Message) -> bytes:
    payload = entity.get_payload()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return _serialize(entity)


def _filename(entity: Message) -> str:
    try:
        name = entity.get_filename() or entity.get_param("name") or ""
    except Exception:
        return ""
    if isinstance(name, tuple):  # an RFC 2231 value the stdlib left undecoded
        name = email.utils.collapse_rfc2231_value(name)
    return str(name).translate({c: "?" for c in range(32)})[:255]

