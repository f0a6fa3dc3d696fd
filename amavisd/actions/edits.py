"""Our header edits on mail we deliver ourselves, as a milter MTA applies them.

The verdict's edits (`verdict.HeaderEdit`, made by `actions.headers`) are
in the milter's terms: an MTA that hears them over AM.PDP or milter applies
them itself. When the daemon hands the mail on itself (the SMTP filter,
AM.PDP delivery_care_of=server) it applies them here, with the code the
client's pipe mailer uses (`amavisd_client.edits`) and in the order a
milter MTA uses (delete, change, insert, add), so the mail looks the same
whichever way it left. Only the header block is touched; every other byte
is the one that was scanned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from amavisd.actions.smtpdata import Prefixed
from amavisd.verdict import HeaderEdit
from amavisd_client.edits import apply_edits, edit_message, header_end

__all__ = ["MAX_HEADER", "edit_bytes", "edit_spool", "milter_edits"]

MAX_HEADER = 1024 * 1024  # bytes of a spooled message's header block read to apply edits
_ORDER = {"delete": 0, "change": 1, "insert": 2, "add": 3}  # as a milter MTA applies them
_VERBS = {"delete": "delheader", "change": "chgheader", "insert": "insheader",
          "add": "addheader"}


def milter_edits(edits: Iterable[HeaderEdit]) -> list[tuple[str, list[str]]]:
    """(verb, fields) as AM.PDP and the milter say them (`insheader`, [index,
    name, value]), in the order a milter MTA applies them."""
    out = []
    for edit in sorted(edits, key=lambda e: _ORDER.get(e.op, len(_ORDER))):
        if edit.op in ("insert", "change"):
            out.append((_VERBS[edit.op], [str(edit.index), edit.name, edit.value]))
        elif edit.op == "add":
            out.append((_VERBS[edit.op], [edit.name, edit.value]))
        elif edit.op == "delete":
            out.append((_VERBS[edit.op], [str(edit.index), edit.name]))
    return out


def edit_bytes(data: bytes, edits: Iterable[HeaderEdit]) -> bytes:
    """The whole message, in memory, with `edits` applied to its header."""
    return edit_message(data, milter_edits(edits))


def edit_spool(spool: BinaryIO, size: int, edits: Iterable[HeaderEdit],
               top: bytes = b"") -> BinaryIO | Prefixed:
    """A spooled message of `size` bytes with `edits`, to be read from its
    start: the edited header block in memory, the rest streamed from the
    spool. `top`: whole header lines put on top of it first (our Received:),
    which the edits see as part of the header. A header block longer than
    MAX_HEADER is edited up to the last whole line within it (our edits go
    on top); never cut mid-line, which would end the header there and send
    the rest of it as body."""
    spool.seek(0)
    wire = milter_edits(edits)
    if not wire and not top:
        return spool
    read = spool.read(min(size, MAX_HEADER))
    head = top + read
    split = header_end(head)
    if split == len(head) and len(read) < size:  # no end of the header block within reach
        split = head.rfind(b"\n") + 1
    split = max(split, len(top))
    spool.seek(split - len(top))
    return Prefixed(apply_edits(head[:split], wire) if wire else head[:split], spool,
                    size - (split - len(top)))
