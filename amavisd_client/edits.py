"""The daemon's header edits, applied to a message we deliver ourselves.

An AM.PDP reply carries milter-style edits (delheader, chgheader, insheader,
addheader); a milter MTA applies them itself, but the pipe mailer and the
SMTP forwarder deliver the bytes, so they apply them here. Pure functions on
bytes: no I/O, stdlib only.
"""

from __future__ import annotations

from amavisd_client.wire.ampdp import Block

# The order a milter MTA applies edits in, with each edit's field count.
_EDIT_FIELDS = {"delheader": 2, "chgheader": 3, "insheader": 3, "addheader": 2}


def header_edits(reply: Block) -> list[tuple[str, list[str]]]:
    """Header edits in the order a milter MTA applies them: delete, change, insert, add."""
    return [(name, fields) for name, count in _EDIT_FIELDS.items()
            for fields in reply.fields(name, count)]


def apply_edits(header: bytes, edits: list[tuple[str, list[str]]]) -> bytes:
    """Apply AM.PDP header edits (milter semantics) to a raw header block.

    Lines are cut at LF and keep a CR of their own (a header block may mix
    both: the MTA's lines and the sender's); lines we add end like the
    first line, the MTA's."""
    first = header.find(b"\n")
    cr = b"\r" if first > 0 and header[first - 1:first] == b"\r" else b""
    lines = header.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    mbox_from = lines.pop(0) if lines and lines[0].startswith(b"From ") else None
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])

    def field_name(field: list[bytes]) -> bytes:
        return field[0].split(b":", 1)[0].strip().lower()

    # The MTA adds Return-Path as it delivers, after the milter stage the
    # edits were made for: it stays on top (index 0 is below it).
    top = [fields.pop(0)] if fields and field_name(fields[0]) == b"return-path" else []

    def nth(name: str, index: int) -> int | None:
        seen = 0
        for pos, field in enumerate(fields):
            if field_name(field) == name.lower().encode():
                seen += 1
                if seen == index:
                    return pos
        return None

    def make(name: str, value: str) -> list[bytes]:
        return [f"{name}: {value}".encode("utf-8", "surrogateescape") + cr]

    for op, args in edits:
        try:
            if op == "insheader" and len(args) == 3:
                fields.insert(max(0, min(int(args[0]), len(fields))), make(args[1], args[2]))
            elif op == "addheader" and len(args) == 2:
                fields.append(make(args[0], args[1]))
            elif op == "chgheader" and len(args) >= 2:
                pos = nth(args[1], int(args[0]))
                value = args[2] if len(args) == 3 else ""
                if pos is not None:
                    if value:
                        fields[pos] = make(args[1], value)
                    else:
                        del fields[pos]
                elif value:
                    fields.append(make(args[1], value))
            elif op == "delheader" and len(args) == 2:
                pos = nth(args[1], int(args[0]))
                if pos is not None:
                    del fields[pos]
        except ValueError:
            continue  # a malformed index: ignore the edit, as the protocol asks
    out = [mbox_from] if mbox_from is not None else []
    for field in top + fields:
        out.extend(field)
    return b"\n".join(out) + b"\n"


def header_end(data: bytes) -> int:
    """Offset just past the header block (its lines, without the empty line):
    the first empty line, CRLF or LF, whichever comes first. (Looking for
    CRLFCRLF anywhere first put a LF message's header end wherever the
    sender wrote CR CR LF CR CR LF in the body, and our headers there.)"""
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            return len(data)
        if end == pos or (end == pos + 1 and data[pos:end] == b"\r"):
            return pos
        pos = end + 1


def edit_message(data: bytes, edits: list[tuple[str, list[str]]]) -> bytes:
    """The whole message with `edits` applied to its header; the body untouched."""
    if not edits:
        return data
    split = header_end(data)
    return apply_edits(data[:split], edits) + data[split:]
