"""What a quarantine entry is, whichever store keeps it.

The prefix of an entry's name says why it was kept (virus, banned,
unchecked, clean: amavisd-new's names); the id is 12 random base64url
characters (72 bits, amavisd-new's mail_id size) and is what goes into
`X-Quarantine-ID:` and what `release` takes.

The id is no secret: it is in the log line, the alert and the header. A
release over AM.PDP must also name the entry's `secret_id` (amavisd-new's
name: 96 random bits, base64url), which only the store and the admin see
(`amavisd quarantine show` and `list --secrets`); the check itself is in
`quarantine.release`. Entries stored before secrets existed have none and
can only be released locally.

An id comes from people and CLIs: it is checked against a strict pattern
(`parse_id`) before a store looks anything up with it, so it can never name
a file, or a row, of its choosing.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from amavisd.verdict import Category

# Category -> name prefix (amavisd-new's virus-%m, banned-%m).
KINDS: dict[Category, str] = {
    Category.INFECTED: "virus",
    Category.BANNED: "banned",
    Category.UNCHECKED: "unchecked",
    Category.CLEAN: "clean",
}

_ID = r"[A-Za-z0-9_-]{12}"
# What people may type: the bare id, or the file name `ls` shows them.
ID_PATTERN = re.compile(rf"(?:(?:{'|'.join(KINDS.values())})-)?({_ID})(?:\.gz|\.json)?")


class QuarantineError(Exception):
    """A quarantine problem, said in one line."""


class UnknownEntry(QuarantineError):
    """No entry with this id (or the id is not one of ours)."""


@dataclass
class QuarantineEntry:
    id: str
    kind: str  # virus | banned | unchecked | clean
    file: str  # the message's name in its store (the file store: a file in its directory)
    gzip: bool
    size: int  # of the raw message
    sha256: str  # of the raw message, checked before a release
    date: str  # ISO 8601, UTC, when stored
    log_id: str
    category: str
    sender: str
    recipients: list[str]
    queue_id: str = ""
    client_address: str = ""
    viruses: list[str] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    secret_id: str = ""  # empty in entries stored before release authorisation

    @classmethod
    def from_json(cls, data: dict) -> QuarantineEntry:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_id(text: str) -> str:
    """The bare id from an id or quarantine file name; UnknownEntry otherwise."""
    match = ID_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise UnknownEntry(f"not a quarantine id: {text!r}")
    return match.group(1)


def new_id() -> str:
    """12 base64url characters (72 bits), starting and ending with a letter or
    digit: Debian's amavisd-release only accepts mail ids of that shape."""
    while True:
        candidate = secrets.token_urlsafe(9)  # 9 bytes -> 12 characters
        if candidate[0].isalnum() and candidate[-1].isalnum():
            return candidate


def new_secret() -> str:
    """16 base64url characters (96 bits) that start and end with a letter or
    digit, so that no command line takes one for an option."""
    while True:
        candidate = secrets.token_urlsafe(12)  # 12 bytes -> 16 characters
        if candidate[0].isalnum() and candidate[-1].isalnum():
            return candidate
