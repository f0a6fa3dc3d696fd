"""printable() skips its translate when str.isprintable() says no control is
there: it must give what the translate alone gives, every time (every code
point), and an envelope must clean every field as printable() does (random
envelopes of controls, separators, surrogates and the rest)."""

from __future__ import annotations

import dataclasses
import random

from amavisd.envelope import Envelope
from amavisd.printable import printable

_CONTROLS = {c: "?" for c in (*range(0x20), 0x7F)}  # the reference: the translate alone


def reference(text: str) -> str:
    return text.translate(_CONTROLS)


def test_every_code_point_is_cleaned_as_the_translate_cleans_it():
    for point in range(0x110000):
        text = chr(point)
        assert printable(text) == reference(text), hex(point)
        assert printable("a" + text + "b") == reference("a" + text + "b"), hex(point)


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
        want = {name: [reference(v) for v in value] if isinstance(value, list)
                else reference(value) for name, value in values.items()}
        assert got == want, values
