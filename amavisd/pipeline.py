"""One message, start to finish: spool -> decompose -> policy -> scan -> decide -> act.

The pipeline knows nothing about sockets or processes: the AM.PDP worker,
`amavisd scan` and (later) the milter and SMTP ingresses all call
`Pipeline.process(job)` and map the `Result` onto their own replies.

It must never pass a message it could not check: any failure to read or to
scan ends in `Destiny.TEMPFAIL` with a reason, so the MTA keeps the mail.
"""

from __future__ import annotations

import email.policy
import logging
import os
import stat
import time
from collections.abc import Sequence
from email.parser import BytesHeaderParser

from amavisd.actions.forward import forwarder
from amavisd.actions.headers import header_edits
from amavisd.actions.notify import Notifier, NotifySettings, Templates
from amavisd.config import Config
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.registry import WorkDirFailed
from amavisd.envelope import Job, angled
from amavisd.policy.banned import BannedRules
from amavisd.policy.destinies import destinies
from amavisd.quarantine import KINDS, QuarantineError, QuarantineStore, open_store
from amavisd.scan.base import Scanner, ScannerError
from amavisd.scan.scanners import ScannerSet, build_scanner_set
from amavisd.verdict import Category, Destiny, Result, Unchecked

log = logging.getLogger("amavisd.pipeline")


class MessageUnreadable(Exception):
    """The message file cannot be read: tempfail, the MTA still has the mail."""


class MessageTooLarge(Exception):
    """Over max_message_size: not read at all, UNCHECKED (kind limit)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"message larger than max_message_size ({limit} bytes)")
        self.size = size


class QuarantineFailed(Exception):
    """Mail to be kept could not be stored: tempfail rather than lose it."""


class Pipeline:
    def __init__(self, config: Config, scanners: ScannerSet | Sequence[Scanner] | None = None,
                 name_types: bool = False, *, quarantine: QuarantineStore | None = None):
        """`quarantine`: the store to keep mail in; None means the one the
        config names (`quarantine_store`), or none at all."""
        self.config = config
        # libmagic names each part's type for people (--tree) and, later, banned-type
        # rules; nothing else needs it, and it costs 3x the decoding itself.
        self.name_types = name_types
        if scanners is None:
            scanners = build_scanner_set(config)
        elif not isinstance(scanners, ScannerSet):
            scanners = ScannerSet(scanners)
        self.scanners = scanners
        self.destinies = destinies(config)
        self.banned_rules = BannedRules.parse(config.banned_rules)
        self.limits = Limits.from_config(config)
        self.quarantine = quarantine if quarantine is not None else open_store(config)
        self.quarantined = {c.upper() for c in config.quarantine}
        self.notifier = Notifier(NotifySettings.from_config(config),
                                 forwarder(config.notify_method, config.smtp_timeout),
                                 Templates([config.template_dir] if config.template_dir else []))
        self.outbox: list[tuple[Result, Job, bytes]] = []  # notices to send after the reply
        # Large parts spill to per-message dirs in the daemon's own work base
        # (0700: clients, who may write in the temp base, cannot reach them)
        # when it exists (the daemon makes sure it does), else in the system's
        # temp dir (`amavisd scan`). Never in the temp base.
        work_base = config.work_base_path
        self.spill_base = work_base if os.path.isdir(work_base) else None

    def process(self, job: Job) -> Result:
        started = time.monotonic()
        result = Result(log_id=job.log_id)
        decomposition = None
        try:
            raw = self.spool(job)
            result.size = len(raw)
            result.headers = top_headers(raw)
            decomposition = decompose(raw, self.limits, self.spill_base,
                                      use_magic=self.name_types or self.banned_rules.needs_magic)
            result.tree = decomposition.root
            result.parts = decomposition.scannable()
            result.unchecked.extend(decomposition.unchecked)
            result.banned_hits = self.banned_rules.check(decomposition.root)
            result.banned = [hit.label for hit in result.banned_hits]
            self.scan(result)
            self.decide(result)
            self.keep(job, result, raw)
        except MessageTooLarge as err:  # not read at all: the verdict needs no bytes
            result.size = err.size
            result.unchecked.append(Unchecked(str(err), "limit"))
            self.decide(result)
        except (MessageUnreadable, ScannerError, QuarantineFailed, WorkDirFailed, OSError,
                MemoryError) as err:
            result.category = None
            result.destiny = Destiny.TEMPFAIL
            result.tempfail_reason = str(err) or type(err).__name__
        finally:
            if decomposition is not None:
                decomposition.cleanup()
        result.header_edits = header_edits(self.config, result)
        result.elapsed_ms = (time.monotonic() - started) * 1000
        log_result(job, result)
        return result

    # -- stages ------------------------------------------------------------

    def spool(self, job: Job) -> bytes:
        """Read the message, at most max_message_size bytes of a regular file.

        An AM.PDP job arrives already opened beneath the temp base
        (`mail_fd`, see protocol.ampdp): read through that descriptor, never
        by the path again. Otherwise the path is opened without following a
        symlink planted in its place, without blocking on a FIFO and without
        taking a terminal."""
        fd = job.mail_fd
        owned = fd < 0
        if owned:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                fd = os.open(job.mail_path, flags)
            except OSError as err:
                raise MessageUnreadable(f"cannot open {job.mail_path}: {err.strerror}") \
                    from None
        try:
            return read_message(fd, job.mail_path, self.config.max_message_size)
        finally:
            if owned:
                os.close(fd)

    def scan(self, result: Result) -> None:
        """The scanner set looks at every part; parts no scanner could take
        make the message UNCHECKED; no scanner at all is a tempfail, unless
        the postmaster chose to pass such mail with an alert header."""
        try:
            outcome = self.scanners.scan(result.parts)
        except ScannerError as err:
            if self.config.when_scanners_fail != "pass":
                raise
            result.unchecked.append(Unchecked("not scanned: no virus scanner answered",
                                              "unscanned"))
            result.alerts.append(f"NOT SCANNED: {err}")
            result.force_destiny = Destiny.PASS
            return
        result.findings.extend(outcome.findings)
        result.scanned_by = outcome.answered
        result.unchecked.extend(Unchecked(f"not scanned: {path} ({why})", "unscanned")
                                for path, why in outcome.missed.items())

    def keep(self, job: Job, result: Result, raw: bytes) -> None:
        """Quarantine what the postmaster wants kept, and queue the notices.
        Mail we would discard or reject is never dropped unkept: if the
        quarantine cannot take it, the answer becomes a tempfail."""
        if self.quarantine is not None and result.verdict in self.quarantined:
            try:
                qid = self.quarantine.store(raw, job.envelope, result)
                result.quarantine_id = f"{KINDS[result.category]}-{qid}"
            except (OSError, QuarantineError) as err:
                raise QuarantineFailed(f"quarantine {self.quarantine.location}: "
                                       f"{getattr(err, 'strerror', None) or err}") from None
        if result.category is not Category.CLEAN:
            self.outbox.append((result, job, raw))

    def send_notices(self) -> None:
        """Admin alerts and sender/recipient notices for the messages just
        answered; called after the reply, so a slow MTA never delays a verdict."""
        outbox, self.outbox = self.outbox, []
        for result, job, raw in outbox:
            self.notifier.notify(result, job.envelope, raw, result.quarantine_id)

    def decide(self, result: Result) -> None:
        category = Category.CLEAN
        if result.unchecked:
            category = Category.UNCHECKED
        if result.banned:
            category = Category.BANNED
        if result.findings:
            category = Category.INFECTED
        result.category = category
        result.destiny = result.force_destiny or self.destinies.destiny(category,
                                                                        result.unchecked)


def read_message(fd: int, name: str, limit: int) -> bytes:
    """The whole regular file behind `fd`, from its start. A file larger than
    `limit` is not read (MessageTooLarge: UNCHECKED); one that changes size
    while read is a tempfail: never a partial message scanned as the whole."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MessageUnreadable(f"{name} is not a regular file")
        if st.st_size > limit:
            raise MessageTooLarge(st.st_size, limit)
        with os.fdopen(os.dup(fd), "rb") as fh:
            fh.seek(0)
            raw = fh.read(st.st_size + 1)
    except OSError as err:
        raise MessageUnreadable(f"cannot read {name}: {err.strerror}") from None
    if len(raw) != st.st_size:
        raise MessageUnreadable(f"{name} changed size while being read")
    return raw


def top_headers(raw: bytes) -> dict[str, str]:
    """Message-ID, Subject, From and Date of the message itself, for the log
    line and notifications: unfolded, decoded, one line each, bounded."""
    end = raw.find(b"\n\n")
    crlf = raw.find(b"\r\n\r\n")
    if crlf >= 0 and (end < 0 or crlf < end):
        end = crlf
    block = raw[: end if end >= 0 else 64 * 1024][: 64 * 1024]
    parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(block)
    found = {}
    for name in ("Message-ID", "Subject", "From", "Date"):
        try:
            value = parsed.get(name)
        except Exception:  # a hostile header the parser cannot represent
            value = None
        if value is not None:
            found[name] = " ".join(str(value).split())[:500]
    return found


ACTIONS = {
    Destiny.PASS: "Passed",
    Destiny.DISCARD: "Blocked",
    Destiny.BOUNCE: "Blocked",
    Destiny.REJECT: "Blocked",
    Destiny.TEMPFAIL: "Tempfailed",
}


def log_result(job: Job, result: Result) -> None:
    """The one line per message, amavisd-new style: log id, what was done and
    why, the envelope, queue id, Message-ID, quarantine id, size, time."""
    env = job.envelope
    fields = [f"({job.log_id}) {ACTIONS[result.destiny]} {result.summary()}",
              f"{{{result.destiny.value}}}"]
    client = f"[{env.client_address}] " if env.client_address else ""
    fields.append(f"{client}{angled(env.sender)} -> "
                  + (",".join(angled(r) for r in env.recipients) or "-"))
    if env.queue_id:
        fields.append(f"Queue-ID: {env.queue_id}")
    if result.headers.get("Message-ID"):
        fields.append(f"Message-ID: {result.headers['Message-ID']}")
    if result.quarantine_id:
        fields.append(f"quarantine: {result.quarantine_id}")
    fields.append(f"size: {result.size}")
    fields.append(f"{result.elapsed_ms:.0f} ms")
    level = logging.WARNING if result.destiny is Destiny.TEMPFAIL else logging.INFO
    log.log(level, "%s", ", ".join(fields[:1]) + " " + ", ".join(fields[1:]))
