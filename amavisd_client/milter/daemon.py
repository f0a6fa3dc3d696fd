"""One question to the daemon about one spooled message, run in a worker thread.

The AM.PDP exchange is the client's own (`amavisd_client.connection`): one
connection a message, closed after the verdict, because an idle connection
would hold one of the daemon's workers. It blocks, so the server runs
`DaemonCall.run` in a thread and keeps the event loop (progress packets,
other MTA connections) going; `abort()` from the loop shuts the socket down
when the server stops waiting (daemon_timeout), so the thread ends at once.

The spool belongs to the call: it is checked before the request and after
the verdict (the verdict must be about the bytes we wrote), and removed
when the call ends, whatever happened, and only then: the daemon may still
be reading it while the loop has long answered the MTA.
"""

from __future__ import annotations

import _socket
import threading

from amavisd_client.connection import ClientError, Connection
from amavisd_client.milter.state import Ask
from amavisd_client.spool import SpoolError
from amavisd_client.wire.address import Address
from amavisd_client.wire.ampdp import Block


class DaemonCall:
    def __init__(self, address: Address, timeout: float, question: Ask):
        self.address = address
        self.timeout = timeout
        self.question = question
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._aborted = False
        self.started = False

    def run(self) -> Block:
        """The daemon's reply; ClientError or SpoolError when there is none to trust."""
        sink = self.question.sink
        self.started = True
        try:
            with self._lock:
                if self._aborted:
                    raise ClientError("given up before asking")
                conn = self._conn = Connection(self.address, self.timeout)
            verify = getattr(sink, "verify", None)
            if verify is not None:
                verify()
            conn.open()
            with self._lock:  # an abort() during connect() found no socket to shut
                if self._aborted:
                    raise ClientError("given up while connecting")
            reply = conn.request(self.question.attrs)
            if verify is not None:
                verify()
            return reply
        finally:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            sink.discard()

    def abort(self) -> None:
        """From the event loop: stop waiting for the daemon (the thread's recv
        returns, its request fails, its spool is removed)."""
        with self._lock:
            self._aborted = True
            sock = self._conn.sock if self._conn is not None else None
            if sock is not None:
                try:
                    sock.shutdown(_socket.SHUT_RDWR)
                except OSError:
                    pass


FAILURES = (ClientError, SpoolError)
