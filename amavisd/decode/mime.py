"""MIME decomposition: every leaf of the message, transfer-decoded.

This first decoder uses the standard library parser, which already tolerates
most broken MIME and descends into message/rfc822. A message that cannot be
parsed at all is handed on whole, flagged, so it is still scanned.
"""

from __future__ import annotations

import email.parser
import email.policy
from email.message import Message

from amavisd.decode.parts import Part, PartNumbering

_PARSER = email.parser.BytesParser(policy=email.policy.compat32)


def decompose(raw: bytes) -> Part:
    numbering = PartNumbering()
    root = Part(id=numbering.next(), data=raw, mime_type="message/rfc822")
    try:
        message = _PARSER.parsebytes(raw)
    except Exception as err:  # the stdlib parser is lenient; this is a last resort
        root.flags.add("decode-error")
        root.name = f"unparsable: {type(err).__name__}"
        return root
    _add_entity(root, message, numbering)
    return root


def _add_entity(parent: Part, entity: Message, numbering: PartNumbering) -> None:
    if entity.is_multipart():
        container = parent.add(Part(id=numbering.next(), mime_type=entity.get_content_type()))
        if entity.preamble and entity.preamble.strip():
            container.add(Part(id=numbering.next(), data=entity.preamble.encode(
                "utf-8", "surrogateescape"), mime_type="text/plain", name="(preamble)"))
        for sub in entity.get_payload():
            if isinstance(sub, Message):
                _add_entity(container, sub, numbering)
        if entity.epilogue and entity.epilogue.strip():
            container.add(Part(id=numbering.next(), data=entity.epilogue.encode(
                "utf-8", "surrogateescape"), mime_type="text/plain", name="(epilogue)"))
        return
    try:
        data = entity.get_payload(decode=True)
    except Exception:
        data = None
    part = parent.add(Part(id=numbering.next(), mime_type=entity.get_content_type(),
                           name=_filename(entity)))
    if data is None:  # e.g. a payload the parser left as a string it could not decode
        payload = entity.get_payload()
        data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else b""
        part.flags.add("decode-error")
    part.data = data
    for defect in getattr(entity, "defects", ()):
        part.flags.add(type(defect).__name__)


def _filename(entity: Message) -> str:
    try:
        return entity.get_filename() or ""
    except Exception:
        return ""
