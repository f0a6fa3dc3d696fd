"""Per-recipient lookups and outcomes (amavisd/policy/recipients.py).

The lookup order is amavisd-new's (make_query_keys): the most specific key
present decides, whatever order the entries were written in. A bypass may
only ever waive what the recipient asked to skip: fail closed for the rest.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from amavisd.config import ConfigError, load
from amavisd.policy.destinies import destinies
from amavisd.policy.recipients import (
    AddressTable,
    RecipientChecks,
    lookup_keys,
    outcome,
    strictest,
)
from amavisd.verdict import Category, Destiny, Unchecked


def test_lookup_keys_go_from_the_address_to_everyone():
    assert lookup_keys("<User@Sub.Example.COM.>") == [
        "user@sub.example.com", "user@", "sub.example.com", ".sub.example.com",
        ".example.com", ".com", "."]
    assert lookup_keys("user@[192.0.2.1]") == ["user@[192.0.2.1]", "user@", "[192.0.2.1]", "."]
    assert lookup_keys("<>") == ["."]
    assert lookup_keys("postmaster") == ["postmaster@", "."]  # no domain: user@, everyone


def test_the_most_specific_entry_wins_whatever_the_order():
    table = AddressTable.flags([".example.org", "!boss@example.org", "example.net"])
    assert table.lookup("anyone@example.org") is True
    assert table.lookup("anyone@deep.sub.example.org") is True  # .domain: subdomains too
    assert table.lookup("<BOSS@Example.ORG>") is False  # more specific, negated
    assert table.lookup("a@example.net") is True
    assert table.lookup("a@sub.example.net") is None  # domain: that domain only
    assert table.lookup("a@example.com") is None
    assert not AddressTable.flags([]) and AddressTable.flags([]).lookup("a@b") is None


def test_recipient_policy_pairs_keep_the_first_entry_for_a_key():
    table = AddressTable.pairs(["example.org=STRICT", "user@x.org=LENIENT",
                                "example.org=OTHER", ".=DEFAULT"])
    assert table.lookup("a@example.org") == "STRICT"
    assert table.lookup("user@x.org") == "LENIENT"
    assert table.lookup("other@x.org") == "DEFAULT"


def test_hostile_addresses_never_raise():
    table = AddressTable.flags([".example.org"])
    for address in ["", "@", "@@@", "a@" + "x." * 5000 + "org", "\x00@\xff", "<<>>", "a@.",
                    "a@[", "a@]"]:
        table.lookup(address)
    assert len(lookup_keys("a@" + "x." * 5000 + "org")) < 30  # bounded, as amavisd-new's


def test_address_lists_are_checked_at_load():
    cfg = load(None, {"bypass_virus_checks": ["@Example.ORG", "!Boss@example.org", ".x.net"],
                      "recipient_policy": ["User@X.org=ORIGINATING"]})
    assert cfg.bypass_virus_checks == ["example.org", "!boss@example.org", ".x.net"]
    assert cfg.recipient_policy == ["user@x.org=ORIGINATING"]
    for key, bad in [("bypass_virus_checks", ["a b@c"]), ("bypass_banned_checks", ["a@b@c"]),
                     ("bypass_virus_checks", ["example..org"]),
                     ("recipient_policy", ["example.org"]),
                     ("recipient_policy", ["!example.org=ORIGINATING"])]:
        with pytest.raises(ConfigError, match=key):
            load(None, {key: bad})


# -- outcomes -----------------------------------------------------------------------------

POLICY = SimpleNamespace(destinies=destinies(load(None, {"unchecked_destiny": "reject"})))
LIMIT = Unchecked("nesting too deep", "limit")
UNSCANNED = Unchecked("not scanned: 1/2 (too large)", "unscanned")


def check(virus=False, banned=False):
    return RecipientChecks("r@example.org", POLICY, bypass_virus=virus, bypass_banned=banned)


def test_a_recipient_without_bypass_sees_everything():
    got = outcome(check(), infected=True, banned=True, unchecked=[LIMIT])
    assert (got.category, got.destiny) == (Category.INFECTED, Destiny.DISCARD)


def test_bypassing_virus_checks_waives_findings_and_unscanned_parts_only():
    got = outcome(check(virus=True), infected=True, banned=False, unchecked=[UNSCANNED])
    assert (got.category, got.destiny) == (Category.CLEAN, Destiny.PASS)
    # what could not be decoded hid things from the banned rules it still wants
    got = outcome(check(virus=True), infected=True, banned=False, unchecked=[LIMIT, UNSCANNED])
    assert (got.category, got.destiny, got.unchecked) == (Category.UNCHECKED, Destiny.REJECT,
                                                          (LIMIT,))
    got = outcome(check(virus=True), infected=True, banned=True, unchecked=[])
    assert got.category is Category.BANNED


def test_bypassing_both_waives_decoding_reasons_but_not_an_unread_message():
    both = check(virus=True, banned=True)
    assert outcome(both, True, True, [LIMIT]).category is Category.CLEAN
    unread = outcome(both, False, False, [LIMIT], bypassable=False)
    assert (unread.category, unread.destiny) == (Category.UNCHECKED, Destiny.REJECT)


def test_bypassing_banned_checks_waives_banned_parts_only():
    got = outcome(check(banned=True), infected=False, banned=True, unchecked=[])
    assert got.category is Category.CLEAN
    assert outcome(check(banned=True), True, True, []).category is Category.INFECTED


def test_a_forced_destiny_stands_for_every_recipient():
    got = outcome(check(), infected=False, banned=False, unchecked=[UNSCANNED],
                  force=Destiny.PASS)
    assert (got.category, got.destiny) == (Category.UNCHECKED, Destiny.PASS)


def test_a_forced_pass_for_a_dead_scanner_waives_nothing_else():
    """when_scanners_fail=pass forces PASS for what only a scan would have
    settled: a banned part, or a part that could not be decoded, keeps its
    own destiny."""
    got = outcome(check(), infected=False, banned=True, unchecked=[UNSCANNED],
                  force=Destiny.PASS)
    assert (got.category, got.destiny) == (Category.BANNED, Destiny.DISCARD)
    got = outcome(check(), infected=False, banned=False, unchecked=[LIMIT, UNSCANNED],
                  force=Destiny.PASS)
    assert (got.category, got.destiny) == (Category.UNCHECKED, Destiny.REJECT)


def test_the_strictest_destiny_answers_for_the_message():
    assert strictest([Destiny.PASS, Destiny.DISCARD]) is Destiny.DISCARD
    assert strictest([Destiny.DISCARD, Destiny.REJECT, Destiny.PASS]) is Destiny.REJECT
    assert strictest([Destiny.REJECT, Destiny.TEMPFAIL]) is Destiny.TEMPFAIL
    assert strictest([Destiny.PASS]) is Destiny.PASS
