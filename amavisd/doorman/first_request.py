"""Where a client's first request ends: all the doorman knows of protocols.

Why a module: the doorman never parses, but it holds a connection until its
first request is whole, so it must tell where one ends, twice: on a peek
(one look at everything so far, into a reused buffer) and on bytes read in
chunks past the peek window (`reading`). A protocol whose clients wait for
our greeting (SMTP, LMTP) has no row: its connections are passed at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from amavisd.listeners import AMPDP
from amavisd.protocol import registry


def ampdp_request_complete(data: bytes | bytearray, end: int | None = None) -> bool:
    """An AM.PDP block ends with an empty line (CR LF or LF); empty lines
    before the first attribute do not count (amavisd_client.wire.ampdp).
    `end`: only data[:end] counts (the doorman peeks into one reused buffer)."""
    end = len(data) if end is None else end
    start = 0
    while start < end and data[start] in b"\r\n":
        start += 1
    return data.find(b"\n\n", start, end) >= 0 or data.find(b"\n\r\n", start, end) >= 0


class AmpdpEnd:
    """The same test over a request read in chunks: the last two bytes of
    what came before are enough context (the end is at most 3 bytes long)."""

    __slots__ = ("started", "tail")

    def __init__(self) -> None:
        self.started = False  # an attribute byte came: empty lines count from now
        self.tail = b""

    def feed(self, chunk: bytes | memoryview) -> bool:
        """True once the request is whole (with `chunk`)."""
        data = self.tail + bytes(chunk)
        if not self.started:
            data = data.lstrip(b"\r\n")
            self.started = bool(data)
        self.tail = data[-2:]
        return self.started and (b"\n\n" in data or b"\n\r\n" in data)


@dataclass(frozen=True)
class FirstRequest:
    """A protocol whose clients speak first: how its first request ends."""

    complete: Callable[[bytes | bytearray, int | None], bool]  # on a peek
    end: type[AmpdpEnd]  # a fresh one for each request read in chunks
    tag: str  # of the protocol: its session class says how big a request may be

    @property
    def max_bytes(self) -> int:
        """Past this without an end, the request is passed on as read: the
        worker's session refuses it as too large (the doorman never answers)."""
        return registry.session_class(self.tag).max_request_bytes


FIRST_REQUEST = {AMPDP: FirstRequest(ampdp_request_complete, AmpdpEnd, AMPDP)}
