"""One question to the daemon about one spooled message, on the event loop.

Why not a thread: a thread a question cost the milter more than the question
itself. Every blocking call in the thread let the loop take the GIL and the
thread then waited to get it back: strace counted ~80-110 futex calls a
message through Postfix. Here the AM.PDP exchange is the wire codec
(`amavisd_client.wire.ampdp`, sans-IO) over a non-blocking socket, and the
spool's few system calls (make, verify, remove: spool.py) run on the loop,
a local file system's tens of microseconds.

One connection a message, closed after the verdict: an idle connection
would hold one of the daemon's workers. The caller bounds the wait
(daemon_timeout) by cancelling; cancelled or not, `run` closes the socket
and removes the spool before it returns, and only then: the daemon reads
the spool until it has answered, or until we hung up on it.

The spool belongs to the call: made here (the loop only held its first
bytes), checked before the request and after the verdict (the verdict must
be about the bytes we wrote), then released to the pool if the daemon
answered (spool.py), else removed.
"""

from __future__ import annotations

import asyncio
import socket

from amavisd_client.connection import ClientError
from amavisd_client.milter.state import Ask
from amavisd_client.spool import SpoolError
from amavisd_client.wire.address import Address
from amavisd_client.wire.ampdp import Block, Decoder, encode_block

READ_SIZE = 65536
BACKLOG_RETRY = 0.01  # seconds between connects while the daemon's backlog is full
FAILURES = (ClientError, SpoolError)


class DaemonCall:
    def __init__(self, address: Address, question: Ask):
        self.address = address
        self.question = question

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
        loop = asyncio.get_running_loop()
        sock = await self._connect(loop)
        try:
            await loop.sock_sendall(sock, encode_block(self.question.attrs))
            decoder = Decoder()
            while True:
                data = await loop.sock_recv(sock, READ_SIZE)
                if not data:
                    raise ClientError("amavisd closed the connection without a verdict")
                blocks = decoder.feed(data)
                if blocks:
                    return blocks[0]
        except OSError as err:
            raise ClientError(f"amavisd connection failed: {err}") from None
        finally:
            sock.close()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        where = self.address
        family = (socket.AF_INET6 if where.is_ipv6 else socket.AF_INET) if where.is_tcp \
            else socket.AF_UNIX
        while True:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as err:
                raise ClientError(f"cannot connect to amavisd at {where}: {err}") from None
            try:
                sock.setblocking(False)
                if family != socket.AF_UNIX:
                    await loop.sock_connect(sock, where.target)
                    return sock
                sock.connect(where.target)  # a Unix socket connects at once, or:
                return sock
            except BlockingIOError:  # EAGAIN, its backlog is full: try again shortly
                sock.close()  # (a blocking client failed here; the caller's timeout bounds us)
            except (OSError, ValueError) as err:
                sock.close()
                raise ClientError(f"cannot connect to amavisd at {where}: {err}") from None
            except BaseException:
                sock.close()
                raise
            await asyncio.sleep(BACKLOG_RETRY)
