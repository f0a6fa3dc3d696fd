"""Per-recipient settings and outcomes: who bypasses which check, which bank
a recipient's destiny comes from, and the one answer for a whole message.

Lookups follow amavisd-new's hash lookups (its make_query_keys): for
`User@Sub.Example.COM` the keys tried, most specific first, are
`user@sub.example.com`, `user@`, `sub.example.com`, `.sub.example.com`,
`.example.com`, `.com`, `.`; the first key present decides. So `domain`
matches that domain only, `.domain` it and its subdomains, and a more
specific entry always beats a general one whatever the order written
(`!user@x.org` exempts one user from `.x.org`).

Each recipient gets its own category (after its bypasses) and destiny (from
its policy). Bypassing virus checks drops the findings and the `unscanned`
reasons for that recipient (amavisd-new drops every UNCHECKED reason too);
we keep the decoding reasons (limits, encrypted, undecipherable, ...) unless
the recipient also bypasses banned checks, because the banned rules it still
wants were blind to whatever could not be decoded. Fail closed: a bypass
never makes mail CLEAN for a recipient who did not ask for it.

One answer for the message (AM.PDP, the milter, a mailer: one reply) is the
strictest recipient's destiny (`destinies.STRICTNESS`). amavisd-new agrees
whenever no recipient passes (all discard: discard; discards and rejects:
reject; any tempfail: tempfail). Where some pass and others are blocked it
answers 250 and deletes the blocked recipients (AM.PDP `delrcpt`), and
bounces the rejected ones itself; until an ingress can delete recipients,
we block the message for all. `Result.recipient_destinies` keeps every
recipient's own destiny for an ingress that can answer one by one (LMTP).

Never raises on an address: envelope addresses are hostile text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from amavisd.envelope import bare_address
from amavisd.policy.destinies import STRICTNESS
from amavisd.verdict import Category, Destiny, Unchecked

T = TypeVar("T")
MAX_DOMAIN_KEYS = 20  # amavisd-new's sanity limit on .sub.domain keys
# UNCHECKED reasons only a virus scan would have settled.
SCAN_ONLY_KINDS = frozenset({"unscanned"})


def lookup_keys(address: str) -> list[str]:
    """The keys tried for `address`, most specific first."""
    address = bare_address(address).lower()
    local, at, domain = address.rpartition("@")
    if not at:  # no domain at all: a bare local part (or the null address)
        local, domain = address, ""
    domain = domain.rstrip(".")
    keys = []
    if local:
        keys += [f"{local}@{domain}", f"{local}@"] if domain else [f"{local}@"]
    if domain:
        keys.append(domain)
        if domain.startswith("["):  # an address literal is not split
            keys.append(".")
        else:
            labels = domain.split(".")
            dotted = [f".{'.'.join(labels[i:])}" for i in range(len(labels))]
            keys += dotted[-MAX_DOMAIN_KEYS:] + ["."]
    else:
        keys.append(".")
    return keys


class AddressTable(Generic[T]):
    """Keys as the settings write them (address_spec) to values; lookups most
    specific first. Empty tables answer at once (the common case)."""

    def __init__(self, entries: dict[str, T]):
        self.entries = entries

    @classmethod
    def flags(cls, specs: Iterable[str]) -> AddressTable[bool]:
        """A list setting: "spec" says yes, "!spec" no."""
        return cls({s.lstrip("!"): not s.startswith("!") for s in specs})

    @classmethod
    def pairs(cls, entries: Iterable[str]) -> AddressTable[str]:
        """A "spec=VALUE" list setting; the first entry for a key stands."""
        table: dict[str, str] = {}
        for entry in entries:
            key, _, value = entry.rpartition("=")
            table.setdefault(key, value)
        return cls(table)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def lookup(self, address: str, keys: Sequence[str] | None = None) -> T | None:
        """The value of the most specific key present; `keys`: lookup_keys(address)
        when the caller has them already (several tables, one recipient)."""
        if not self.entries:
            return None
        for key in keys if keys is not None else lookup_keys(address):
            if key in self.entries:
                return self.entries[key]
        return None


@dataclass(frozen=True)
class RecipientChecks:
    """What applies to one recipient: its policy (any object with
    `destinies`, `banned_rules` and `quarantined`) and its bypasses."""

    address: str | None  # None: a message without recipients (amavisd scan)
    policy: object
    bypass_virus: bool = False
    bypass_banned: bool = False


@dataclass(frozen=True)
class RecipientOutcome:
    address: str | None
    category: Category
    destiny: Destiny
    unchecked: tuple[Unchecked, ...] = ()


def recipient_unchecked(checks: RecipientChecks, unchecked: Sequence[Unchecked],
                        bypassable: bool = True) -> list[Unchecked]:
    """The reasons that make the message UNCHECKED for this recipient.
    `bypassable` False: reasons no bypass waives (a message too large to read)."""
    if not bypassable or not checks.bypass_virus:
        return list(unchecked)
    if checks.bypass_banned:
        return []
    return [u for u in unchecked if getattr(u, "kind", "limit") not in SCAN_ONLY_KINDS]


def outcome(checks: RecipientChecks, infected: bool, banned: bool,
            unchecked: Sequence[Unchecked], force: Destiny | None = None,
            bypassable: bool = True) -> RecipientOutcome:
    """Category and destiny for one recipient, from the message's findings:
    `infected` (a scanner found something), `banned` (this recipient's rules
    hit a part), the UNCHECKED reasons."""
    reasons = recipient_unchecked(checks, unchecked, bypassable)
    category = Category.CLEAN
    if reasons:
        category = Category.UNCHECKED
    if banned and not checks.bypass_banned:
        category = Category.BANNED
    if infected and not checks.bypass_virus:
        category = Category.INFECTED
    table = checks.policy.destinies
    if force is None or category not in (Category.CLEAN, Category.UNCHECKED):
        destiny = table.destiny(category, reasons)
    else:
        # A forced destiny (when_scanners_fail=pass) stands in for what only a
        # scan would have settled; a banned part, or one that could not be
        # decoded, keeps its own destiny (fail closed).
        rest = [u for u in reasons if getattr(u, "kind", "limit") not in SCAN_ONLY_KINDS]
        destiny = strictest([force, table.destiny(Category.UNCHECKED, rest)]) if rest else force
    return RecipientOutcome(checks.address, category, destiny, tuple(reasons))


def strictest(destinies: Iterable[Destiny]) -> Destiny:
    """The one destiny for a message whose recipients disagree."""
    return max(destinies, key=STRICTNESS.index, default=Destiny.PASS)
