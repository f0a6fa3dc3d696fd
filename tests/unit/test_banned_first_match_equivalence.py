"""BannedRules.first_match in one loop (each field's strings found once a
part) picks the rule the rule-by-rule, condition-by-condition reading
picks: random rule lists with negated operators, empty values and every
field, over parts with empty names, types and flags."""

from __future__ import annotations

import random

from amavisd.decode.parts import Part
from amavisd.policy.banned import FIELDS, BannedRules, Rule


def first_match_by_rule(rules: BannedRules, part: Part) -> Rule | None:
    """The reading before 62c6564: a condition holds when any of the part's
    strings passes its test, a negated one when none does; a rule matches
    when all of its conditions hold; the first that matches wins."""
    for rule in rules.rules:
        if all(any(bool(c.test(text)) for text in FIELDS[c.field](part)) != c.negated
               for c in rule.conditions):
            return rule
    return None


NAMES = ["", "a.exe", "x/y.pdf.exe", "b.exe. ", "doc", "A.EXE", "dir/", ".", " ",
         "{12345678-1234-1234-1234-123456789abc}.txt"]
MIMES = ["", "application/x-msdownload", "text/plain", "message/partial", "MESSAGE/PARTIAL"]
TYPES = ["", "exe", "zip", "text"]
FLAGS = [set(), {"macros"}, {"a", "b"}, {""}]
VALUES = ["''", '""', "exe", r"\.exe$", "^$", ".", "macros", "message/partial", "a", "'x y'"]
OPERATORS = ["~", "!~", "=", "!="]


def test_first_match_is_the_rule_by_rule_reading():
    rng = random.Random(3)
    for _ in range(3000):
        lines = [f"{rng.choice(['allow', 'deny'])} " + " and ".join(
                     f"{rng.choice(list(FIELDS))} {rng.choice(OPERATORS)} {rng.choice(VALUES)}"
                     for _ in range(rng.randrange(1, 4)))
                 for _ in range(rng.randrange(1, 6))]
        rules = BannedRules.parse(lines)
        for _ in range(4):
            part = Part(id="p001", name=rng.choice(NAMES), mime_type=rng.choice(MIMES),
                        detected=rng.choice(TYPES), detected_mime=rng.choice(MIMES),
                        flags=set(rng.choice(FLAGS)))
            assert rules.first_match(part) is first_match_by_rule(rules, part), (lines, part)


def test_the_default_rules_on_every_combination():
    rules = BannedRules.default()
    for name in NAMES:
        for mime in MIMES:
            for kind in TYPES:
                part = Part(id="p001", name=name, mime_type=mime, detected=kind)
                assert rules.first_match(part) is first_match_by_rule(rules, part)
