"""Policy: from a verdict to a destiny, and from a destiny to each ingress's reply.

A postmaster sets one destiny per category (CLEAN always passes), and may
give UNCHECKED reasons their own (`unchecked_destinies = ["encrypted=pass"]`).
Defaults are gateway-safe: infected and banned mail is discarded after
quarantine (a reject or bounce would go to a forged sender: backscatter),
unchecked mail is rejected, so it is never silently passed as clean.

`REPLIES` is the one table saying what each destiny means on every ingress:
the AM.PDP reply, the client's exit status, the SMTP reply, the milter
action. Ingresses read it; none has its own mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amavisd import sysexits
from amavisd.verdict import Category, Destiny, Unchecked


def unchecked_kind(reason: str) -> str:
    """The kind its finder gave the reason (verdict.Unchecked); never guessed
    from the text. A bare string, from code that gave none, is a "limit"."""
    return getattr(reason, "kind", "limit")


def reason_destinies(value: list[str]) -> list[str]:
    """Validator for `unchecked_destinies`: "kind=destiny" entries."""
    kinds = Unchecked.KINDS
    for entry in value:
        kind, sep, destiny = entry.partition("=")
        if not sep or kind.strip() not in kinds:
            raise ValueError(f"{entry!r}: use kind=destiny with kind one of {', '.join(kinds)}")
        Destiny(destiny.strip())  # ValueError names the bad destiny
    return [e.replace(" ", "") for e in value]


@dataclass(frozen=True)
class DestinyTable:
    by_category: dict[Category, Destiny]
    by_unchecked_kind: dict[str, Destiny]

    def destiny(self, category: Category, unchecked: list[str]) -> Destiny:
        if category is Category.UNCHECKED and unchecked:
            # the strictest of the destinies of the reasons present
            chosen = [self.by_unchecked_kind.get(unchecked_kind(r)) for r in unchecked]
            specific = [d for d in chosen if d is not None]
            if len(specific) == len(chosen):
                return max(specific, key=STRICTNESS.index)
        return self.by_category[category]


# From the most to the least lenient: where two reasons disagree the stricter wins.
STRICTNESS = [Destiny.PASS, Destiny.DISCARD, Destiny.BOUNCE, Destiny.REJECT, Destiny.TEMPFAIL]


def destinies(config: Mapping[str, Any]) -> DestinyTable:
    per_kind = {}
    for entry in config.get("unchecked_destinies", []):
        kind, _, destiny = entry.partition("=")
        per_kind[kind] = Destiny(destiny)
    return DestinyTable(
        by_category={
            Category.CLEAN: Destiny.PASS,
            Category.UNCHECKED: Destiny(config["unchecked_destiny"]),
            Category.BANNED: Destiny(config["banned_destiny"]),
            Category.INFECTED: Destiny(config["virus_destiny"]),
        },
        by_unchecked_kind=per_kind,
    )


@dataclass(frozen=True)
class Reply:
    ampdp: str  # AM.PDP return_value
    exit_code: int  # AM.PDP exit_code and amavisd-client's exit status (sysexits.h)
    smtp: str  # SMTP reply code (content filter, and AM.PDP setreply)
    enhanced: str  # RFC 3463 enhanced status code
    text: str  # {log_id} and {summary} are filled in
    milter: str  # milter end-of-message action: accept, discard, reject, tempfail


# BOUNCE at a pre-queue ingress (AM.PDP, milter, Sendmail mailer) is a 5xx:
# the MTA that still holds the mail produces the bounce, to the sender it
# knows. Only a post-queue filter sends a DSN of its own (actions.notify).
REPLIES: dict[Destiny, Reply] = {
    Destiny.PASS: Reply("continue", sysexits.EX_OK, "250", "2.5.0",
                        "Ok, id={log_id}, {summary}, continue delivery", "accept"),
    Destiny.DISCARD: Reply("discard", sysexits.EX_DISCARD, "250", "2.7.0",
                           "Ok, discarded, id={log_id} - {summary}", "discard"),
    Destiny.BOUNCE: Reply("reject", sysexits.EX_UNAVAILABLE, "554", "5.7.0",
                          "Reject, id={log_id} - {summary}", "reject"),
    Destiny.REJECT: Reply("reject", sysexits.EX_UNAVAILABLE, "554", "5.7.0",
                          "Reject, id={log_id} - {summary}", "reject"),
    Destiny.TEMPFAIL: Reply("tempfail", sysexits.EX_TEMPFAIL, "451", "4.5.0",
                            "Temporary failure, id={log_id} - {summary}", "tempfail"),
}

# A request we will not or cannot act on (AM.PDP: a bad request, a release
# refused or failed): amavisd-new answers each of these with 450 4.5.0
# "Failure: ...", return_value=tempfail, exit_code=75. {summary} is the
# public text (amavisd.failures), never a path.
REFUSED = Reply("tempfail", sysexits.EX_TEMPFAIL, "450", "4.5.0", "Failure: {summary}",
                "tempfail")
