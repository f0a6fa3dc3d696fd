"""What every ingress protocol is: a sans-IO session, and the handler it calls.

A session turns the bytes of one client connection into calls on its
handler (the worker), and the handler's answers into bytes. It never reads,
writes or closes the socket: waiting for bytes, deadlines, the number of
requests a connection may make, and sending are the business of the one
blocking loop that drives every protocol (`protocol.loop`). So a new
ingress (SMTP, LMTP) is a new module with a `Session` subclass and one row
in `protocol.registry`, testable by feeding it bytes, with no edit of the
worker or the master.

A session is built with `(conn, handler)`, in the manner of aiosmtpd's
`SMTP(handler)`: the connection only so it can learn who is at the other end
(peer credentials over a Unix socket, none over TCP), the handler for all
it needs from the daemon, through named methods (`handle_message`,
`handle_release`, ...) and the settings in `handler.config`.
"""

from __future__ import annotations

import abc
import logging
import socket
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from amavisd.config import Config
    from amavisd.envelope import Job
    from amavisd.protocol.loop import ConnectionLimits
    from amavisd.quarantine.release import ReleaseOutcome, ReleaseRequest
    from amavisd.verdict import Result


class Handler(Protocol):
    """What a session may ask of the process serving it (amavisd.worker.Worker)."""

    config: Config  # the daemon's settings: temp base, work base, limits

    def next_log_id(self) -> str:
        """A fresh log id (`<pid>-<nn>`) for the request being answered."""
        ...

    def handle_message(self, job: Job) -> Result:
        """Run one message through the pipeline; never raises (a bug is a tempfail)."""
        ...

    def handle_release(self, request: ReleaseRequest, recipients: list[str],
                       log_id: str) -> ReleaseOutcome:
        """Release (or requeue) a quarantined message."""
        ...

    def ensure_dirs(self) -> None:
        """Re-create a missing temp base or work base (and check both)."""
        ...

    def handle_reply_sent(self) -> None:
        """The reply went out: work that must not delay it (notifications)."""
        ...

    def keep_going(self) -> bool:
        """False when the worker is leaving: end the connection after this reply."""
        ...


class Session(abc.ABC):
    """The server side of one connection for one protocol: bytes in, bytes out.

    The loop feeds `receive()` until `request_ready()`, sends what `answer()`
    returns, and repeats. While `mid_request()` the bytes of a request are
    arriving and `request_timeout` runs; otherwise the client is idle.
    """

    label: ClassVar[str] = "client"  # names the protocol in log lines ("AM.PDP")
    log: ClassVar[logging.Logger] = logging.getLogger("amavisd")
    max_request_bytes: ClassVar[int] = 4 * 1024 * 1024  # buffered without a complete request

    def __init__(self, conn: socket.socket, handler: Handler) -> None:
        self.conn = conn  # for who is at the other end only: never read, written or closed here
        self.handler = handler
        self.closing = False  # the protocol ends the connection after the reply (QUIT)

    def greeting(self) -> bytes:
        """What the server says first (SMTP's 220); nothing by default."""
        return b""

    def connection_limits(self, limits: ConnectionLimits) -> ConnectionLimits:
        """The limits for the next request, given the daemon's (`client_idle_timeout`,
        `request_timeout`, ...). A protocol with settings of its own returns
        them here; asked before each request, so they may follow its state
        (SMTP: a command, or a whole DATA)."""
        return limits

    @abc.abstractmethod
    def receive(self, data: bytes) -> None:
        """Bytes from the client (never empty: EOF is the loop's business)."""

    @abc.abstractmethod
    def request_ready(self) -> bool:
        """A complete request is waiting for `answer()`."""

    @abc.abstractmethod
    def mid_request(self) -> bool:
        """Part of a request has arrived and the rest has not."""

    @abc.abstractmethod
    def answer(self) -> bytes:
        """The reply to the oldest complete request. Never raises: whatever goes
        wrong, the client hears a temporary failure, not a dropped connection."""

    def oversize(self) -> bytes:
        """The reply to a request past `max_request_bytes`; the connection then ends."""
        return b""

    def last_words(self, reason: str) -> bytes:
        """Called from a worker about to die: the reply to the request being
        answered, if any (a temporary failure giving `reason`)."""
        return b""

    def after_reply(self) -> None:  # noqa: B027 (optional hook)
        """The last answer went out (or could not): tidy what its request left,
        off the client's wait (AM.PDP removes the tempdir here)."""

    def finish(self) -> None:  # noqa: B027 (optional hook: most protocols have nothing to add)
        """The connection is over (summary log lines)."""
