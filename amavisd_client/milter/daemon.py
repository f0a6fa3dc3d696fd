"""One question to the daemon about one spooled message, on the event loop.

Why not a thread: a thread a question cost the milter more than the question
itself. Every blocking call in the thread let the loop take the GIL and the
thread then waited to get it back: strace counted ~80-110 futex calls a
message through Postfix. Here the AM.PDP exchange is the wire codec
(`amavisd_client.wire.ampdp`, sans-IO) over a non-blocking socket, and the
spool's few system calls (make, verify, remove: spool.py) run on the loop,
a local file system's tens of microseconds.

The connection comes from the milter's pool (links.py) and goes back to it
only after a whole reply with nothing unread after it. The caller bounds
the wait (daemon_timeout) by cancelling; a question that did not get its
whole reply closes its connection, and `run` removes the spool before it
returns, and only then: the daemon reads the spool until it has answered,
or until we hung up on it.

The spool belongs to the call: made here (the loop only held its first
bytes), checked before the request and after the verdict (the verdict must
be about the bytes we wrote), then released to the pool if the daemon
answered (spool.py), else removed.
"""

from __future__ import annotations

import asyncio

from amavisd_client.connection import ClientError, Unanswered, asks_back
from amavisd_client.milter.links import DaemonLinks, Link
from amavisd_client.milter.state import Ask
from amavisd_client.spool import SpoolError
from amavisd_client.wire.ampdp import Block, Decoder

READ_SIZE = 65536
FAILURES = (ClientError, SpoolError)


class DaemonCall:
    def __init__(self, links: DaemonLinks, question: Ask,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.links = links
        self.question = question
        self.loop = loop  # the running loop (asked for when not given)

    async def run(self) -> Block:
        """The daemon's reply; ClientError or SpoolError when there is none to trust."""
        sink = self.question.sink
        try:
            make = getattr(sink, "open", None)
            if make is not None:
                make()
            verify = getattr(sink, "verify", None)
            if verify is not None:
                verify()
            reply = await self._exchange()
            if verify is not None:
                verify()
        except BaseException:
            sink.discard()  # the daemon may still read it: never reused
            raise
        getattr(sink, "release", sink.discard)()  # answered: the spool may serve again
        return reply

    async def _exchange(self) -> Block:
        """Asked once more, on a new connection, only when a kept one (it
        carried a whole reply before) was reset before any byte of this
        reply: its worker gave it away or retired with our request unread.
        Milter questions are checks whose verdict comes back to us
        (delivery_care_of=client): asking twice costs a second scan, never a
        second delivery. A plain end of file is a worker that read the
        request and died on it, and a timeout is a timeout: never again."""
        link = await self.links.take()
        try:
            return await self._ask(link)
        except Unanswered as err:
            if not (link.carried and asks_back(self.question.attrs)):
                raise ClientError(str(err)) from None
        self.links.retried += 1
        return await self._ask(await self.links.take(new=True))

    async def _ask(self, link: Link) -> Block:
        loop = self.loop or asyncio.get_running_loop()
        answered = False  # any byte of the reply yet
        try:
            await loop.sock_sendall(link.sock, self.question.encoded())
            decoder = Decoder()
            while True:
                data = await loop.sock_recv(link.sock, READ_SIZE)
                if not data:
                    raise ClientError("amavisd closed the connection without a verdict")
                answered = True
                blocks = decoder.feed(data)
                if blocks:
                    break
        except (ConnectionResetError, BrokenPipeError) as err:
            self.links.drop(link)
            raise (ClientError if answered else Unanswered)(
                f"amavisd connection failed: {err}") from None
        except OSError as err:
            self.links.drop(link)
            raise ClientError(f"amavisd connection failed: {err}") from None
        except BaseException:  # a bad reply, or cancelled (daemon_timeout, stop)
            self.links.drop(link)
            raise
        if len(blocks) == 1 and not decoder.pending:
            self.links.give(link)  # nothing unread after the reply: it may serve again
        else:
            self.links.drop(link)
        return blocks[0]
