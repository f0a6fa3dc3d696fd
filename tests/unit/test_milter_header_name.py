"""verdicts._header_name_ok checks whole strings with C methods; it must
accept exactly what the character loop it replaced accepted."""

from __future__ import annotations

import random

from amavisd_client.milter.verdicts import _header_name_ok


def reference(name: str) -> bool:
    return bool(name) and all("!" <= c <= "~" and c != ":" for c in name)


def test_every_code_point_alone_and_in_a_name() -> None:
    for code in range(0x110000):
        c = chr(code)
        for name in (c, "X-" + c, c + "a"):
            assert _header_name_ok(name) == reference(name), hex(code)
    assert _header_name_ok("") is reference("") is False


def test_random_names() -> None:
    rng = random.Random(5)
    alphabet = [chr(i) for i in range(0x180)] + ["\udcff", "\u2028", "\x85", "\ufeff"]
    for _ in range(50_000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))
        assert _header_name_ok(name) == reference(name), repr(name)
