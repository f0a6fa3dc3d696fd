"""One message, start to finish: spool -> decompose -> policy -> scan -> decide -> act.

The pipeline knows nothing about sockets or processes: the AM.PDP worker,
`amavisd scan` and (later) the milter and SMTP ingresses all call
`Pipeline.process(job)` and map the `Result` onto their own replies.

It must never pass a message it could not check: any failure to read or to
scan ends in `Destiny.TEMPFAIL` with a reason, so the MTA keeps the mail.

What applies to a message comes from its policy banks (`amavisd.policies`:
chosen by listener, client network and the client's names, built once per
combination) and, recipient by recipient, from `recipient_policy` and the
bypass lists (`policy.recipients`): each recipient gets its own category and
destiny, and the message the strictest. Checks every recipient bypasses are
not run at all.

A big message is never read whole: it is mapped read-only (`decode.window`)
and every stage reads it a window at a time (the splitter, the decoders,
the quarantine); what needs only its header block gets that, bounded.
"""

from __future__ import annotations

import email.policy
import errno
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Sequence

from amavisd import failures, logs, metrics
from amavisd.actions.headers import header_edits
from amavisd.actions.notify import Notifier
from amavisd.config import Config
from amavisd.decode import window
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.decode.registry import WorkDirFailed
from amavisd.envelope import Job
from amavisd.policies import Policies, Policy
from amavisd.policy.banned import BannedHit
from amavisd.policy.recipients import RecipientChecks, RecipientOutcome, outcome, strictest
from amavisd.quarantine import KINDS, QuarantineError, QuarantineStore
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
        self.limits = Limits.from_config(config)
        self.policies = Policies(config, quarantine)  # banks: built once a combination
        self.outbox: list[tuple[Notifier, Result, Job, bytes]] = []  # sent after the reply
        # Large parts spill to per-message dirs in the daemon's own work base
        # (0700: clients, who may write in the temp base, cannot reach them)
        # when it exists (the daemon makes sure it does), else in the system's
        # temp dir (`amavisd scan`). Never in the temp base.
        work_base = config.work_base_path
        self.spill_base = work_base if os.path.isdir(work_base) else None

    def process(self, job: Job) -> Result:
        started = time.monotonic()
        result = Result(log_id=job.log_id)
        policy = self.policies.for_job(job)
        result.policy_banks, result.originating = policy.banks, policy.originating
        checks = self.policies.recipient_checks(policy, job.envelope.recipients)
        decomposition = None
        raw: window.Buffer = b""
        try:
            raw = self.spool(job)
            metrics.lap("spool")
            result.size = len(raw)
            result.headers = top_headers(raw)
            banned = [c for c in checks if not c.bypass_banned]
            scanned = not all(c.bypass_virus for c in checks)
            hits: dict[int, list[BannedHit]] = {}
            if banned or scanned:  # else there is nothing to look for
                magic = self.name_types or any(c.policy.banned_rules.needs_magic
                                               for c in banned)
                decomposition = decompose(raw, self.limits, self.spill_base, use_magic=magic)
                result.tree = decomposition.root
                result.parts = decomposition.scannable()
                result.unchecked.extend(decomposition.unchecked)
                hits = self.check_banned(result, decomposition.root, banned)
                metrics.lap("decode")
            if scanned:
                self.scan(result)
                metrics.lap("scan")
            else:
                result.bypassed_virus_checks = True
            outcomes = self.decide(result, checks, hits)
            self.keep(job, result, raw, policy, checks, outcomes)
            metrics.lap("act")
        except MessageTooLarge as err:  # not read at all: the verdict needs no bytes
            result.size = err.size
            result.unchecked.append(Unchecked(str(err), "limit"))
            self.decide(result, checks, {}, bypassable=False)
        except (MessageUnreadable, ScannerError, QuarantineFailed, WorkDirFailed, OSError,
                MemoryError) as err:
            # The reply names the class of failure only (amavisd.failures);
            # the detail (paths, errno, addresses) is for this log line.
            result.tempfail(failures.detail(err), failures.public_reason(err))
            log.warning("(%s) tempfail, %s: %s", job.log_id, result.public_reason,
                        result.tempfail_reason)
        finally:
            if decomposition is not None:
                decomposition.cleanup()
            if window.mapped(raw):
                if result.tree is not None:
                    result.tree.detach()
                window.close(raw)
        if result.category is None:  # a failure, not a decision: no recipient's outcome stands
            result.recipient_destinies, result.recipient_categories = {}, {}
        result.header_edits = header_edits(policy.config, result)
        result.elapsed_ms = (time.monotonic() - started) * 1000
        log_result(job, result)
        return result

    # -- stages ------------------------------------------------------------

    def spool(self, job: Job) -> window.Buffer:
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
            return read_message(fd, job.mail_path, self.config.max_message_size,
                                self.spill_base)
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
            # the header travels with the mail: the class only, the detail is logged
            log.warning("no virus scanner answered, passing as configured: %s", err)
            result.alerts.append(f"NOT SCANNED: {failures.public_reason(err)}")
            result.force_destiny = Destiny.PASS
            return
        result.findings.extend(outcome.findings)
        result.scanned_by = outcome.answered
        result.unchecked.extend(Unchecked(f"not scanned: {path} ({why})", "unscanned")
                                for path, why in outcome.missed.items())

    def check_banned(self, result: Result, root, checks: list[RecipientChecks]
                     ) -> dict[int, list[BannedHit]]:
        """Each set of banned rules the recipients' policies name, applied
        once; the message shows every hit that counts for someone."""
        hits: dict[int, list[BannedHit]] = {}
        for check in checks:
            rules = check.policy.banned_rules
            if id(rules) not in hits:
                hits[id(rules)] = rules.check(root)
                result.banned_hits += [h for h in hits[id(rules)] if h not in result.banned_hits]
        result.banned = [hit.label for hit in result.banned_hits]
        return hits

    def keep(self, job: Job, result: Result, raw: window.Buffer, policy: Policy,
             checks: list[RecipientChecks], outcomes: list[RecipientOutcome]) -> None:
        """Quarantine what the postmaster wants kept (for the message, or for
        any recipient's policy), and queue the notices. Mail we would discard
        or reject is never dropped unkept: if the quarantine cannot take it,
        the answer becomes a tempfail."""
        store = policy.quarantine
        wanted = result.verdict in policy.quarantined or any(
            o.category.name in c.policy.quarantined for c, o in zip(checks, outcomes, strict=True))
        if store is not None and wanted:
            try:
                qid = store.store(raw, job.envelope, result)
                result.quarantine_id = f"{KINDS[result.category]}-{qid}"
                metrics.quarantine_write(True)
            except (OSError, QuarantineError) as err:
                metrics.quarantine_write(False)
                raise QuarantineFailed(f"quarantine {store.location}: "
                                       f"{getattr(err, 'strerror', None) or err}") from None
        if result.category is not Category.CLEAN:
            # the notices quote the header block only: never keep a big message for them
            self.outbox.append((policy.notifier, result, job, header_block(raw)))

    def send_notices(self) -> None:
        """Admin alerts and sender/recipient notices for the messages just
        answered; called after the reply, so a slow MTA never delays a verdict."""
        outbox, self.outbox = self.outbox, []
        for notifier, result, job, raw in outbox:
            for _, sent in notifier.notify(result, job.envelope, raw, result.quarantine_id):
                metrics.notification(sent)

    def decide(self, result: Result, checks: list[RecipientChecks],
               hits: dict[int, list[BannedHit]], bypassable: bool = True
               ) -> list[RecipientOutcome]:
        """Each recipient's category and destiny; the message's are the
        worst category and the strictest destiny (policy.recipients)."""
        outcomes = [outcome(c, bool(result.findings), bool(hits.get(id(c.policy.banned_rules))),
                            result.unchecked, result.force_destiny, bypassable)
                    for c in checks]
        result.category = max(o.category for o in outcomes)
        result.destiny = strictest(o.destiny for o in outcomes)
        result.recipient_destinies = {o.address: o.destiny for o in outcomes if o.address}
        result.recipient_categories = {o.address: o.category for o in outcomes if o.address}
        return outcomes


def read_message(fd: int, name: str, limit: int, copy_dir: str | None = None
                 ) -> window.Buffer:
    """The whole regular file behind `fd`, from its start: bytes, or past
    window.MAP_ABOVE a read-only mapping (the caller closes it). A file larger
    than `limit` is not read (MessageTooLarge: UNCHECKED); one that changes
    size while read is a tempfail: never a partial message scanned as the whole."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MessageUnreadable(f"{name} is not a regular file")
        if st.st_size > limit:
            raise MessageTooLarge(st.st_size, limit)
        if st.st_size > window.MAP_ABOVE:
            return map_message(fd, st.st_size, name, copy_dir)
        # pread: no dup, no buffered file object, no seeks (a short read at
        # the end means the end; one byte more than the size shows growth)
        raw = os.pread(fd, st.st_size + 1, 0)
        while 0 < len(raw) < st.st_size:  # cut short before the end: read on
            more = os.pread(fd, st.st_size + 1 - len(raw), len(raw))
            if not more:
                break
            raw += more
    except OSError as err:
        raise MessageUnreadable(f"cannot read {name}: {err.strerror}") from None
    if len(raw) != st.st_size:
        raise MessageUnreadable(f"{name} changed size while being read")
    return raw


def map_message(fd: int, size: int, name: str, copy_dir: str | None) -> window.Buffer:
    """A big message mapped read-only. Only a file nobody else can change is
    mapped in place (our SMTP spool, a memfd): a client's file could be cut
    short under the mapping, and reading past its new end kills the worker
    (SIGBUS). Any other is first copied into a nameless file of ours."""
    if window.private(fd):
        return window.map_fd(fd, size)
    copy = private_copy(fd, size, name, copy_dir)
    try:
        return window.map_fd(copy, size)
    finally:
        os.close(copy)  # the mapping holds its own reference


def private_copy(fd: int, size: int, name: str, directory: str | None) -> int:
    """`size` bytes of `fd` in an anonymous file (O_TMPFILE) only we hold,
    copied in the kernel; a file that changes size meanwhile is a tempfail."""
    directory = directory or tempfile.gettempdir()
    try:
        copy = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        copy, path = tempfile.mkstemp(prefix="msg-", dir=directory)
        os.unlink(path)
    try:
        done = 0
        while done < size + 1:
            sent = os.sendfile(copy, fd, done, size + 1 - done)
            if not sent:
                break
            done += sent
        if done != size or os.fstat(fd).st_size != size:
            raise MessageUnreadable(f"{name} changed size while being read")
    except BaseException:
        os.close(copy)
        raise
    return copy


HEADER_BLOCK = 1024 * 1024  # what notices may quote of a message's header (actions.notify)


def header_block(raw: window.Buffer, limit: int = HEADER_BLOCK) -> bytes:
    """The message's header block and the blank line after it, as bytes,
    at most `limit` of them: all the notices read of the message."""
    end = raw.find(b"\n\n", 0, limit)
    crlf = raw.find(b"\r\n\r\n", 0, limit)
    if crlf >= 0 and (end < 0 or crlf < end):
        return raw[:crlf + 4]
    return raw[:end + 2] if end >= 0 else raw[:limit]


# Where the header block ends, at most HEADER_SCAN in: the line per message
# needs only the Message-ID, found without parsing the other fields (the
# `email` package's structured parse cost ~0.4 ms a message, a fifth of ours).
HEADER_SCAN = 64 * 1024
MESSAGE_ID = re.compile(rb"^message-id[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                        re.IGNORECASE | re.MULTILINE)


def top_headers(raw: window.Buffer) -> dict[str, str]:
    """The message's own Message-ID (the first one), for the log line:
    unfolded, one line, bounded; decoded by the `email` package only when it
    is not plain ASCII or carries an encoded word."""
    found = MESSAGE_ID.search(header_block(raw, HEADER_SCAN))
    if found is None:
        return {}
    value = found.group(1).decode("ascii", "surrogateescape")
    if not value.isascii() or "=?" in value:
        try:
            value = str(email.policy.default.header_fetch_parse("Message-ID", value))
        except Exception:  # a hostile header the parser cannot represent
            return {}
    value = " ".join(value.split())[:500]
    return {"Message-ID": value} if value else {}


def log_result(job: Job, result: Result) -> None:
    """The one line per message, amavisd-new style (or a JSON object, with
    log_format = "json"): logs.log_summary builds both from the same fields."""
    logs.log_summary(log, job, result)
