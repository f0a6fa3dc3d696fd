"""What a next hop said about a message handed over: taken, or not and why.

The vocabulary every forwarder answers in (`actions.forward`), kept apart
so the SMTP transaction (`actions.smtpout`) and the forwarders' registry
share it without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import BinaryIO

Message = bytes | BinaryIO  # bytes, or a binary file read from where it stands

# The next hop's queue id in its reply to the content: Postfix's "250 2.0.0
# Ok: queued as 4QX...", Exim's "250 OK id=1tA...", Sendmail's "250 2.0.0
# 4B8... Message accepted for delivery". ASCII, no spaces: it goes in the log line.
_QUEUE_ID = re.compile(r"\bqueued as <?([\w.+-]{1,64})|\bid=([\w.-]{1,64})"
                       r"|^2\d\d [245]\.\d{1,3}\.\d{1,3} (\w{1,64}) Message accepted",
                       re.ASCII | re.IGNORECASE)


def queue_id(reply: str) -> str:
    """The queue id a next hop's reply names, or ""."""
    found = _QUEUE_ID.search(reply)
    return next(filter(None, found.groups()), "") if found else ""


class ForwardError(Exception):
    """The next hop took none of the recipients; one line saying why.

    `temporary`: the mail must stay with whoever gave it to us (4xx);
    False only when the next hop itself said 5xx. `reply`: an SMTP reply
    line for our client ("451 4.4.1 ..."), the next hop's own when it gave
    one. `refused`: each recipient's own reply, where the next hop said them
    one by one (RCPT, or LMTP's per-recipient DATA replies). `from_hop`:
    `reply` is what the next hop said (a client may be shown it); otherwise
    it is our own line, whose detail (host, errno) belongs in the log."""

    def __init__(self, message: str, *, temporary: bool = True, reply: str = "",
                 refused: dict[str, str] | None = None, from_hop: bool = False):
        super().__init__(message)
        self.temporary = temporary
        self.from_hop = from_hop  # `reply` is the next hop's own line, not ours
        self.reply = reply or (f"451 4.4.0 {message}" if temporary else f"554 5.0.0 {message}")
        self.refused = refused or {}


@dataclass
class Handed:
    """What the next hop said when it took the message (for some recipients at least)."""

    where: str  # e.g. "smtp:[127.0.0.1]:10025"
    reply: str  # the next hop's final reply line, e.g. "250 2.0.0 Ok: queued as 4QX..."
    refused: dict[str, str] = field(default_factory=dict)  # rcpt -> reply, refused
    accepted: dict[str, str] = field(default_factory=dict)  # rcpt -> its DATA reply

    @property
    def queued_as(self) -> str:
        """The next hop's queue id (amavisd-new's `queued_as`); LMTP's replies,
        one a recipient, may name several: "ID1/ID2". "" when none says one."""
        if len(self.accepted) < 2:
            return queue_id(self.reply)
        replies = dict.fromkeys(self.accepted.values())  # SMTP: one for all
        return "/".join(dict.fromkeys(filter(None, map(queue_id, replies))))


@dataclass
class Params:
    """The envelope's extras, passed through where the next hop understands them.

    `mail`: MAIL FROM parameters by upper-case keyword (SIZE, BODY, SMTPUTF8
    (value None), RET, ENVID), values as on the wire (xtext where RFC 3461
    says so). `rcpt`: per recipient (as given to hand_over), NOTIFY and
    ORCPT. `xforward`: NAME, ADDR, PORT, PROTO, HELO, IDENT, SOURCE, plain
    (decoded) values: encoded again on the way out."""

    mail: dict[str, str | None] = field(default_factory=dict)
    rcpt: dict[str, dict[str, str]] = field(default_factory=dict)
    xforward: dict[str, str] = field(default_factory=dict)
