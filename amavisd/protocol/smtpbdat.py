"""BDAT (RFC 3030, CHUNKING) for the SMTP/LMTP session: a mixin of
`smtp.SMTPSession`, which owns the transaction, the spool and the answers.

BDAT writes to the same spool as DATA, so the filter sees no difference:
each chunk's octets are read raw, a chunk answered once all its octets are
in, `BDAT n LAST` answered as the final "." is. Whatever refuses a chunk (no
MAIL, no recipient, past max_message_size) still reads its octets, or the
next command would be read from the middle of a message; a count we cannot
parse leaves nothing to frame by, so we hang up. The whole BDAT sequence is
one request for the loop's clock (`smtp_data_timeout` from the first
chunk), and the answers to chunks mid-message do not count against
`max_connection_requests`, or a message in many chunks would be cut off at
the hundredth.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from amavisd.protocol.smtpcodec import ChunkReader, SyntaxProblem, parse_bdat, reply

if TYPE_CHECKING:
    from amavisd.protocol.smtpfilter import Transaction


@dataclasses.dataclass
class Chunked:
    """A transaction sent by BDAT: where its octets go, how many so far, since when."""

    sink: Callable[[bytes], object]
    since: float  # time.monotonic() of its first BDAT: smtp_data_timeout runs from here
    size: int = 0
    chunks: int = 0


def _discard(data: bytes) -> None:
    """Where a refused chunk's octets go: read, to stay in step, and dropped."""


class Chunking:
    """The BDAT verb and its chunks' octets; the session's state it uses is
    declared here, set in `SMTPSession.__init__`."""

    transaction: Transaction | None
    chunked: Chunked | None  # the transaction came by BDAT so far
    chunk: ChunkReader | None  # a BDAT chunk whose octets are being read
    chunk_last: bool
    chunk_refusal: bytes | None  # decided at its BDAT line, said after its octets
    chunk_since: float
    inbox: bytearray
    closing: bool
    lmtp: bool

    def read_chunk(self, out: list[bytes]) -> bool:
        """The buffered bytes into the chunk being read; once all its octets
        are in, its answer to `out`. False when the caller must stop for now:
        octets still coming, or the message's answer given (one a call)."""
        assert self.chunk is not None
        rest = self.chunk.feed(bytes(self.inbox))
        self.inbox.clear()
        if rest is None:
            return False  # its octets are still coming
        self.inbox += rest
        message = self.chunk_last and self.chunk_refusal is None
        out.append(self.end_of_chunk())
        return not message  # one message an answer: its notices go out after its reply

    def smtp_BDAT(self, argument: str) -> bytes:
        """A chunk's header: its octets are read next (`read_chunk`), and
        answered once all are in (`end_of_chunk`), refused or not."""
        try:
            size, last = parse_bdat(argument)
        except SyntaxProblem:
            self.closing = True  # nothing tells its octets from the next command now
            self.drop_transaction()
            return reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
        refusal = self.chunk_refused(size, last)
        if self.closing:  # too many errors: nothing more is read
            return refusal or b""
        sink = self.chunked.sink if refusal is None and self.chunked is not None else _discard
        self.chunk, self.chunk_last, self.chunk_refusal = ChunkReader(size, sink), last, refusal
        self.chunk_since = time.monotonic()
        return b""

    def chunk_refused(self, size: int, last: bool) -> bytes | None:
        """Why this chunk's octets go nowhere, or None: they join the spool.
        A refusal ends the transaction (RFC 3030: the client sends no more)."""
        transaction = self.transaction
        if transaction is None:
            return self.error(503, "5.5.1", "Error: need MAIL command")
        if not transaction.recipients:
            self.drop_transaction()
            return self.error(503, "5.5.1", "Error: no valid recipients")
        # the final answer is one a recipient with LMTP, as after DATA
        count = len(transaction.recipients) if self.lmtp and last else 1
        if self.chunked is None:
            sink = self.open_spool()
            if sink is None:
                return reply(451, "4.3.0", "Error: temporary local problem, try again later") \
                    * count
            self.chunked = Chunked(sink, time.monotonic())
        self.chunked.size += size
        self.chunked.chunks += 1
        if self.chunked.size > self.config.max_message_size:
            self.log.info("%s message over max_message_size (%d bytes by BDAT): refused",
                          self.label, self.chunked.size)
            self.drop_transaction()
            return reply(552, "5.3.4", "Error: message file too big") * count
        return None

    def end_of_chunk(self) -> bytes:
        """All of a chunk's octets are in: its refusal, its 250, or with LAST
        the message's answer."""
        chunk, refusal = self.chunk, self.chunk_refusal
        assert chunk is not None
        self.chunk, self.chunk_refusal = None, None
        if refusal is not None:
            return refusal
        assert self.transaction is not None and self.chunked is not None
        if self.chunk_last:
            self.log.info("%s message of %d octets in %d BDAT chunk(s)", self.label,
                          self.chunked.size, self.chunked.chunks)
            return self.end_of_message(self.chunked.size, oversized=False)
        if self.transaction.spool_error is not None:  # disk full: no use reading on
            self.log.error("%s cannot spool a message: %s", self.label,
                           self.transaction.spool_error)
            self.drop_transaction()
            return reply(451, "4.3.0", "Error: temporary local problem, try again later")
        return reply(250, "2.0.0", f"{chunk.size} octets received")
