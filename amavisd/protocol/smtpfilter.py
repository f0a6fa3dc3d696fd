"""After the final ".": check the message, hand it on, and say what became of it.

The two-phase answer of a content filter: our 250 goes back only after the
next hop (`forward_method`) took the message, or after it was quarantined
or discarded as its destiny says. Any doubt on the way out (next hop down,
4xx, timeout, disk full) is a 4xx, so the MTA keeps the mail; a 5xx of the
next hop is passed back as a 5xx. Replies come from the one destinies table
(`policy.destinies.REPLIES`), the next hop's own through `actions.relayed`, as
amavisd-new shows them ("250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250
2.0.0 Ok: queued as ...").

SMTP has one reply for all recipients: a recipient whose destiny is
tempfail (or that the next hop tempfails) tempfails the whole message
before anything is forwarded, so a retry never delivers twice. LMTP has a
reply per recipient (RFC 2033): each is told its own destiny and the next
hop's answer for it. BOUNCE is answered 250: after the queue, we write the
DSN ourselves (actions.notify, after the reply), as amavisd-new does.

The message is forwarded from the spool file, our header edits put in front
of its header block (`actions.edits`, milter semantics), with the
envelope as it came (DSN parameters, BODY, SMTPUTF8) and XFORWARD.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from amavisd import failures, logs, metrics
from amavisd.actions import relay_dsn
from amavisd.actions.edits import MAX_HEADER, edit_spool
from amavisd.actions.forward import Forwarder, ForwardError, Handed, Params, forwarder
from amavisd.actions.relayed import relayed
from amavisd.decode import window
from amavisd.envelope import Envelope, Job
from amavisd.policy.destinies import REPLIES
from amavisd.protocol.session import Handler
from amavisd.protocol.smtpcodec import reply
from amavisd.verdict import Destiny, Result

log = logging.getLogger("amavisd.smtp")



@dataclass
class Transaction:
    """One message on an SMTP/LMTP connection: envelope, extras, spool."""

    sender: str
    params: dict[str, str | None]
    xforward: dict[str, str]
    recipients: list[str] = field(default_factory=list)
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)
    spool: BinaryIO | None = None
    spool_error: OSError | None = None  # writing failed (disk full): 451 at the end

    def add_recipient(self, address: str, params: dict[str, str | None]) -> None:
        self.recipients.append(address)
        self.rcpt_params[address] = {k: v for k, v in params.items() if v is not None}

    def open_spool(self, work_base: str, spare: BinaryIO | None = None
                   ) -> Callable[[bytes], object]:
        """An anonymous file (O_TMPFILE) in the work base: no name to find,
        nothing left if we die. The write function for the DATA reader.
        `spare`: the connection's last spool, emptied (`close_spool`), taken
        instead of a new file."""
        if spare is not None:
            self.spool = spare
            return self._write
        try:
            fd = os.open(work_base, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # no O_TMPFILE
                raise
            fd, path = tempfile.mkstemp(prefix="smtp-", dir=work_base)
            os.unlink(path)
        # unbuffered: the reader hands over what one recv gave (up to 64 KiB), and
        # a buffered file lseeks at open, flush and close and around each read
        # back (edit_spool, the forward): 7 calls a message
        self.spool = open(fd, "w+b", buffering=0)  # noqa: SIM115 (closed in close_spool)
        return self._write

    def _write(self, data: bytes) -> None:
        if self.spool_error is not None or self.spool is None:
            return
        view = memoryview(data)
        try:
            while view:  # a raw write may take part of it (the disk filling up)
                written = self.spool.write(view)
                if not written:
                    raise OSError(errno.ENOSPC, "the spool took nothing")
                view = view[written:]
        except OSError as err:  # disk full: the client hears 451 at the end of DATA
            self.spool_error = err

    def close_spool(self, keep: bool = False) -> BinaryIO | None:
        """The spool goes; with `keep`, emptied and returned for the
        connection's next message instead (an O_TMPFILE made and freed costs
        30 us of CPU on ext4 and serialises the workers on the file system's
        orphan list; a truncate half that), if it was never mapped (at most
        window.MAP_ABOVE bytes, pipeline.read_message: no mapping can outlive
        its emptying). Closed (None) when it was bigger or cannot be emptied."""
        spool, self.spool = self.spool, None
        if spool is None:
            return None
        if keep and self.spool_error is None:
            try:
                if os.fstat(spool.fileno()).st_size <= window.MAP_ABOVE:
                    spool.truncate(0)
                    if spool.seek(0) == 0:
                        return spool
            except OSError:
                pass
        try:
            spool.close()
        except OSError:
            pass
        return None


class Filter:
    """Pipeline, then the next hop, then the reply (one line, or one a recipient)."""

    def __init__(self, handler: Handler, lmtp: bool):
        self.handler = handler
        self.lmtp = lmtp
        config = handler.config
        self.work_base = config.work_base_path
        self.forward: Forwarder = forwarder(config.forward_method, config.forward_timeout,
                                            helo=config.hostname,
                                            keep_idle=config.forward_keep_idle)

    def run(self, transaction: Transaction, size: int, client: dict[str, str]) -> bytes:
        # The message's one log line waits for the next hop's answer (its queue
        # id, or why not), and is written however this ends.
        with logs.HeldLine() as line:
            return self.check_and_answer(transaction, size, client, line)

    def check_and_answer(self, transaction: Transaction, size: int, client: dict[str, str],
                         line: logs.HeldLine) -> bytes:
        log_id = self.handler.next_log_id()
        spool = transaction.spool
        assert spool is not None
        if transaction.spool_error is not None or not _flushed(spool):
            log.error("(%s) cannot spool the message: %s", log_id,
                      transaction.spool_error or "flush failed")
            return self.answer_all(transaction, self.tempfail(log_id, failures.LOCAL_PROBLEM))
        xf = transaction.xforward
        envelope = Envelope(
            sender=transaction.sender or "<>", recipients=list(transaction.recipients),
            queue_id=xf.get("IDENT", ""), client_address=xf.get("ADDR", "") or client["peer"],
            client_name=xf.get("NAME", ""), helo_name=xf.get("HELO", "") or client["helo"],
            protocol_name=xf.get("PROTO", "") or client["protocol"])
        job = Job(log_id=log_id, mail_path=f"{self.work_base}/(smtp {log_id})",
                  envelope=envelope, mail_fd=spool.fileno())
        result = self.handler.handle_message(job)
        destinies = self.destinies(transaction, envelope, result)
        passing = [r for r in transaction.recipients if destinies[r] is Destiny.PASS]
        if not self.lmtp and Destiny.TEMPFAIL in destinies.values():  # an Enum: == is identity
            # one reply for all: nothing goes out, or the retry duplicates it
            return reply(*self.destiny_reply(Destiny.TEMPFAIL, result))
        outcome: Handed | ForwardError | None = None
        if passing:
            outcome = self.hand_over(transaction, passing, spool, size, result, line)
        if self.lmtp:
            return b"".join(reply(*self.recipient_reply(r, destinies[r], result, outcome))
                            for r in transaction.recipients)
        if isinstance(outcome, Handed) and outcome.refused and not self.bounced(
                transaction, envelope, outcome, result):
            return reply(*self.tempfail(log_id, failures.RELAY_TEMPFAIL))
        return reply(*self.one_reply(transaction, destinies, result, outcome))

    def bounced(self, transaction: Transaction, envelope: Envelope, handed: Handed,
                result: Result) -> bool:
        """One reply for all, and the next hop refused some for good while it
        took the others: we bounce those (amavisd-new does), since our 250
        makes the MTA forget them. False when the bounce could not go out
        for now: then the whole message is retried (a duplicate for the
        others, never a refusal nobody hears of)."""
        assert transaction.spool is not None
        try:
            transaction.spool.seek(0)
            header = transaction.spool.read(MAX_HEADER)
            relay_dsn.bounce(self.handler.config, handed.refused, envelope, header,
                             result.log_id)
        except ForwardError as err:
            log.warning("(%s) bounce for %s refused by the next hop not sent: %s",
                        result.log_id, ", ".join(handed.refused), err)
            return not err.temporary
        except OSError as err:
            log.error("(%s) bounce not built, spool unreadable: %s", result.log_id, err)
            return False
        return True

    # -- deciding ----------------------------------------------------------------------

    def destinies(self, transaction: Transaction, envelope: Envelope,
                  result: Result) -> dict[str, Destiny]:
        """Each recipient's destiny: its own where the policy gave one, else the message's."""
        own = getattr(result, "recipient_destinies", None) or {}
        if result.destiny is Destiny.TEMPFAIL:
            own = {}  # we could not decide: for nobody
        return {r: own.get(e, own.get(r, result.destiny))
                for r, e in zip(transaction.recipients, envelope.recipients, strict=True)}

    def hand_over(self, transaction: Transaction, passing: list[str], spool: BinaryIO,
                  size: int, result: Result, line: logs.HeldLine) -> Handed | ForwardError:
        """Forward to the passing recipients; what came of it goes in the message's line."""
        params = Params(
            mail={k: v for k, v in transaction.params.items() if k != "SIZE"},
            rcpt={r: transaction.rcpt_params.get(r, {}) for r in passing},
            xforward=dict(transaction.xforward))
        try:
            data = edit_spool(spool, size, result.header_edits)
            handed = self.forward.hand_over(transaction.sender, passing, data, params=params,
                                            per_recipient=self.lmtp)
        except ForwardError as err:
            line.not_forwarded(result.log_id, self.forward_where(), str(err), err.temporary)
            return err
        except OSError as err:  # reading our own spool back
            line.not_forwarded(result.log_id, self.forward_where(),
                               f"reading the spool: {err}", True, logging.ERROR)
            return ForwardError(str(err), temporary=True)
        line.forwarded(result.log_id, handed.where, handed.reply, handed.queued_as,
                       handed.refused)
        return handed

    # -- replies -----------------------------------------------------------------------

    def destiny_reply(self, destiny: Destiny, result: Result) -> tuple[str, str, str]:
        if destiny is Destiny.BOUNCE:
            # After the queue we bounce ourselves (the DSN follows the reply),
            # so the MTA must not: amavisd-new's "250 2.5.0 Ok, id=..., BOUNCE".
            return "250", "2.5.0", f"Ok, id={result.log_id}, BOUNCE"
        table = REPLIES[destiny]
        return table.smtp, table.enhanced, table.text.format(log_id=result.log_id,
                                                             summary=result.summary())

    def tempfail(self, log_id: str, why: str) -> tuple[str, str, str]:
        metrics.tempfail(why)  # spooling or forwarding, beside the verdict's own
        table = REPLIES[Destiny.TEMPFAIL]
        return table.smtp, table.enhanced, table.text.format(log_id=log_id, summary=why)

    def failed(self, err: ForwardError, result: Result, said: str = "") -> tuple[str, str, str]:
        """A forward that did not go: the next hop's words if it said any
        (`said`: its reply for one recipient), else ours without the detail
        (that is in the log)."""
        if said or err.from_hop:
            code, enhanced, text = refusal(self.forward_where(), said or err.reply)
            if code[:1] in "45":
                return code, enhanced, text
        if err.temporary:
            return self.tempfail(result.log_id, failures.RELAY_TEMPFAIL)
        return "554", "5.4.0", f"Reject, id={result.log_id} - {failures.RELAY_REJECTED}"

    def forward_where(self) -> str:
        return getattr(self.forward, "where", "next hop")

    def recipient_reply(self, rcpt: str, destiny: Destiny, result: Result,
                        outcome: Handed | ForwardError | None) -> tuple[str, str, str]:
        if destiny is not Destiny.PASS:
            return self.destiny_reply(destiny, result)
        if isinstance(outcome, ForwardError):
            return self.failed(outcome, result, outcome.refused.get(rcpt, ""))
        assert outcome is not None
        if rcpt in outcome.accepted:
            return relayed(outcome.where, outcome.accepted[rcpt])
        said = outcome.refused.get(rcpt, "")
        code, enhanced, text = refusal(outcome.where, said)
        if not said or code.startswith("2"):  # no word for it: never a 250
            return self.tempfail(result.log_id, failures.RELAY_TEMPFAIL)
        return code, enhanced, text

    def one_reply(self, transaction: Transaction, destinies: dict[str, Destiny], result: Result,
                  outcome: Handed | ForwardError | None) -> tuple[str, str, str]:
        others = [d for d in destinies.values() if d is not Destiny.PASS]
        if outcome is None:  # nobody passes: the strictest destiny speaks
            worst = max(others, key=lambda d: _RANK[d])
            return self.destiny_reply(worst, result)
        if isinstance(outcome, ForwardError):
            return self.failed(outcome, result)
        code, enhanced, text = relayed(outcome.where, outcome.reply)
        notes = []
        if outcome.refused:  # 5xx only: per_recipient is off for SMTP; the line names them
            notes.append(f"{len(outcome.refused)} refused by the next hop")
        for destiny in sorted(set(others), key=lambda d: _RANK[d]):
            notes.append(f"{others.count(destiny)} {destiny.name}")
        if notes:
            text += ", but " + ", and ".join(notes)
        return code, enhanced, text

    def answer_all(self, transaction: Transaction, line: tuple[str, str, str]) -> bytes:
        return reply(*line) * (len(transaction.recipients) if self.lmtp else 1)


def refusal(where: str, said: str) -> tuple[str, str, str]:
    """The next hop's refusal passed on; its 421 becomes our 451: the next
    hop closing its channel is no reason for our client to drop ours."""
    code, enhanced, text = relayed(where, said)
    return ("451" if code == "421" else code), enhanced, text


_RANK = {Destiny.PASS: 0, Destiny.DISCARD: 1, Destiny.BOUNCE: 2, Destiny.REJECT: 3,
         Destiny.TEMPFAIL: 4}


def _flushed(spool: BinaryIO) -> bool:
    try:
        spool.flush()
        return True
    except OSError:
        return False
