"""Envelope's fields cleaned only when str.isprintable() says a control may
be there give what printable() gives every time: for every code point, and
for random envelopes of controls, separators, surrogates and the rest."""

from __future__ import annotations

import dataclasses
import random

from amavisd.envelope import Envelope, _printable
from amavisd.printable import printable


def test_every_code_point_is_cleaned_as_printable_cleans_it():
    for point in range(0x110000):
        text = chr(point)
        assert _printable(text) == printable(text), hex(point)
        assert _printable("a" + text + "b") == printable("a" + text + "b"), hex(point)


def test_a_random_envelope_is_cleaned_as_printable_cleans_each_field():
    rng = random.Random(4)
    pool = [chr(c) for c in range(0x250)] + [
        "\u2028", "\u2029", "\u200b", "\ufeff", "\udcff", "\U0001f600", "\x85", "\xa0"]

    def text() -> str:
        return "".join(rng.choice(pool) for _ in range(rng.randrange(6)))

    for _ in range(5000):
        values = {f.name: text() for f in dataclasses.fields(Envelope)}
        values["recipients"] = [text() for _ in range(rng.randrange(3))]
        got = dataclasses.asdict(Envelope(**values))
        want = {name: [printable(v) for v in value] if isinstance(value, list)
                else printable(value) for name, value in values.items()}
        assert got == want, values
