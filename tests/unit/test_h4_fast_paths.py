"""The SMTP filter's fast paths (session 25, H4) give what the character
loops they skip give: each is checked against the loop it stands in front
of (kept here as the reference), on crafted and random strings."""

from __future__ import annotations

import random

import pytest

from amavisd.actions.smtpout import plain_path, xtext
from amavisd.protocol.smtpcodec import SyntaxProblem, _closing_bracket, parse_path


def closing_bracket_loop(text: str) -> int:
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    return -1


def plain_path_loop(address: str) -> bool:
    quoted = False
    escaped = False
    for c in address:
        if ord(c) < 32 or ord(c) == 127:
            return False
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "<> ":
            return False
    return not quoted


def xtext_loop(value: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode("utf-8")) for c in value)


def has_control_loop(address: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in address)


ALPHABET = 'ab@.<>"\\ +=:\x00\x1f\x7f\t\x20é\u2028x'
CRAFTED = ["", "<", "<>", "<a@b>", '<"a>b"@c>', '<"a\\">"@c> X=1', "<a\\>b@c>", '<"ab@c>',
           '<a"b>@c>', "<a@b", "<<a@b>>", '<"a\\\\">b', "a@b", 'a"b"@c', '"a b"@c', '"a\\"b"@c',
           "a b@c", "a<b@c", "a\x7f@b", "a\x00@b", '"a\\', "+a=b", "élan", "\x20", "~!*"]


def strings(seed: int, count: int = 3000):
    rng = random.Random(seed)
    yield from CRAFTED
    for _ in range(count):
        yield "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 14)))


def test_closing_bracket_as_the_loop():
    for text in strings(1):
        assert _closing_bracket(text) == closing_bracket_loop(text), text
        assert _closing_bracket("<" + text) == closing_bracket_loop("<" + text), text


def test_plain_path_as_the_loop():
    for text in strings(2):
        assert plain_path(text) is plain_path_loop(text), text


def test_xtext_as_the_loop():
    for text in strings(3):
        assert xtext(text) == xtext_loop(text), text


def test_parse_path_refuses_what_the_loop_refused():
    for text in strings(4):
        address = text.replace(">", "").replace('"', "")
        argument = f"FROM:<{address}>"
        if has_control_loop(address):
            with pytest.raises(SyntaxProblem, match="5.1.7"):
                parse_path(argument, "FROM")
        else:
            assert parse_path(argument, "FROM").address == \
                (address.split(":", 1)[1] if address.startswith("@") and ":" in address
                 else address)


@pytest.mark.parametrize(("argument", "address", "params"), [
    ("FROM:<a@b> SIZE=10", "a@b", {"SIZE": "10"}),
    ('FROM:<"x>y"@b> BODY=8BITMIME', '"x>y"@b', {"BODY": "8BITMIME"}),
    ('FROM:<"x\\">y"@b>', '"x\\">y"@b', {}),
    ("FROM:<>", "", {}),
])
def test_parse_path_brackets(argument, address, params):
    path = parse_path(argument, "FROM")
    assert (path.address, path.params) == (address, params)


@pytest.mark.parametrize("argument", ['FROM:<"a@b', "FROM:<a@b", "FROM:<a\x01b@c>",
                                      "FROM:<a\x7f@c>", "FROM:<a@b>x"])
def test_parse_path_refusals(argument):
    with pytest.raises(SyntaxProblem):
        parse_path(argument, "FROM")
