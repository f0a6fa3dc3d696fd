"""freeze (.F), versions 1.x and 2.x: our own reader, in-process.

AMaViS opens .F, and nothing on Debian 12 does: no melt/unfreeze package, and
unar, 7zz and ancient 2.0 do not know the format. Freeze is LHarc's -lh1-
scheme (LZHUF) with its own parameters, small enough to read here.

The format, as freeze 2.5's melt reads it (facts from the descriptions in
temisu/ancient's FreezeDecompressor and pts/luuzcat's unfreeze.c, and the
Archive Team's "Freeze/Melt" page; no code taken from them):
- Magic 1F 9E is freeze 1.x, 1F 9F freeze 2.x. No name, size or checksum.
- LZSS over a window of 4096 (1.x) or 8192 (2.x) bytes that starts full of
  spaces, bits read most significant first.
- Literals (0-255), the end marker (256) and match lengths (257 and up: 3 to
  60 bytes in 1.x, 3 to 256 in 2.x) share one adaptive Huffman code (LZHUF's):
  every count starts at 1 in a balanced tree, a decoded symbol's count and its
  ancestors' go up by one, a node that outgrows the nodes after it swaps with
  the last of them, and when the root's count reaches 0x8000 all counts are
  halved (rounding up) and the tree is built again.
- A match's distance (minus one) is a static canonical prefix code of 1 to 8
  bits for its high part, then 6 (1.x) or 7 (2.x) plain low bits. 1.x has a
  fixed code: 1, 3, 8, 12, 24 and 16 codes of 3 to 8 bits. 2.x gives the
  number of codes of 1 to 6 bits in the 3 bytes after the magic (a little-
  endian word of 1+2+3+4+5 bits with its top bit clear, then a byte of 6 bits
  with its top two clear); those of 7 and 8 bits follow from there being 62
  codes that fill the 8-bit space.

Output leaves through the sink in chunks, charged as it goes; a stream cut
short or corrupt keeps (and flags) what came before the fault, and a corrupt
one makes the message UNCHECKED (`Undecipherable`): freeze has no check
value, so a fault is always content that could not be produced.

Never: hold more than a window plus about two chunks of output and a slice of
the input, loop without a bound (each pass takes input bits or a piece of
input, the tree walks are bounded), or let anything but a LimitExceeded or a
DecodeError out.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import product

from amavisd.decode.compressed import inner_name
from amavisd.decode.limits import LimitExceeded
from amavisd.decode.parts import Part
from amavisd.decode.registry import Context, DecodeError, Undecipherable, register

CHUNK = 1024 * 1024  # output handed to the sink at a time
# Input is decoded a piece at a time. A token takes at least 1 bit (a literal)
# or 9 bits (a match of at most 256 bytes), so one piece makes at most ~1 MiB.
PIECE = 4 * 1024
# Bits kept ahead of the decoder: more than any token can take (a tree walk
# is shorter than the tree has nodes, a distance takes 15 bits).
MARGIN = 2048
MAX_FREQ = 0x8000  # the root's count that makes the tree halve and rebuild
END = 256  # the end-of-stream symbol
MIN_MATCH = 3  # symbol 257 is a match of 3 bytes
SENTINEL = 0xFFFF  # a count after the root, above any real one: no swap goes past it

_DIGITS = bytes.maketrans(b"01", b"\0\1")


def as_bits(data: bytes) -> bytes:
    """Each bit of `data` as a 0 or 1 byte, most significant first (in C:
    four times as fast as a table lookup a byte)."""
    if not data:
        return b""
    digits = format(int.from_bytes(data, "big"), f"0{8 * len(data)}b")
    return digits.encode("ascii").translate(_DIGITS)


# A run of n bits (0 <= n <= 8) -> its value; one dict a length, so a run cut
# short by the end of the input is not found (KeyError) rather than misread.
VALUE = tuple({bytes(bits): int("".join(map(str, bits)) or "0", 2)
               for bits in product((0, 1), repeat=n)} for n in range(9))


@dataclass(frozen=True)
class Version:
    name: str
    header: int  # bytes before the bit stream
    window: int
    symbols: int  # literals, the end marker and the match lengths
    low_bits: int  # distance bits sent as they are


V1 = Version("freeze 1.x", 2, 4096, 256 + 1 + 60 - MIN_MATCH + 1, 6)
V2 = Version("freeze 2.x", 5, 8192, 256 + 1 + 256 - MIN_MATCH + 1, 7)
VERSIONS = {b"\x1f\x9e": V1, b"\x1f\x9f": V2}
V1_CODE_LENGTHS = (0, 0, 1, 3, 8, 12, 24, 16)  # how many distance codes of 1..8 bits


class Truncated(Exception):
    """The input ended before the end marker."""


def v2_code_lengths(header: bytes) -> tuple[int, ...]:
    """How many distance codes have 1..8 bits, from a 2.x header's bytes 2-4."""
    word = int.from_bytes(header[2:4], "little")
    if word & 0x8000 or header[4] & 0xC0:
        raise DecodeError("freeze 2.x header: unknown distance table format")
    counts = [word & 1, word >> 1 & 3, word >> 3 & 7, word >> 6 & 15, word >> 10 & 31,
              header[4]]
    left = 62 - sum(counts)  # codes of 7 and 8 bits: seven + eight == left
    room = 256 - sum(n << (8 - length) for length, n in enumerate(counts, 1))
    seven, eight = room - left, 2 * left - room  # ... and 2 * seven + eight == room
    if left < 0 or seven < 0 or eight < 0:
        raise DecodeError("freeze 2.x header: distance code lengths do not add up")
    return (*counts, seven, eight)


def distance_table(lengths: tuple[int, ...], low_bits: int) -> tuple[list[int], list[int]]:
    """For each value of the next 8 bits: the distance bits they give (the
    code's value, then the bits after the code, as the top of the low bits)
    and how many more low bits follow. Canonical: shorter codes first, in
    value order; `lengths` must fill the 8-bit space exactly."""
    base, more = [], []
    value = 0
    for length, count in enumerate(lengths, 1):
        extra = low_bits - (8 - length)  # low bits not in the 8-bit peek
        if count and extra < 0:
            raise DecodeError(f"freeze: a {length}-bit distance code is too short")
        for _ in range(count):
            for peek in range(len(base), len(base) + (1 << (8 - length))):
                top = (peek << extra) & ((1 << low_bits) - 1)
                base.append(value << low_bits | top)
                more.append(extra)
            value += 1
    if len(base) != 256:
        raise DecodeError("freeze: the distance code does not fill 8 bits")
    return base, more


class Melter:
    """One freeze stream: `run()` feeds it input pieces and hands its output
    to `write` in chunks; `tick` is called between pieces (the clock)."""

    def __init__(self, version: Version, code_lengths: tuple[int, ...],
                 write: Callable[[bytes], None], tick: Callable[[], None]):
        self.version = version
        self.base, self.more = distance_table(code_lengths, version.low_bits)
        self.write = write
        self.tick = tick
        self.output = 0  # bytes handed to `write`
        self.trailing = False  # non-zero input after the end marker's byte
        self._start_tree(version.symbols)

    # -- the adaptive Huffman tree --------------------------------------------
    # Nodes 0..T-1 in rising count order, the root last (T-1); child[i] is a
    # node's first child (the second is child[i] + 1) or, at or above T, the
    # symbol child[i] - T of a leaf. parent[] has an entry for every node and
    # one for every leaf (at T + symbol); the root's is 0, never a parent.

    def _start_tree(self, symbols: int) -> None:
        nodes = self.nodes = 2 * symbols - 1
        self.freq = [1] * symbols + [0] * (symbols - 1) + [SENTINEL]
        self.child = list(range(nodes, nodes + symbols)) + [0] * (symbols - 1)
        self.parent = [0] * (nodes + symbols)
        for leaf in range(symbols):
            self.parent[nodes + leaf] = leaf
        for n, node in enumerate(range(symbols, nodes)):  # pairs of nodes, bottom up
            first = 2 * n
            self.freq[node] = self.freq[first] + self.freq[first + 1]
            self.child[node] = first
            self.parent[first] = self.parent[first + 1] = node

    def _rebuild(self) -> None:
        """Halve the leaves' counts and build the tree again, in place."""
        nodes = self.nodes
        freq, child, parent = self.freq, self.child, self.parent
        leaves = [i for i in range(nodes) if child[i] >= nodes]
        counts = [(freq[i] + 1) // 2 for i in leaves]
        links = [child[i] for i in leaves]
        for first in range(0, nodes - 1, 2):  # pair the two lowest not yet paired
            total = counts[first] + counts[first + 1]
            at = bisect_right(counts, total)  # after every equal count
            counts.insert(at, total)
            links.insert(at, first)
        freq[:nodes] = counts
        child[:nodes] = links
        for node in range(nodes):
            link = child[node]
            if link >= nodes:
                parent[link] = node
            else:
                parent[link] = parent[link + 1] = node
        parent[nodes - 1] = 0

    # -- decoding -------------------------------------------------------------

    def run(self, pieces: Iterator[bytes]) -> None:
        """Decode to the end marker; Truncated when the input ends first."""
        nodes = self.nodes
        root = nodes - 1
        freq, child, parent = self.freq, self.child, self.parent
        base, more_bits = self.base, self.more
        peek8, values = VALUE[8], VALUE
        update_bound = range(nodes)
        window = self.version.window
        out = bytearray(b" " * window)  # the window, then what is not yet written
        bits, pos, limit = b"", 0, -1
        consumed = 0  # input bits before bits[0]
        ended = False
        try:
            while True:  # each pass takes a piece of input or at least one bit
                if pos >= limit:  # never once the input has ended: limit is then past it
                    piece = next(pieces, None)
                    consumed += pos
                    if piece is None:
                        ended = True
                        bits, pos, limit = bits[pos:], 0, 1 << 62  # to the last bit
                    else:
                        bits = bits[pos:] + as_bits(piece)
                        pos, limit = 0, len(bits) - MARGIN
                    if len(out) - window >= CHUNK:
                        self._flush(out, window)
                    self.tick()
                    continue
                # a symbol: down from the root, one bit a level
                node = child[root]
                while node < nodes:
                    node = child[node + bits[pos]]
                    pos += 1
                symbol = node - nodes
                # count it: up from its leaf, moving nodes to keep counts in order
                if freq[root] >= MAX_FREQ:
                    self._rebuild()
                node = parent[node]
                for _ in update_bound:
                    count = freq[node] + 1
                    if count > freq[node + 1]:
                        other = bisect_left(freq, count, node + 2) - 1  # the last lower one
                        freq[node] = freq[other]
                        freq[other] = count
                        mine, theirs = child[node], child[other]
                        parent[mine] = other
                        if mine < nodes:
                            parent[mine + 1] = other
                        parent[theirs] = node
                        if theirs < nodes:
                            parent[theirs + 1] = node
                        child[other], child[node] = mine, theirs
                        node = other
                    else:
                        freq[node] = count
                    node = parent[node]
                    if not node:
                        break
                else:
                    raise DecodeError("freeze: Huffman tree corrupt")
                if symbol < END:
                    out.append(symbol)
                    continue
                if symbol == END:
                    break
                peek = peek8[bits[pos:pos + 8]]
                more = more_bits[peek]
                pos += 8
                distance = base[peek] | values[more][bits[pos:pos + more]]
                pos += more
                length = symbol - END + MIN_MATCH - 1
                start = len(out) - distance - 1
                if distance >= length:
                    out += out[start:start + length]
                else:  # overlaps what it makes: the repeating pattern
                    pattern = out[start:]
                    out += (pattern * (length // len(pattern) + 1))[:length]
        except (IndexError, KeyError):  # a bit or a run of bits past the end
            if not ended:
                raise DecodeError("freeze: decoder state corrupt") from None
            raise Truncated("cut short inside a code") from None
        finally:
            self._flush(out, window)
        end = (consumed + pos + 7) // 8 * 8 - consumed  # the rest of its byte is padding
        self.trailing = bits.find(1, end) >= 0 or any(p.strip(b"\0") for p in pieces)

    def _flush(self, out: bytearray, window: int) -> None:
        if len(out) > window:
            data = bytes(out[window:])
            del out[:len(out) - window]
            self.output += len(data)
            self.write(data)


def pieces_of(chunks: Iterable[bytes], skip: int) -> Iterator[bytes]:
    """The input after its first `skip` bytes, in PIECE-sized pieces."""
    for chunk in chunks:
        if skip:
            drop = min(skip, len(chunk))
            chunk, skip = chunk[drop:], skip - drop
        for at in range(0, len(chunk), PIECE):
            yield bytes(chunk[at:at + PIECE])


@register("freeze")
def decode_freeze(part: Part, ctx: Context) -> None:
    """One child, the melted stream. Cut short: the part and the child are
    flagged truncated; bytes after the end marker: DecodeError; corrupt (a
    bad 2.x header, a code that does not decode): Undecipherable, the rest
    is content nobody here produces; what was decoded is kept, and scanned."""
    head = part.head(5)
    version = VERSIONS.get(head[:2])
    if version is None:
        raise DecodeError("not a freeze stream")
    if len(head) < version.header:
        part.flags.add("truncated")
        return
    try:
        lengths = V1_CODE_LENGTHS if version is V1 else v2_code_lengths(head)
    except DecodeError as err:
        raise Undecipherable(str(err)) from None
    sink = ctx.sink(part, name=inner_name(part, (".f",)))
    part.flags.add("expanded")
    melter = Melter(version, lengths, sink.write, ctx.budget.check_time)
    try:
        melter.run(pieces_of(part.chunks(), version.header))
    except LimitExceeded:
        sink.finish(truncated=True)
        raise
    except Truncated:
        sink.finish(truncated=True)
        part.flags.add("truncated")
        return
    except DecodeError as err:
        sink.finish(truncated=True)
        raise Undecipherable(str(err)) from None
    sink.finish()
    if melter.trailing:
        raise DecodeError(f"{version.name}: data after the end of the stream")
