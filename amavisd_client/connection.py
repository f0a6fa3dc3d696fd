"""One AM.PDP connection to the daemon, and the request that asks it about a
spooled message.

Everything that talks to the daemon goes through here: the command line,
and the milter shim and the SMTP forwarder to come, which need a verdict
without amavisd-client's arguments. Any failure to get a verdict is a
`ClientError`, which every caller turns into a tempfail: no doubt may ever
read as a clean message.

Stdlib modules Python has loaded anyway only (`_socket`, not `socket`): the
client starts once per mail.
"""

from __future__ import annotations

import _socket
import os

from amavisd_client.wire.address import Address, parse_or_path
from amavisd_client.wire.ampdp import Block, Decoder, encode_block


class ClientError(Exception):
    """Something kept us from getting a verdict: always a tempfail."""


class Unanswered(ClientError):
    """The daemon closed the connection with our request unread (reset,
    broken pipe) before any byte of the reply: it never saw the request."""


class Connection:
    """One AM.PDP connection, reused for several requests while the daemon keeps it.

    `address` is an `Address` or its text as the client's -s takes it (a
    spelling of wire/address.py, else a Unix socket path); text that is
    neither raises AddressError (a ValueError) here, before any mail."""

    def __init__(self, address: str | Address, timeout: float):
        self.target = parse_or_path(address) if isinstance(address, str) else address
        self.address = address if isinstance(address, str) else str(address)
        self.timeout = timeout
        self.sock = None
        self.decoder = Decoder()
        self.carried = False  # this socket has had a whole reply: a kept connection

    def _connect(self):
        where = self.target
        if not where.is_tcp:
            family = _socket.AF_UNIX
        else:
            family = _socket.AF_INET6 if where.is_ipv6 else _socket.AF_INET
        try:
            sock = _socket.socket(family, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(where.target)
        except (OSError, ValueError) as err:
            raise ClientError(f"cannot connect to amavisd at {self.address}: {err}") from None
        return sock

    def open(self) -> None:
        """Connect now, so "daemon down" is the error a postmaster sees first."""
        if self.sock is None:
            self.sock = self._connect()
            self.decoder = Decoder()
            self.carried = False

    def _still_open(self) -> bool:
        """A retiring worker may have closed our idle connection; find out first."""
        try:
            self.sock.settimeout(0.0)
            return self.sock.recv(1, _socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(self.timeout)

    def request(self, attrs: list[tuple[str, object]]) -> Block:
        """The daemon's reply to `attrs`. Asked once more, on a new
        connection, only when a kept one (it carried a whole reply before)
        was reset before any byte of this reply -- a worker giving it away or
        retiring as the request arrived closes it with the request unread,
        which the kernel tells us as a reset -- and the request is a check
        whose verdict comes back to us. A plain end of the connection is a
        worker that read the request and died on it (a poison message, or
        killed after it quarantined and notified): never asked again, nor
        is a first request, a delivery by the daemon or a release."""
        if self.sock is not None and not self._still_open():
            self.close()
        kept = self.sock is not None and self.carried
        try:
            return self._ask(attrs)
        except Unanswered:
            if not (kept and asks_back(attrs)):
                raise
        return self._ask(attrs)  # a new connection: the kept one is closed

    def _ask(self, attrs: list[tuple[str, object]]) -> Block:
        self.open()
        answered = False  # any byte of the reply yet
        try:
            self.sock.sendall(encode_block(attrs))
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise ClientError("amavisd closed the connection without a verdict")
                answered = True
                blocks = self.decoder.feed(data)
                if blocks:
                    self.carried = True
                    return blocks[0]
        except TimeoutError:
            self.close()
            raise ClientError(f"no verdict from amavisd within {self.timeout:g}s") from None
        except (ConnectionResetError, BrokenPipeError) as err:
            self.close()
            raise (ClientError if answered else Unanswered)(
                f"amavisd connection failed: {err}") from None
        except OSError as err:
            self.close()
            raise ClientError(f"amavisd connection failed: {err}") from None
        except ClientError:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.carried = False


def asks_back(attrs: list[tuple[str, object]]) -> bool:
    """A check whose verdict comes back to the client (AM.PDP with
    delivery_care_of=client, nothing saying otherwise): asking it twice
    costs a second scan, never a second delivery."""
    values = {}
    for name, value in attrs:
        values.setdefault(name, set()).add(str(value))
    return values.get("request") == {"AM.PDP"} and values.get("delivery_care_of") == {"client"}


def angle(address: str) -> str:
    address = address.strip()
    return address if address.startswith("<") and address.endswith(">") else f"<{address}>"


def check(conn: Connection, mail_file: str, sender: str | None,
          recipients: list[str]) -> Block:
    """Ask the daemon about a message spooled at `mail_file`; we remove the
    spool and deliver (tempdir_removed_by, delivery_care_of = client)."""
    attrs: list[tuple[str, object]] = [
        ("request", "AM.PDP"),
        ("tempdir", os.path.dirname(mail_file)),
        ("tempdir_removed_by", "client"),
        ("mail_file", mail_file),
        ("delivery_care_of", "client"),
        ("protocol_name", "LOCAL"),
    ]
    if sender is not None:
        attrs.append(("sender", angle(sender)))
    attrs.extend(("recipient", angle(r)) for r in recipients)
    return conn.request(attrs)
