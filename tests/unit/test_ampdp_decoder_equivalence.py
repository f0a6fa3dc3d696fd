"""The AM.PDP decoder that takes a read's lines in one pass behaves, feed by
feed, exactly as the line-at-a-time one it replaced (kept here as the
reference): the same blocks, pairs, errors and state after every feed, for
random and hostile streams cut at random points. And a request's attributes
read with `Block.firsts` are those `Block.get` gives."""

from __future__ import annotations

import random

from amavisd_client.wire.ampdp import Block, Decoder, decode


class LineAtATime:
    """The decoder before the one-pass rewrite (62c6564^), the reference."""

    def __init__(self, max_line: int, max_attributes: int):
        self.max_line, self.max_attributes = max_line, max_attributes
        self.buffer, self.skipping, self.block = bytearray(), False, Block()

    def feed(self, data: bytes) -> list[Block]:
        self.buffer += data
        blocks = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > self.max_line:
                    if not self.skipping:
                        self.block.add_error(f"line longer than {self.max_line} bytes")
                    self.skipping = True
                    del self.buffer[:]
                return blocks
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            if self.skipping:
                self.skipping = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_line:
                self.block.add_error(f"line longer than {self.max_line} bytes")
                continue
            if not line:
                if self.block.pairs or self.block.errors:
                    blocks.append(self.block)
                    self.block = Block()
                continue
            self.add_line(line)

    def add_line(self, line: bytes) -> None:
        name_raw, sep, value_raw = line.partition(b"=")
        if not sep:
            self.block.add_error(f"malformed line (no '='): {line[:60]!r}")
            return
        name = decode(name_raw)
        if not name:
            self.block.add_error("empty attribute name")
            return
        if len(self.block.pairs) >= self.max_attributes:
            if not any(t.startswith("too many attributes") for t in self.block.errors):
                self.block.add_error(f"too many attributes (> {self.max_attributes})")
            return
        self.block.pairs.append((name, value_raw))


ATOMS = [b"\r\n", b"\n", b"\r", b"=", b"%", b"%2", b"%25", b"%3D", b"%0D%0A", b"%zz", b"a",
         b"request", b"AM.PDP", b"recipient", b" ", b"\x00", b"\xff", b"\xc3\xa9", b"\n\n",
         b"\r\n\r\n", b"name=", b"=v", b"=", b"%=x", b"xxxxxxx"]


def hostile_stream(rng: random.Random, max_line: int) -> bytes:
    out = bytearray()
    for _ in range(rng.randrange(60)):
        roll = rng.random()
        if roll < 0.08:  # a line at, around and far past max_line
            size = max_line + rng.choice([-2, -1, 0, 1, 2, 3, 10, max_line])
            out += bytes(rng.choice(b"ab=%\r") for _ in range(max(0, size)))
        elif roll < 0.12:
            out += rng.randbytes(rng.randrange(8))
        else:
            out += rng.choice(ATOMS)
    return bytes(out)


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    points = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randrange(8))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def state(blocks: list[Block]) -> list[tuple]:
    return [(b.pairs, b.errors, b.more_errors) for b in blocks]


def test_the_decoder_is_the_line_at_a_time_one_feed_by_feed():
    rng = random.Random(20261205)
    for _ in range(4000):
        max_line = rng.choice([1, 2, 3, 5, 8, 16, 40])
        max_attributes = rng.choice([0, 1, 2, 3, 5, 1000])
        data = hostile_stream(rng, max_line)
        new, old = Decoder(max_line, max_attributes), LineAtATime(max_line, max_attributes)
        for piece in cut(rng, data):
            assert state(new.feed(piece)) == state(old.feed(piece)), (max_line, data)
            assert bytes(new._buffer) == bytes(old.buffer), data
            assert new._skipping == old.skipping, data
            assert state([new._block]) == state([old.block]), data


def test_every_byte_its_own_feed_and_all_in_one_agree():
    rng = random.Random(7)
    for _ in range(300):
        max_line = rng.choice([3, 8, 16])
        data = hostile_stream(rng, max_line)
        one = Decoder(max_line, 4)
        whole = state(one.feed(data))
        bytewise = Decoder(max_line, 4)
        got = []
        for i in range(len(data)):
            got += state(bytewise.feed(data[i:i + 1]))
        reference = LineAtATime(max_line, 4)
        assert whole == state(reference.feed(data))
        # a line over max_line may be judged at a different byte when it
        # arrives in pieces (the buffer holds its CR), as it always was
        ref_bytewise = LineAtATime(max_line, 4)
        ref = []
        for i in range(len(data)):
            ref += state(ref_bytewise.feed(data[i:i + 1]))
        assert got == ref


def test_firsts_is_get_for_every_name_of_hostile_blocks():
    rng = random.Random(11)
    for _ in range(2000):
        data = hostile_stream(rng, 1000) + b"\r\n\r\n"
        for block in Decoder().feed(data):
            firsts = block.firsts()
            assert set(firsts) == {name for name, _ in block.pairs}
            for name in firsts:
                assert firsts[name] == block.get(name)
            assert firsts.get("no such name") is None


def parse_with_get(block: Block, tempbase: str, log_id: str):
    """parse_message_request before Block.firsts (62c6564^): one get a name."""
    import os

    from amavisd.envelope import Envelope, Job
    from amavisd.protocol.ampdp import CARE_OF, MessageRequest, RequestError, within

    if block.errors:
        raise RequestError("protocol error")
    tempdir_raw, mail_file_raw = block.get("tempdir"), block.get("mail_file")
    if not tempdir_raw and not mail_file_raw:
        raise RequestError("neither")
    tempdir = within(tempdir_raw, tempbase, "tempdir") if tempdir_raw else None
    mail_file = within(mail_file_raw, tempbase, "mail_file") if mail_file_raw else None
    care_of = (block.get("delivery_care_of", "client") or "client").lower()
    if care_of not in CARE_OF:
        raise RequestError("care_of")
    removed_by = block.get("tempdir_removed_by", "server")
    envelope = Envelope(
        sender=block.get("sender", "<>") or "<>", recipients=block.getall("recipient"),
        queue_id=block.get("queue_id", "") or "",
        client_address=block.get("client_address", "") or "",
        client_name=block.get("client_name", "") or "",
        helo_name=block.get("helo_name", "") or "",
        protocol_name=block.get("protocol_name", "") or "",
        policy_bank=block.get("policy_bank", "") or "")
    return MessageRequest(
        job=Job(log_id=log_id, mail_path=mail_file or os.path.join(tempdir, "email.txt"),
                envelope=envelope),
        tempdir=tempdir, remove_tempdir=removed_by == "server" and tempdir is not None,
        mail_file=mail_file, care_of_server=care_of == "server")


def test_a_request_parsed_with_firsts_is_the_one_parsed_with_get(tmp_path):
    from amavisd.protocol.ampdp import RequestError, parse_message_request

    base = str(tmp_path)
    names = ["tempdir", "mail_file", "delivery_care_of", "tempdir_removed_by", "sender",
             "queue_id", "client_address", "client_name", "helo_name", "protocol_name",
             "policy_bank", "recipient", "request"]
    values = ["", "%00", "x", f"{base}/d", f"{base}/d/email.txt", "/etc/passwd", f"{base}/../x",
              "SERVER", "Client", "server", "client", "bogus", "<a@b>", "%0d%0a", "a%20b",
              "\xff".encode("latin-1").decode("utf-8", "surrogateescape")]
    rng = random.Random(5)
    from amavisd_client.wire.ampdp import encode_block

    parsed = 0
    for _ in range(3000):
        attrs = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(8))]
        if rng.random() < 0.7:  # mostly requests that parse, so their fields are compared
            attrs.insert(rng.randrange(len(attrs) + 1),
                         (rng.choice(["tempdir", "mail_file"]), f"{base}/d"))
        (block,) = Decoder().feed(encode_block([("request", "AM.PDP"), *attrs]))
        try:
            want = parse_with_get(block, base, "1-01")
        except RequestError:
            want = RequestError
        try:
            got = parse_message_request(block, base, "1-01")
        except RequestError:
            got = RequestError
        assert got == want, attrs
        parsed += got is not RequestError
    assert parsed > 1000
