"""The milter Decoder (a macro packet parsed once while it repeats, its pairs
cut without a strict zip, the commands without data made once) must give
what a plain decoder gave, parsing every packet afresh with the macro parser
as it was, for every input: the same commands, the same error (a bad length
anywhere in a read wins over an unknown command), the same bytes held and
the same broken state after. Checked over random hostile streams cut into
random reads."""

from __future__ import annotations

import random
import struct

import pytest

from amavisd_client.milter import codec
from amavisd_client.milter.codec import COMMANDS, Decoder, Framer, ProtocolError


def reference_macro(data: bytes) -> codec.Macro:
    """The macro parser as it was: pairs cut to an even count, zipped strictly."""
    if not data:
        return codec.Macro("")
    parts = data[1:].decode("utf-8", "surrogateescape").split("\0")
    if parts[-1] == "":
        parts.pop()
    pairs = zip(parts[0:len(parts) & ~1:2], parts[1::2], strict=True)
    return codec.Macro(chr(data[0]), {
        name[1:-1] if name[:1] == "{" and name[-1:] == "}" else name: value
        for name, value in pairs})


class ReferenceDecoder:
    """The two-step decoder: Framer.feed, then a loop over its packets."""

    def __init__(self, max_packet: int = codec.MAX_PACKET):
        self.framer = Framer(max_packet)
        self._macro: tuple[bytes, codec.Macro] = (b"", codec.Macro(""))

    def feed(self, data):
        commands = []
        for code, payload in self.framer.feed(data):
            if code == ord("D"):
                raw, macro = self._macro
                if payload != raw:
                    macro = reference_macro(payload)
                    self._macro = (payload, macro)
                commands.append(macro)
                continue
            parse = COMMANDS.get(code)
            if parse is None:
                self.framer._error = f"unknown command {bytes((code,))!r}"
                raise ProtocolError(self.framer._error)
            commands.append(parse(payload))
        return commands


CODES = b"ODCHMRTLNBEUAQK"


def _payload(rng: random.Random, code: int) -> bytes:
    kind = rng.random()
    if code == ord("O") and kind < 0.6:
        return struct.pack(">III", rng.choice([0, 1, 2, 6, 7, 2**32 - 1]),
                           rng.getrandbits(32), rng.getrandbits(32))[:rng.choice([12, 12, 11, 0, 3])]
    if code == ord("D") and kind < 0.7:
        names = [b"i", b"{mail_addr}", b"{", b"}", b"{}", b"{x", b"j", b"\xff", b""]
        parts = [bytes([rng.choice(b"CHMRTLNBEX\0")])]
        for _ in range(rng.randrange(0, 6)):
            parts.append(rng.choice(names) + b"\0" + rng.randbytes(rng.randrange(0, 4)))
        raw = b"\0".join(parts)[:rng.randrange(0, 80)]
        return raw + (b"\0" * rng.randrange(0, 3))
    if code == ord("C") and kind < 0.7:
        return (b"host\0" + bytes([rng.choice(b"46LU\0")]) + rng.randbytes(rng.randrange(0, 4))
                + b"1.2.3.4\0")[:rng.randrange(0, 20)]
    alphabet = b"\0\0ab<>\xff\r\n:"
    return bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _stream(rng: random.Random, max_packet: int, bad: float = 1.0) -> bytes:
    """Packets, some broken; `bad` scales how often (0: none)."""
    out = bytearray()
    for _ in range(rng.randrange(1, 12)):
        roll = rng.random() / bad if bad else 1.0
        if roll < 0.04:
            out += rng.randbytes(rng.randrange(1, 9))  # garbage
            continue
        code = rng.choice(CODES) if rng.random() >= 0.1 * bad else rng.randrange(256)
        payload = _payload(rng, code)
        length = len(payload) + 1
        roll = rng.random() / bad if bad else 1.0
        if roll < 0.03:
            length = 0
        elif roll < 0.06:
            length = rng.choice([max_packet, max_packet + 1, 2**32 - 1, max_packet + 5])
        elif roll < 0.09:
            length += rng.randrange(-1, 4)
        out += struct.pack(">I", length) + bytes([code]) + payload
    return bytes(out)


def _cuts(rng: random.Random, data: bytes) -> list[bytes]:
    reads, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 2, 3, 4, 5, 7, len(data), rng.randrange(1, len(data) + 1)])
        reads.append(data[pos:pos + n])
        pos += n
    return reads


def _outcome(decoder, data):
    try:
        result = ("ok", decoder.feed(data))
    except Exception as err:  # noqa: BLE001 - compared, not handled
        result = ("error", type(err), str(err))
    # The macro cache only matters while the stream goes on: once the framer
    # is broken every read raises (the one-pass decoder may have cached a
    # macro that came before the bad length in the same read).
    macro = decoder._macro if decoder.framer._error is None else None
    return result, decoder.framer.pending, bytes(decoder.framer._buffer), \
        decoder.framer._error, macro


def check_equivalent(seed: int, streams: int, bad: float = 1.0) -> None:
    rng = random.Random(seed)
    for _ in range(streams):
        max_packet = rng.choice([codec.MAX_PACKET, 64, 8, 1] if bad else [codec.MAX_PACKET])
        new, ref = Decoder(max_packet), ReferenceDecoder(max_packet)
        for read in _cuts(rng, _stream(rng, max_packet, bad)):
            # as the server feeds it: a view of a shared buffer, overwritten after
            shared = bytearray(read)
            got = _outcome(new, memoryview(shared))
            shared[:] = b"\xee" * len(shared)
            want = _outcome(ref, read)
            assert got == want, (seed, read)


@pytest.mark.parametrize(("seed", "bad"), [(0, 1.0), (1, 1.0), (2, 0.1), (3, 0.0)])
def test_decoder_matches_two_step_reference(seed: int, bad: float) -> None:
    check_equivalent(seed, 1500, bad)


def test_length_error_later_in_a_read_wins_over_an_unknown_command() -> None:
    wire = b"\0\0\0\x01Z" + b"\0\0\0\0"
    for decoder in (Decoder(), ReferenceDecoder()):
        with pytest.raises(ProtocolError, match="empty"):
            decoder.feed(wire)


def test_a_short_negotiation_is_raised_after_the_read_is_framed() -> None:
    wire = b"\0\0\0\x02O\0" + b"\0\0\0\x01A" + b"\0\0"
    new, ref = Decoder(), ReferenceDecoder()
    for decoder in (new, ref):
        with pytest.raises(ProtocolError, match="option negotiation"):
            decoder.feed(wire)
    assert new.framer.pending == ref.framer.pending == 2
    assert new.framer._error is ref.framer._error is None
