"""The trace a re-sent message carries: Resent-* fields and our Received: line.

A released message goes out again, from us, long after it first came in;
RFC 5322 (3.6.6) asks a re-sender to say so, and amavisd-new does, in this
order, on top of the stored message (seen in its output, Amavis::Notify
msg_from_quarantine):

    Resent-From: "Content-filter at HOST" <postmaster@HOST>   (or the requester)
    Resent-Sender: ...                   (only with a requester: who sent it for them)
    Resent-To: <rcpt>                    (or undisclosed-recipients:; for several)
    Resent-Date: <when released>
    Resent-Message-ID: <QUARANTINE-ID-NEW-ID@HOST>
    Received: from unknown by localhost (amavisd, unix socket) id NEW-ID
     for <rcpt>; <date>

Mail we forward ourselves (AM.PDP delivery_care_of=server) gets the same
Received: line, as amavisd-new's does. Fields are folded at 78 columns.
Pure functions on bytes and text:
the values come from the envelope (client input) and settings, so each is
made one printable line before it becomes a header field; nothing here can
start a new field or end the header.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

from amavisd.envelope import bare_address
from amavisd.printable import printable

PRODUCT = "amavisd"
Field = tuple[str, str]  # (name, value): one line, folded by `prepend`
FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be no longer


def _line(text: str) -> str:
    """One line of a header field: no control character, no folding of its own."""
    return " ".join(printable(text).split())


def _angled(address: str) -> str:
    return f"<{_line(bare_address(address))}>"


def _date(when: datetime | None) -> str:
    return format_datetime(when or datetime.now().astimezone())


def received(mail_id: str, recipients: Sequence[str], *, via: str = "unix socket",
             client: str = "", when: datetime | None = None) -> Field:
    """Our Received: field. `via`: how the request came ("unix socket",
    "port 10024", "command line"); `client`: the peer's IP address over TCP.
    The recipient is named only when there is one (as amavisd-new: a
    Received: line must not disclose the others)."""
    value = "from unknown"
    if client:
        value += f" ([{_line(client)}])"
    value += f" by localhost ({PRODUCT}, {_line(via)}) id {_line(mail_id)}"
    if len(recipients) == 1:
        value += f" for {_angled(recipients[0])}"
    return "Received", f"{value}; {_date(when)}"


def resent(quarantine_id: str, new_id: str, recipients: Sequence[str], *, myhostname: str,
           from_header: str, requested_by: str = "",
           when: datetime | None = None) -> list[Field]:
    """The Resent-* block for a release of entry `quarantine_id` as `new_id`.
    `from_header`: our notices' From: ("Content-filter at HOST" <postmaster@HOST>);
    `requested_by`: the address that asked (AM.PDP requested_by), if any."""
    fields: list[Field] = []
    if requested_by:
        fields += [("Resent-From", _angled(requested_by)), ("Resent-Sender", _line(from_header))]
    else:
        fields.append(("Resent-From", _line(from_header)))
    fields.append(("Resent-To", _angled(recipients[0]) if len(recipients) == 1
                   else "undisclosed-recipients:;"))
    fields.append(("Resent-Date", _date(when)))
    fields.append(("Resent-Message-ID",
                   f"<{_line(quarantine_id)}-{_line(new_id)}@{_line(myhostname) or 'localhost'}>"))
    return fields


def fold(name: str, value: str, eol: str = "\n") -> str:
    """`Name: value` folded at spaces so that lines stay within FOLD_AT where
    a space allows it (a longer word is left whole); a Received: line's date,
    after its last "; ", is kept on one line."""
    head, sep, date = value.rpartition("; ")
    words = [*head.split(" ")[:-1], head.split(" ")[-1] + ";", date] if sep else value.split(" ")
    lines, line = [], f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > FOLD_AT and line.strip() and ":" != line[-1]:
            lines.append(line)
            line = ""
        line += f" {word}"
    lines.append(line)
    return eol.join(lines) + eol


def prepend(message: bytes, fields: Sequence[Field]) -> bytes:
    """`fields` on top of `message`, in its own line ends (CRLF if its first
    line has one); the message itself is not touched."""
    first = message.find(b"\n")
    eol = "\r\n" if first > 0 and message[first - 1:first] == b"\r" else "\n"
    head = "".join(fold(name, _line(value), eol) for name, value in fields)
    return head.encode("utf-8", "surrogateescape") + message
