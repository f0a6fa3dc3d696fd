"""Which session class serves a listener: protocols named by a tag.

Every listener carries a tag (`listeners.Listener.protocol`); the worker
builds the session for an accepted connection from this table, in the
manner of gunicorn's worker classes named by string. A new ingress is a
module with a `protocol.session.Session` subclass and one row here (or a
`register()` call before the workers are forked): the worker and the master
are not edited. A tag is registered once: a second registration is refused,
never a silent replacement of the protocol a listener speaks.

Everything here is imported by the master before privileges drop, so a
worker never has to import a protocol after the fork.
"""

from __future__ import annotations

from amavisd.protocol import ampdp, smtp
from amavisd.protocol.session import Session

PROTOCOLS: dict[str, type[Session]] = {
    "ampdp": ampdp.Session,  # amavisd-new's AM.PDP: the MTA's helper, amavisd-release
    "smtp": smtp.SMTPSession,  # the after-queue content filter (Postfix content_filter)
    "lmtp": smtp.LMTPSession,  # the same, one reply per recipient (RFC 2033)
}


class UnknownProtocol(LookupError):
    """A listener's tag names no registered protocol."""


def register(tag: str, session_class: type[Session]) -> None:
    """Add a protocol under `tag`; refuses a tag that is already taken."""
    if tag in PROTOCOLS:
        raise ValueError(f"protocol {tag!r} is already registered "
                         f"({PROTOCOLS[tag].__module__}.{PROTOCOLS[tag].__qualname__})")
    PROTOCOLS[tag] = session_class


def session_class(tag: str) -> type[Session]:
    """The session class for listeners tagged `tag`."""
    try:
        return PROTOCOLS[tag]
    except KeyError:
        raise UnknownProtocol(f"no protocol registered as {tag!r} (known: "
                              f"{', '.join(sorted(PROTOCOLS))})") from None
