"""The policy in force for one message, built once per combination of banks.

A message's policy banks (policy/banks.py) lay settings over the config;
everything the pipeline derives from the result (the destiny table, the
parsed banned rules, the quarantine store, the notifier, the recipient
lookups) is built the first time a combination is seen and then cached:
workers handle hundreds of messages a second, and the common case, no bank
at all or the same one or two, must cost a dict lookup. Pieces two
combinations share (the same banned rules, notify method, template dir,
quarantine store) are shared, not rebuilt.

The cache is bounded (`MAX_POLICIES`, oldest out first): clients choose
banks, so they could otherwise make a worker hold one object per ordering of
the defined banks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amavisd.actions.forward import Forwarder, forwarder
from amavisd.actions.notify import Notifier, NotifySettings, Templates
from amavisd.config import Config, ConfigError
from amavisd.envelope import Job
from amavisd.policy.banks import Banks, Networks, collapse
from amavisd.policy.banned import BannedRules
from amavisd.policy.destinies import DestinyTable, destinies
from amavisd.policy.recipients import AddressTable, RecipientChecks, lookup_keys
from amavisd.quarantine import QuarantineStore, open_store

MAX_POLICIES = 256
# Settings that make a different quarantine store, a different sender of notices.
STORE_KEYS = ("quarantine_store", "quarantine_dir", "quarantine_gzip")


@dataclass
class Policy:
    banks: tuple[str, ...]  # in the order applied; () is the config as written
    config: Config
    originating: bool
    destinies: DestinyTable
    banned_rules: BannedRules
    quarantined: frozenset[str]  # categories kept, upper case (Result.verdict)
    quarantine: QuarantineStore | None
    notifier: Notifier
    mynetworks: Networks
    bypass_virus: AddressTable[bool]
    bypass_banned: AddressTable[bool]
    recipient_banks: AddressTable[str]


class Policies:
    """Every combination of banks a worker has met, and how to pick one."""

    def __init__(self, config: Config, quarantine: QuarantineStore | None = None):
        """`quarantine`: the store for the config as written (None: the one
        it names); a bank naming another location gets its own."""
        self.banks = Banks(config)
        self._store_key = _key(config, STORE_KEYS)
        self._store = quarantine if quarantine is not None else open_store(config)
        self._rules: dict[tuple[str, ...], BannedRules] = {}
        self._senders: dict[tuple[Any, ...], Forwarder] = {}
        self._templates: dict[str, Templates] = {}
        self._cache: dict[tuple[str, ...], Policy] = {}
        self.base = self.get(())
        for name in self.banks.tables:  # each bank alone, now: what only a build can
            self.get((name,))           # find wrong (a quarantine_store URL) fails the boot

    def get(self, names: Sequence[str]) -> Policy:
        key = tuple(names)
        policy = self._cache.get(key)
        if policy is None:
            policy = self._build(key)
            if len(self._cache) >= MAX_POLICIES:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = policy
        return policy

    def for_job(self, job: Job) -> Policy:
        """Listener banks, then MYNETS, then the client's names (banks.py)."""
        names = list(job.interface_banks)
        env = job.envelope
        door = self.get(collapse(names)) if names else self.base
        if env.client_address and env.client_address in door.mynetworks:
            names.append("MYNETS")
        if env.policy_bank:
            names += self.banks.requested(env.policy_bank, job.log_id)
        return self.get(collapse(names)) if names else self.base

    def config_for(self, names: Sequence[str]) -> Config:
        return self.get(collapse(names)).config

    def recipient_checks(self, policy: Policy, recipients: Sequence[str]
                         ) -> list[RecipientChecks]:
        """Each recipient's policy (its recipient_policy bank over the
        message's) and bypasses; one anonymous entry when there are none."""
        if not recipients:
            return [RecipientChecks(None, policy)]
        if not (policy.recipient_banks or policy.bypass_virus or policy.bypass_banned):
            return [RecipientChecks(r, policy) for r in recipients]
        checks = []
        for rcpt in recipients:
            keys = lookup_keys(rcpt)  # once, for every table
            chosen = policy
            bank = policy.recipient_banks.lookup(rcpt, keys)
            if bank is not None and bank in self.banks.tables:
                chosen = self.get(collapse(policy.banks + (bank,)))
            checks.append(RecipientChecks(rcpt, chosen,
                                          bool(chosen.bypass_virus.lookup(rcpt, keys)),
                                          bool(chosen.bypass_banned.lookup(rcpt, keys))))
        return checks

    # -- building one ---------------------------------------------------------

    def _build(self, names: tuple[str, ...]) -> Policy:
        try:
            return self._assemble(names)
        except ConfigError as err:
            raise ConfigError(f"policy_banks.{'/'.join(names)}: {err}") from None

    def _assemble(self, names: tuple[str, ...]) -> Policy:
        config = self.banks.overlay(names)
        rules_key = tuple(config["banned_rules"])
        if rules_key not in self._rules:
            self._rules[rules_key] = BannedRules.parse(config["banned_rules"])
        store = self._store
        if _key(config, STORE_KEYS) != self._store_key:
            store = open_store(config)
        send_key = (config["notify_method"], config["smtp_timeout"])
        if send_key not in self._senders:
            self._senders[send_key] = forwarder(*send_key)
        template_dir = config["template_dir"]
        if template_dir not in self._templates:
            self._templates[template_dir] = Templates([template_dir] if template_dir else [])
        return Policy(
            banks=names, config=config, originating=bool(config.get("originating", False)),
            destinies=destinies(config), banned_rules=self._rules[rules_key],
            quarantined=frozenset(c.upper() for c in config["quarantine"]),
            quarantine=store,
            notifier=Notifier(NotifySettings.from_config(config), self._senders[send_key],
                              self._templates[template_dir]),
            mynetworks=Networks(config.get("mynetworks", [])),
            bypass_virus=AddressTable.flags(config.get("bypass_virus_checks", [])),
            bypass_banned=AddressTable.flags(config.get("bypass_banned_checks", [])),
            recipient_banks=AddressTable.pairs(config.get("recipient_policy", [])),
        )


def _key(config: Config, keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple(config.get(k) for k in keys)
