"""Mail we forward ourselves carries our header edits and is otherwise the
bytes we scanned: one implementation (amavisd.actions.edits, on top of
amavisd_client.edits) for the SMTP filter and AM.PDP delivery_care_of=server.
"""

from __future__ import annotations

import pytest

from tests.integration.test_smtp_filter import start_filter, transaction
from tests.rigs.nexthop import NextHop
from tests.rigs.smtpsink import SMTPSink
from tests.rigs.smtptalk import crlf

pytestmark = pytest.mark.integration


def huge_header(size: int) -> bytes:
    """A header block of about `size` bytes, lines of 80, a body after it."""
    lines = [b"From: a@example.test", b"To: b@example.test", b"Subject: long header"]
    lines += [b"X-Pad-%06d: " % n + b"p" * 64 for n in range(size // 80)]
    return crlf(b"\n".join(lines) + b"\n\nthe body\n")


@pytest.mark.parametrize("size", [4096, 1024 * 1024 + 4000], ids=["small", "over-1MiB"])
def test_the_smtp_filter_forwards_the_message_with_our_header_on_top_and_nothing_else_changed(
        short_tmp, clamd_nodecomp, size):
    """A header block longer than the part our edits are applied to (1 MiB)
    was cut mid-line there and a line end put in: the rest of the header
    went on as body, not the structure we scanned."""
    message = huge_header(size)
    with NextHop() as hop, SMTPSink() as notices:
        flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices)
        try:
            with flt.talk() as talk:
                replies = transaction(talk, "a@example.test", ["b@example.test"], message)
                assert replies[-1][0] == 354
                assert talk.reply()[0] == 250
            [forwarded] = hop.wait(1)
        finally:
            flt.daemon.stop()
    first, rest = forwarded.data.split(b"\r\n", 1)
    assert first.startswith(b"X-Virus-Scanned: by amavisd")
    assert rest == message
