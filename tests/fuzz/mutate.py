"""Mutations of real samples, drawn from any source of choices.

Blind bytes never get past a reader's magic number, so every decoder fuzz
input starts as a real sample (made by the real archivers, or from the
shared corpus) and is changed a few times: bits and bytes flipped, cut,
chunks erased or repeated, bytes inserted, a size, count or offset field set
to an edge value or moved by a little, a chunk of another sample spliced in.
Then, mostly, the format's checksums are repaired (tests/fuzz/repair.py) so
the mutant reaches the code behind the first check.

`rng` is a random.Random (the direct driver, tests/fuzz/direct.py, seeds it
per target, so a run is repeatable); only its `randrange`, `choice` and
`randbytes` are used, so another source of choices could stand in.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from tests.fuzz.repair import REPAIR_ERRORS

MAX_INPUT = 1024 * 1024  # a mutant is cut here: chunk repeats must not grow it without end
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0xFFFFFFFFFFFFFFFF, 0x8000000000000000]
INTERESTING_BYTES = b"\x00\x01\x7f\x80\xff/.\\:\n\r -0"
FIELDS = ["<H", "<I", ">H", ">I", "<Q"]


def mutate(rng, seeds: Sequence[bytes], fixup: Callable[[bytearray], None] | None = None,
           rounds: int = 6) -> bytes:
    """One mutant of one of `seeds`: up to `rounds` mutations, then (three
    times in four, when the format has one) the checksum repair."""
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randrange(rounds + 1)):
        if not data:
            break
        MUTATIONS[rng.choice(NAMES)](rng, data, rng.randrange(len(data)), seeds)
    del data[MAX_INPUT:]
    if fixup is not None and rng.randrange(4):  # mostly repaired, sometimes not
        try:
            fixup(data)
        except REPAIR_ERRORS:
            pass  # mutated past repair: the decoder gets it as it is
    return bytes(data)


def _bit(rng, data, at, seeds):
    data[at] ^= 1 << rng.randrange(8)


def _flip(rng, data, at, seeds):
    data[at] ^= 1 + rng.randrange(255)


def _byte(rng, data, at, seeds):
    data[at] = rng.choice(INTERESTING_BYTES)


def _cut(rng, data, at, seeds):
    """Truncation: the commonest way a real archive breaks."""
    del data[at:]


def _erase(rng, data, at, seeds):
    del data[at:at + 1 + rng.randrange(64)]


def _repeat(rng, data, at, seeds):
    """A chunk repeated in place: members, records or headers twice or more."""
    data[at:at] = data[at:at + 1 + rng.randrange(512)] * (1 + rng.randrange(8))


def _insert(rng, data, at, seeds):
    data[at:at] = rng.randbytes(1 + rng.randrange(32))


def _zero(rng, data, at, seeds):
    data[at:at + 1 + rng.randrange(16)] = bytes(4)


def _integer(rng, data, at, seeds):
    """A size, count or offset field set to an edge value: the usual way a
    reader is talked into a huge allocation or a read past the end."""
    fmt = rng.choice(FIELDS)
    value = rng.choice(INTERESTING) & ((1 << (8 * struct.calcsize(fmt))) - 1)
    packed = struct.pack(fmt, value)
    data[at:at + len(packed)] = packed


def _nudge(rng, data, at, seeds):
    """A field moved by a little: an offset one past a boundary, a length one
    short, a count one more than there are."""
    fmt = rng.choice(FIELDS)
    width = struct.calcsize(fmt)
    if at + width > len(data):
        return
    (value,) = struct.unpack_from(fmt, data, at)
    delta = rng.choice([-1, 1]) * (1 + rng.randrange(rng.choice([2, 16, 512])))
    struct.pack_into(fmt, data, at, (value + delta) % (1 << (8 * width)))


def _splice(rng, data, at, seeds):
    """A chunk of another sample over what was there: offsets behind stay put."""
    other = rng.choice(seeds)
    if other:
        start = rng.randrange(len(other))
        chunk = other[start:start + 1 + rng.randrange(4096)]
        data[at:at + len(chunk)] = chunk


def _cross(rng, data, at, seeds):
    """This sample's head on another's tail."""
    other = rng.choice(seeds)
    if other:
        data[at:] = other[rng.randrange(len(other)):]


MUTATIONS = {"bit": _bit, "flip": _flip, "byte": _byte, "cut": _cut, "erase": _erase,
             "repeat": _repeat, "insert": _insert, "zero": _zero, "integer": _integer,
             "nudge": _nudge, "splice": _splice, "cross": _cross}
NAMES = list(MUTATIONS)
