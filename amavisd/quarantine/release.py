"""Releasing quarantined mail: one code path for `amavisd quarantine release`
and AM.PDP `request=release`/`requeue` (Debian's amavisd-release), over any
store (`quarantine.store`).

A release re-sends the stored message unchanged and unscanned (amavisd-new's
semantics), from its original sender to its original recipients (or to the
ones the request names), through the configured release method, then tells
the store (`mark_released`). Only ids that the quarantine itself minted are
accepted, so a request cannot name a file of its choosing.

Who may release: the quarantine id is public (log line, alert, header), so
over AM.PDP it proves nothing. A remote request must carry the entry's
`secret_id` when `auth_required_release` is on (the default, as in
amavisd-new), and a secret that is sent is checked even when it is off. The
check is a constant-time comparison of digests, and every refusal, whether
the id is unknown, the secret missing or wrong, or the entry too old to
have one, gets the same reply after the same minimum time: a request
learns nothing about which ids exist. Other recipients than the original
ones take `release_to_others`. The local CLI (`local=True`), which can
only read the 0700 quarantine as root or the daemon's user, needs neither.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amavisd.actions.forward import Forwarder, ForwardError, SMTPForwarder, forwarder
from amavisd.config import ConfigError
from amavisd.printable import printable
from amavisd.quarantine.entry import QuarantineEntry, QuarantineError, UnknownEntry, parse_id
from amavisd.quarantine.store import QuarantineStore, open_store

log = logging.getLogger("amavisd.release")

# Every refused remote request is answered no sooner than this after it
# started, so the time taken does not say whether the id exists.
REFUSAL_FLOOR = 0.025
REFUSED_TEXT = "release refused: no such quarantine entry, or a missing or wrong secret_id"
# Stands in for the secret of an entry that does not exist (same work, never equal).
_NO_SECRET = secrets.token_urlsafe(12)


@dataclass(frozen=True)
class ReleaseOutcome:
    ok: bool
    smtp: str  # reply code for AM.PDP setreply
    enhanced: str
    text: str
    temporary: bool = False


@dataclass(frozen=True)
class ReleaseRequest:
    """What an AM.PDP release names: the entry and the secret that unlocks it.
    The session builds it; the worker hands it to `release` as the name."""

    name: str  # mail_file (or mail_id) as sent: an id or a quarantine file name
    secret: str | None = None  # secret_id; None when the request had none


class Refused(Exception):
    """A remote release we will not do: `reason` for the log, `reply` for the client."""

    def __init__(self, reason: str, reply: str = REFUSED_TEXT):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def release(config: Mapping[str, Any], name: str | ReleaseRequest,
            recipients: Sequence[str] = (), log_id: str = "-", *,
            secret: str | None = None, local: bool = False) -> ReleaseOutcome:
    """Release quarantine entry `name` (an id or its file name, or a
    ReleaseRequest carrying the secret). `local` is for the admin's CLI only."""
    started = time.monotonic()
    if isinstance(name, ReleaseRequest):
        name, secret = name.name, name.secret
    shown = printable(name)
    try:
        quarantine = open_store(config)
    except ConfigError as err:
        log.warning("(%s) release of %s failed: %s", log_id, shown, err)
        return ReleaseOutcome(False, "450", "4.5.0", str(err), temporary=True)
    if quarantine is None:
        return ReleaseOutcome(False, "550", "5.3.0", "no quarantine is configured")
    method = config["release_method"] or config["notify_method"]
    targets = [t for t in (printable(r).strip("<>") for r in recipients) if t]
    unknown = ""
    try:
        try:
            entry: QuarantineEntry | None = quarantine.get(parse_id(name.removesuffix(".gz")))
        except UnknownEntry as err:
            entry, unknown = None, str(err)
        except QuarantineError as err:
            if local:
                raise
            # A damaged or unreadable sidecar: no secret to check it against,
            # and the reply must not tell that the id exists.
            raise Refused(f"entry unreadable: {err}") from None
        if not local:
            authorise(config, entry, secret, targets)
    except Refused as why:
        log.warning("(%s) release of %s refused: %s", log_id, shown, why.reason)
        time.sleep(max(0.0, started + REFUSAL_FLOOR - time.monotonic()))
        return ReleaseOutcome(False, "550", "5.7.1", why.reply)
    except QuarantineError as err:
        log.warning("(%s) release of %s failed: %s", log_id, shown, err)
        return ReleaseOutcome(False, "450", "4.5.0", str(err), temporary=True)
    if entry is None:
        return ReleaseOutcome(False, "550", "5.1.1", unknown)
    try:
        refused = resend(quarantine, entry.id, targets or None,
                         forwarder(method, config["smtp_timeout"]))
    except QuarantineError as err:
        log.warning("(%s) release of %s failed: %s", log_id, shown, err)
        return ReleaseOutcome(False, "450", "4.5.0", str(err), temporary=True)
    sent_to = [r for r in (targets or entry.recipients) if r not in refused]
    try:
        quarantine.mark_released(entry, sent_to)
    except QuarantineError as err:  # the mail is out: a retry would send it twice
        log.warning("(%s) released %s, but the store did not record it: %s", log_id,
                    entry.id, err)
    log.info("(%s) released %s from <%s> to %s%s", log_id, entry.id, entry.sender,
             ",".join(f"<{r}>" for r in sent_to),
             f"; refused: {refused}" if refused else "")
    text = f"Ok, id={log_id}, released {entry.id} to {', '.join(sent_to)}"
    if refused:
        text += "; refused: " + "; ".join(f"{r}: {why}" for r, why in refused.items())
    return ReleaseOutcome(True, "250", "2.0.0", text)


def resend(store: QuarantineStore, qid: str, recipients: Sequence[str] | None = None,
           forward: Forwarder | None = None) -> dict[str, str]:
    """Re-send entry `qid` of `store`, unchanged and unscanned, from its
    original sender to its original recipients (or to `recipients`). Returns
    the recipients refused while others were taken; raises QuarantineError
    when nothing was delivered. The default forward method is SMTP to
    127.0.0.1:10025, the MTA's re-injection port."""
    entry = store.get(qid)
    data = store.message(entry)
    targets = list(recipients) if recipients else entry.recipients
    forward = forward if forward is not None else SMTPForwarder()
    try:
        return forward.send(entry.sender, targets, data)
    except ForwardError as err:
        raise QuarantineError(f"release of {entry.id} failed: {err}") from None


def authorise(config: Mapping[str, Any], entry: QuarantineEntry | None, secret: str | None,
              targets: Sequence[str]) -> None:
    """Raise Refused unless a remote request may release `entry` to `targets`.
    The secret is compared, in constant time, whether or not the entry exists."""
    expected = entry.secret_id if entry is not None else ""
    if not isinstance(expected, str):
        expected = ""  # a damaged sidecar: no secret can match
    matches = _same(expected or _NO_SECRET, secret or "")
    if config["auth_required_release"] or secret:
        if entry is None:
            raise Refused("no such entry")
        if not expected:
            raise Refused("the entry has no secret_id (stored before release authorisation);"
                          " release it locally with `amavisd quarantine release`")
        if not secret:
            raise Refused("no secret_id in the request")
        if not matches:
            raise Refused("wrong secret_id")
    elif entry is None:
        raise Refused("no such entry")
    others = sorted(set(map(_address_key, targets)) - set(map(_address_key, entry.recipients)))
    if others and not config["release_to_others"]:
        # Said to the client: only a holder of the secret (or anyone, with
        # auth_required_release off) gets this far.
        text = ("release to other recipients than the original ones is not allowed "
                f"(release_to_others): {', '.join(others)}")
        raise Refused(text, text)


def _same(expected: str, given: str) -> bool:
    """Digests first, so the comparison takes as long whatever the lengths."""
    return hmac.compare_digest(hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest(),
                               hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest())


def _address_key(address: str) -> str:
    """An address as a mailbox: angle brackets off, the domain in lower case
    (local parts may be case-sensitive, so they are kept as they are)."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    return f"{local}@{domain.lower()}" if at else domain
