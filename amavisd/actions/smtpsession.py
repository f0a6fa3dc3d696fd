"""Connections to the next hop: smtplib's client over TCP or a Unix socket,
and the sessions a worker keeps open between messages.

A kept session may have died while it waited (the hop's idle timeout, a
restart). Before it carries a message it must answer RSET: at once when the
hop does not pipeline, or as the first command of the message's pipelined
group (`HopClient.unproven`), so the check costs no round trip of its own.
Either way nothing of the message is accepted on a dead session: the
content is sent only after every reply of the group was read. A kept
session with unread bytes (a hop that said more than it was asked) is
dropped, never reused: each reply must answer its own command. A stray line
that comes after this check is caught by the shape of the replies
(smtpout's `in_step`): then the message goes again on a fresh session.
"""

from __future__ import annotations

import os
import smtplib
import socket
import time

QUIT_TIMEOUT = 2.0  # QUIT is a courtesy: a hop that hangs must not hold a worker


class HopClient(smtplib.SMTP):
    """smtplib's SMTP, LMTP when asked, over a Unix socket when given a path."""

    unproven = False  # kept, not yet answered RSET: the group must start with one
    in_data = False  # the hop said 354 and has not had the final dot

    def __init__(self, path: str, lmtp: bool, helo: str | None, timeout: float):
        self._path = path
        if lmtp:
            self.ehlo_msg = "lhlo"
        super().__init__(local_hostname=helo, timeout=timeout)

    def _get_socket(self, host, port, timeout):
        if not self._path:
            sock = super()._get_socket(host, port, timeout)
            # commands and the end of DATA are small writes: never held back
            # waiting for the ACK of the one before (Nagle vs delayed ACK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        return sock


    def ack_at_once(self) -> None:
        """While the replies to a pipelined group come in, acknowledge each at
        once: a hop that writes them one by one (Nagle on its side) waits
        for our ACK before the next, and Linux delays that ACK by 40 ms."""
        if not self._path and self.sock is not None and hasattr(socket, "TCP_QUICKACK"):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class IdleSessions:
    """Sessions kept open after a delivery, one a next hop: a worker sends one
    message at a time. Keyed by process too, so a forked child never talks
    on (or quits) a session its parent opened."""

    def __init__(self) -> None:
        self._idle: dict[tuple, tuple[HopClient, float, float]] = {}

    def take(self, key: tuple) -> HopClient | None:
        """The idle session for `key` if it is young enough and, unless it
        pipelines (then it is marked `unproven`), answers RSET."""
        found = self._idle.pop((os.getpid(), key), None)
        if found is None:
            return None
        client, since, keep_idle = found
        if time.monotonic() - since > keep_idle:
            close(client)
            return None
        if unread(client):  # a stray line would be taken for the next reply
            close(client, quit=False)
            return None
        if client.has_extn("pipelining"):
            client.unproven = True
            return client
        try:
            code, _ = client.rset()
        except (smtplib.SMTPException, OSError):
            code = 0
        if code != 250:
            close(client, quit=False)
            return None
        return client

    def keep(self, key: tuple, client: HopClient, keep_idle: float) -> None:
        old = self._idle.pop((os.getpid(), key), None)
        if old is not None:
            close(old[0])
        client.unproven = False
        self._idle[(os.getpid(), key)] = (client, time.monotonic(), keep_idle)

    def expire(self, everything: bool = False) -> None:
        """QUIT the sessions idle past their time (all with `everything`):
        the worker calls this while it waits, so the next hop never times
        them out and logs it."""
        now = time.monotonic()
        for slot, (client, since, keep_idle) in list(self._idle.items()):
            if slot[0] != os.getpid():
                del self._idle[slot]  # a parent's: not ours to close
            elif everything or now - since > keep_idle:
                del self._idle[slot]
                close(client)


def unread(client: HopClient) -> bool:
    """Bytes the hop sent since its last reply (or no socket at all), found
    without blocking: such a session's replies would be out of step."""
    sock = client.sock
    if sock is None:
        return True
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        if client.file is not None:
            return bool(client.file.peek(1))  # what smtplib buffered, else the socket
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


def close(client: HopClient, quit: bool = True) -> None:
    """End the session: QUIT (bounded), or with `quit=False` just the socket,
    which is also how a transaction in DATA is abandoned: without the final
    dot the hop discards what it was given."""
    try:
        if quit and client.sock is not None:
            client.sock.settimeout(min(QUIT_TIMEOUT, client.timeout))
            client.quit()
            return
    except (smtplib.SMTPException, OSError):
        pass
    client.close()


IDLE = IdleSessions()
