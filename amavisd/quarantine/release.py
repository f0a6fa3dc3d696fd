"""Releasing quarantined mail: one code path for `amavisd quarantine release`
and AM.PDP `request=release`/`requeue` (Debian's amavisd-release), over any
store (`quarantine.store`).

A release re-sends the stored message unscanned (amavisd-new's semantics),
its bytes as they were stored with amavisd-new's trace on top (Resent-From,
-To, -Date, -Message-ID and a Received: line, `quarantine.resent`), from its
original sender to its original recipients (or to the ones the request
names), through the configured release method, then tells the store
(`mark_released`). Only ids that the quarantine itself minted are accepted,
so a request cannot name a file of its choosing.

The answers are amavisd-new's: the next hop's reply for each recipient,
"250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0 Ok: queued as ...",
and "450 4.5.0 Failure: ..." (AM.PDP exit_code 75) for anything refused or
failed. A remote requester is told the class of a failure only
(`amavisd.failures`); the detail goes to the log, and to the local CLI.

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

from amavisd import failures
from amavisd.actions.forward import Forwarder, ForwardError, Handed, SMTPForwarder, forwarder
from amavisd.actions.notify import NotifySettings
from amavisd.actions.relayed import relayed
from amavisd.config import ConfigError
from amavisd.envelope import bare_address
from amavisd.printable import printable
from amavisd.quarantine import resent
from amavisd.quarantine.entry import (
    QuarantineEntry,
    QuarantineError,
    UnknownEntry,
    new_id,
    parse_id,
)
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
    """What a release came to. `smtp enhanced text` is the one-line answer
    (the CLI prints it; over AM.PDP it is the answer to a request refused or
    failed, as amavisd-new's "450 4.5.0 Failure: ..."). `replies` is the
    next hop's answer, one (code, enhanced, text) a recipient, as
    amavisd-new sends them: "250 2.0.0 from MTA(smtp:[127.0.0.1]:10025):
    250 2.0.0 Ok: queued as ...". `temporary`: asking again may work (the
    CLI exits 75)."""

    ok: bool
    smtp: str
    enhanced: str
    text: str
    temporary: bool = False
    replies: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class ReleaseRequest:
    """What an AM.PDP release names: the entry and the secret that unlocks it.
    The session builds it; the worker hands it to `release` as the name."""

    name: str  # mail_file (or mail_id) as sent: an id or a quarantine file name
    secret: str | None = None  # secret_id; None when the request had none
    requested_by: str = ""  # who asked (AM.PDP requested_by): the Resent-From
    via: str = "unix socket"  # how the request came, for our Received: line
    client: str = ""  # the requester's IP address over TCP


class Refused(Exception):
    """A remote release we will not do: `reason` for the log, `reply` for the client."""

    def __init__(self, reason: str, reply: str = REFUSED_TEXT):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def failure(text: str, temporary: bool = True) -> ReleaseOutcome:
    """amavisd-new's answer to a release it could not do: 450 4.5.0 Failure."""
    return ReleaseOutcome(False, "450", "4.5.0", f"Failure: {text}", temporary=temporary)


def release(config: Mapping[str, Any], name: str | ReleaseRequest,
            recipients: Sequence[str] = (), log_id: str = "-", *,
            secret: str | None = None, local: bool = False) -> ReleaseOutcome:
    """Release quarantine entry `name` (an id or its file name, or a
    ReleaseRequest carrying the secret). `local` is for the admin's CLI only:
    it may release without a secret, and is told the detail of a failure,
    which a remote requester never is (only its class, amavisd.failures)."""
    started = time.monotonic()
    requested_by, via, client = "", "command line" if local else "unix socket", ""
    if isinstance(name, ReleaseRequest):
        via, client = name.via, name.client
        name, secret, requested_by = name.name, name.secret, name.requested_by
    shown = printable(name)
    try:
        quarantine = open_store(config)
    except ConfigError as err:
        log.warning("(%s) release of %s failed: %s", log_id, shown, err)
        return failure(str(err) if local else failures.QUARANTINE_UNAVAILABLE)
    if quarantine is None:
        return failure("no quarantine is configured", temporary=False)
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
        return failure(why.reply)
    except QuarantineError as err:
        log.warning("(%s) release of %s failed: %s", log_id, shown, err)
        return failure(str(err))  # local only: a remote one was refused above
    if entry is None:
        return failure(unknown, temporary=False)
    sent_to = targets or [bare_address(r) for r in entry.recipients]
    new = new_id()
    trace = [*resent.resent(entry.id, new, sent_to, myhostname=_hostname(config),
                            from_header=NotifySettings.from_config(config).from_header,
                            requested_by=requested_by),
             resent.received(new, sent_to, via=via, client=client)]
    forward = forwarder(method, config["smtp_timeout"])
    try:
        handed = resend(quarantine, entry.id, sent_to, forward, trace=trace)
    except (QuarantineError, ForwardError) as err:
        log.warning("(%s) release of %s failed: %s", log_id, shown, err)
        return _not_sent(err, sent_to, local, getattr(forward, "where", method))
    # the store hears of them as the entry (or the request) names them
    named = targets or entry.recipients
    delivered = [given for given, r in zip(named, sent_to, strict=True) if r in handed.accepted]
    try:
        quarantine.mark_released(entry, delivered)
    except QuarantineError as err:  # the mail is out: a retry would send it twice
        log.warning("(%s) released %s, but the store did not record it: %s", log_id,
                    entry.id, err)
    log.info("(%s) released %s from <%s> to %s as %s, %s: %s%s", log_id, entry.id,
             bare_address(entry.sender), ",".join(f"<{bare_address(r)}>" for r in delivered),
             new,
             handed.where, handed.reply,
             f"; refused: {handed.refused}" if handed.refused else "")
    text = f"Ok, id={log_id}, released {entry.id} to {', '.join(map(bare_address, delivered))}"
    if handed.refused:
        text += "; refused: " + "; ".join(f"{r}: {why}" for r, why in handed.refused.items())
    return ReleaseOutcome(True, "250", "2.0.0", text,
                          replies=_per_recipient(handed.where, sent_to, handed.accepted,
                                                 handed.refused))


def _not_sent(err: QuarantineError | ForwardError, sent_to: Sequence[str],
              local: bool, where: str) -> ReleaseOutcome:
    """Nothing went out. Where the next hop said why for each recipient,
    its replies (amavisd-new's per-recipient setreply lines); otherwise the
    class of the failure (the detail, a path or an address, to the log and
    the local admin only)."""
    if isinstance(err, ForwardError) and err.refused:
        replies = _per_recipient(where, sent_to, {}, err.refused)
        first = replies[0]
        return ReleaseOutcome(False, *first, temporary=err.temporary, replies=replies)
    temporary = getattr(err, "temporary", True)
    return failure(str(err) if local else failures.public_reason(err), temporary)


def _per_recipient(where: str, sent_to: Sequence[str], accepted: Mapping[str, str],
                   refused: Mapping[str, str]) -> tuple[tuple[str, str, str], ...]:
    replies = []
    for rcpt in sent_to:
        said = accepted.get(rcpt) or refused.get(rcpt)
        if said:
            replies.append(relayed(where, said))
    return tuple(replies)


def _hostname(config: Mapping[str, Any]) -> str:
    return getattr(config, "hostname", None) or config.get("myhostname", "") or "localhost"


def resend(store: QuarantineStore, qid: str, recipients: Sequence[str] | None = None,
           forward: Forwarder | None = None, *,
           trace: Sequence[resent.Field] = ()) -> Handed:
    """Re-send entry `qid` of `store`, unscanned, from its original sender to
    its original recipients (or to `recipients`), with the `trace` fields
    (Resent-*, Received:) on top of the stored bytes. Returns the next hop's
    answer (some recipients may be refused); raises ForwardError when none
    was taken, QuarantineError when the entry cannot be read. The default
    forward method is SMTP to 127.0.0.1:10025, the MTA's re-injection port."""
    entry = store.get(qid)
    data = resent.prepend(store.message(entry), trace)
    targets = list(recipients) if recipients else [bare_address(r) for r in entry.recipients]
    forward = forward if forward is not None else SMTPForwarder()
    # per_recipient: the others get the mail whatever one recipient is told;
    # the requester hears each recipient's reply.
    return forward.hand_over(entry.sender, targets, data, per_recipient=True)


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
