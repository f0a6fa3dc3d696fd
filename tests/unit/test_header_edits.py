"""Our header edits on mail the daemon forwards itself (amavisd.actions.edits)."""

from __future__ import annotations

import io

from amavisd.actions.edits import MAX_HEADER, edit_bytes, edit_spool, milter_edits
from amavisd.policy.destinies import Destiny
from amavisd.protocol.ampdp import encode_reply
from amavisd.verdict import HeaderEdit
from amavisd_client.edits import header_edits
from amavisd_client.wire.ampdp import Decoder

EDITS = [HeaderEdit("add", "X-Added", "a"), HeaderEdit("insert", "X-Virus-Scanned", "s", 0),
         HeaderEdit("delete", "X-Old", index=1), HeaderEdit("change", "Subject", "new", 1)]
MESSAGE = b"Subject: old\r\nX-Old: gone\r\nFrom: a@example.test\r\n\r\nbody\r\nX-Old: body\r\n"


def test_milter_order_and_words_are_those_of_the_ampdp_reply():
    wire = milter_edits(EDITS)
    assert [verb for verb, _ in wire] == ["delheader", "chgheader", "insheader", "addheader"]
    [block] = Decoder().feed(encode_reply("1-01", Destiny.PASS, "CLEAN", EDITS))
    assert header_edits(block) == wire  # what a client reads from our AM.PDP reply


def test_bytes_and_spool_give_the_same_message():
    expected = (b"X-Virus-Scanned: s\r\nSubject: new\r\nFrom: a@example.test\r\nX-Added: a\r\n"
                b"\r\nbody\r\nX-Old: body\r\n")
    assert edit_bytes(MESSAGE, EDITS) == expected
    assert edit_spool(io.BytesIO(MESSAGE), len(MESSAGE), EDITS).read() == expected
    spool = io.BytesIO(MESSAGE)
    assert edit_spool(spool, len(MESSAGE), []) is spool and spool.tell() == 0


def test_a_header_longer_than_what_is_read_is_never_cut_mid_line():
    line = b"X-Pad: " + b"p" * 70 + b"\r\n"
    message = b"Subject: s\r\n" + line * (MAX_HEADER // len(line) + 50) + b"\r\nbody\r\n"
    out = edit_spool(io.BytesIO(message), len(message), EDITS[1:2]).read()
    assert out == b"X-Virus-Scanned: s\r\n" + message
