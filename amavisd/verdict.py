"""What the pipeline concludes about one message, and what should happen to it.

`Category` is ordered by severity (INFECTED > BANNED > UNCHECKED > CLEAN) so
aggregation is `max()`. `Destiny` is what a postmaster configures per
category; each ingress (AM.PDP, client exit codes, later milter and SMTP)
maps a destiny onto its own reply in one table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Category(enum.IntEnum):
    CLEAN = 0
    UNCHECKED = 1
    BANNED = 2
    INFECTED = 3


class Destiny(enum.Enum):
    PASS = "pass"
    DISCARD = "discard"
    BOUNCE = "bounce"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class Unchecked(str):
    """Why (part of) a message could not be checked: the text logs, headers
    and notices show, and its kind, on which the postmaster's destinies are
    keyed. The kind is set where the problem is found, never read back from
    the text, which carries member names and tool output an attacker chose."""

    # limit: a decoding limit (depth, size, parts, time); encrypted; partial
    # (message/partial); unscanned: no scanner took a part; undecipherable: an
    # archive or compressed stream some of whose content could not be read
    # (unknown method, failed integrity check, a tool's failure); internal: a
    # decoder failed unexpectedly (a bug, or input it was not built for).
    KINDS = ("encrypted", "partial", "unscanned", "limit", "undecipherable", "internal")
    kind: str

    def __new__(cls, text: str, kind: str = "limit") -> Unchecked:
        if kind not in cls.KINDS:
            raise ValueError(f"unknown kind of UNCHECKED {kind!r}")
        reason = super().__new__(cls, text)
        reason.kind = kind
        return reason


@dataclass(frozen=True)
class Finding:
    """A virus name found in one part, by one scanner."""

    part: str
    name: str
    scanner: str


@dataclass(frozen=True)
class HeaderEdit:
    """A header change for the client or MTA to apply (AM.PDP/milter vocabulary)."""

    op: str  # "insert" | "add" | "change" | "delete"
    name: str
    value: str = ""
    index: int = 0


@dataclass
class Result:
    log_id: str
    category: Category | None = None  # None: we could not decide (tempfail)
    destiny: Destiny = Destiny.TEMPFAIL
    findings: list[Finding] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    banned_hits: list = field(default_factory=list)  # policy.banned.BannedHit: part, rule
    unchecked: list[Unchecked] = field(default_factory=list)
    tempfail_reason: str | None = None  # the detail, for the log line only
    # The class of the failure (amavisd.failures), the only part a reply shows.
    public_reason: str | None = None
    header_edits: list[HeaderEdit] = field(default_factory=list)
    parts: list = field(default_factory=list)  # decode.parts.Part: what the scanners saw
    tree: object | None = None  # decode.parts.Part root
    scanned_by: list[str] = field(default_factory=list)  # scanners that answered
    alerts: list[str] = field(default_factory=list)  # problems to name in a passed mail's header
    force_destiny: Destiny | None = None  # set by the pipeline, e.g. pass when scanners fail
    headers: dict[str, str] = field(default_factory=dict)  # Message-ID, for the log line
    quarantine_id: str = ""
    size: int = 0
    elapsed_ms: float = 0.0
    # Policy banks and recipients (policy/banks.py, policy/recipients.py):
    policy_banks: tuple[str, ...] = ()  # the banks applied, in order
    originating: bool = False  # mail from our own users (MYNETS, ORIGINATING)
    # Each recipient's own destiny and category; `destiny` is the strictest
    # of them. Empty: every recipient shares `destiny` (a tempfail, no recipients).
    recipient_destinies: dict[str, Destiny] = field(default_factory=dict)
    recipient_categories: dict[str, Category] = field(default_factory=dict)
    bypassed_virus_checks: bool = False  # every recipient bypasses them: nothing was scanned

    @property
    def viruses(self) -> list[str]:
        return list(dict.fromkeys(f.name for f in self.findings))

    @property
    def verdict(self) -> str:
        return self.category.name if self.category is not None else "TEMPFAIL"

    def tempfail(self, detail: str, public: str) -> None:
        """We could not decide: the MTA keeps the mail. `detail` is for the log
        (paths, errno); `public` names the class of failure for the reply."""
        self.category = None
        self.destiny = Destiny.TEMPFAIL
        self.tempfail_reason = detail
        self.public_reason = public

    def summary(self) -> str:
        """Short reason text for replies, e.g. 'INFECTED: Eicar-Test-Signature'.
        A tempfail names its class of failure only; the detail is in
        `tempfail_reason`, for the log."""
        if self.category is None:
            # failures.LOCAL_PROBLEM, spelled here: the settings read this module
            return f"TEMPFAIL: {self.public_reason or 'temporary local problem'}"
        if self.category is Category.INFECTED:
            return "INFECTED: " + ", ".join(self.viruses)
        if self.category is Category.BANNED:
            return "BANNED: " + ", ".join(self.banned)
        if self.category is Category.UNCHECKED:
            return "UNCHECKED: " + ", ".join(self.unchecked)
        return "CLEAN"
