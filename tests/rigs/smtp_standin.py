# SPDX-License-Identifier: MIT
"""The worker as an SMTP/LMTP session sees it, with the pipeline stood in for.

The session's framing (DATA, BDAT, replies, limits) is what the SMTP tests
and the SMTP fuzz targets test; what the pipeline would make of a message is
not. `StandIn` is the one `protocol.session.Handler` they share: it keeps the
bytes each message's spool held (`spooled`), calls every message CLEAN and
gives it the destiny it was told (PASS: forwarded to the configured next
hop, which may be a real one (tests/rigs/nexthop.py) or a dead port (451)).

    handler = StandIn.at(tmp_path, forward=hop.spec, destiny=Destiny.DISCARD)
    session = SMTPSession(sock, handler)

It never scans, quarantines nor notifies; a test that needs those runs the
real daemon (tests/rigs/daemon.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from amavisd import config as configuration
from amavisd.verdict import Category, Destiny, Result

__all__ = ["SPOOL_READ", "StandIn"]

SPOOL_READ = 1 << 20  # what is kept of each message's spool: more than any test sends


class StandIn:
    """A session handler without a pipeline: every message CLEAN, `destiny`."""

    def __init__(self, config: Any, destiny: Destiny = Destiny.PASS, name: str = "9"):
        self.config = config
        self.destiny = destiny
        self.name = name  # log ids are `<name>-01`, `<name>-02`, ...
        self.spooled: list[bytes] = []
        self.ids = 0

    @classmethod
    def at(cls, base: Path, forward: str = "smtp:[127.0.0.1]:9",
           destiny: Destiny = Destiny.PASS, name: str = "9", **settings: Any) -> StandIn:
        """A stand-in whose workdir is `base` (its work base made 0700), forwarding
        to `forward`, with any other `settings` (max_message_size, timeouts...)."""
        (Path(base) / "work").mkdir(mode=0o700, exist_ok=True)
        config = configuration.load(None, {"workdir": str(base), "forward_method": forward,
                                           "forward_timeout": 5.0, "myhostname": "t.test"}
                                    | settings)
        return cls(config, destiny, name)

    def next_log_id(self) -> str:
        self.ids += 1
        return f"{self.name}-{self.ids:02d}"

    def handle_message(self, job: Any) -> Result:
        self.spooled.append(os.pread(job.mail_fd, SPOOL_READ, 0))
        return Result(log_id=job.log_id, category=Category.CLEAN, destiny=self.destiny)

    def ensure_dirs(self) -> None:
        """The test made the dirs; the session's call is all that matters here."""

    def handle_reply_sent(self) -> None:
        """No notices to send."""

    def keep_going(self) -> bool:
        return True
