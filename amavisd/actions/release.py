"""Releasing quarantined mail: one code path for `amavisd quarantine release`
and AM.PDP `request=release` (Debian's amavisd-release).

A release re-sends the stored message unchanged, from its original sender
to its original recipients (or to the ones the request names), through the
configured release method. Only ids that the quarantine itself minted are
accepted, so a request cannot name a file of its choosing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amavisd.actions.forward import forwarder
from amavisd.actions.quarantine import Quarantine, QuarantineError, UnknownEntry, parse_id
from amavisd.printable import printable

log = logging.getLogger("amavisd.release")


@dataclass(frozen=True)
class ReleaseOutcome:
    ok: bool
    smtp: str  # reply code for AM.PDP setreply
    enhanced: str
    text: str
    temporary: bool = False


def release(config: Mapping[str, Any], name: str, recipients: Sequence[str] = (),
            log_id: str = "-") -> ReleaseOutcome:
    """Release quarantine entry `name` (an id or its file name)."""
    if not config["quarantine_dir"]:
        return ReleaseOutcome(False, "550", "5.3.0", "no quarantine is configured")
    quarantine = Quarantine(config["quarantine_dir"], gzip=config["quarantine_gzip"])
    method = config["release_method"] or config["notify_method"]
    targets = [t for t in (printable(r).strip("<>") for r in recipients) if t]
    try:
        qid = parse_id(name.removesuffix(".gz"))
        entry = quarantine.load(qid)
        refused = quarantine.release(qid, targets or None,
                                     forwarder(method, config["smtp_timeout"]))
    except UnknownEntry as err:
        return ReleaseOutcome(False, "550", "5.1.1", str(err))
    except QuarantineError as err:
        log.warning("(%s) release of %s failed: %s", log_id, name, err)
        return ReleaseOutcome(False, "450", "4.5.0", str(err), temporary=True)
    sent_to = [r for r in (targets or entry.recipients) if r not in refused]
    log.info("(%s) released %s from <%s> to %s%s", log_id, qid, entry.sender,
             ",".join(f"<{r}>" for r in sent_to),
             f"; refused: {refused}" if refused else "")
    text = f"Ok, id={log_id}, released {qid} to {', '.join(sent_to)}"
    if refused:
        text += "; refused: " + "; ".join(f"{r}: {why}" for r, why in refused.items())
    return ReleaseOutcome(True, "250", "2.0.0", text)
