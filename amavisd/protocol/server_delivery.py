"""AM.PDP delivery_care_of=server: the daemon forwards passed mail itself.

`amavisd-milter -D server` hands us the mail and drops its own copy when we
answer `return_value=discard`: we must then have given the mail to the next
hop (`forward_method`, the MTA's re-injection port) before we answer. The
answers are amavisd-new's (checked against 2.13 running side by side):

- passed and taken: `250 2.0.0 from MTA(smtp:[127.0.0.1]:10025): 250 2.0.0
  Ok: queued as ...`, return_value=discard, exit_code=99, no header edits
  (they are in the forwarded bytes);
- the next hop refused every recipient for good (5xx): its code, and
  `id=... - Rejected by next-hop MTA on relaying, from MTA(...): <its
  reply>`, return_value=reject, exit_code=69: the MTA bounces;
- taken for some, refused (5xx) for others: the 250 above with ", but 1
  REJECT", and we bounce the refused ones (`actions.relay_dsn`);
- anything temporary (next hop down, 4xx, timeout, a recipient tempfailed
  while others were taken, the bounce not sent): tempfail, the MTA keeps
  the mail and retries. Here we part with amavisd-new 2.13 on purpose: it
  answers a 4xx from the next hop with `setreply=450 ...` but
  `return_value=discard, exit_code=99` (one_response_for_all leaves the
  exit code unset), so the milter drops mail nobody has. A duplicate on a
  retry is better than a loss.
- not passed (discard, reject, tempfail): answered as for a client
  delivery, nothing forwarded.

What we forward is what we scanned: the message is read once, through the
descriptor checked at the trust boundary, into a private copy (a memfd)
that the pipeline reads and that is then forwarded, so a client that
rewrites its file after the scan cannot have us deliver other bytes with
our X-Virus-Scanned on top. Our header edits are applied to those bytes with
milter semantics (`actions.edits`, as the SMTP filter does), below a
Received: line of ours (`quarantine.resent`), as amavisd-new does. The copy
is made in the kernel and forwarded from the file, its edited header block
in front: a 50 MiB message is never read into the worker's memory here.

The message's one log line (`logs.HeldLine`) is held while its snapshot is
(`with snapshot:` spans the check and the forward), and says what the next
hop did: `queued_as: ID`, the recipients it refused, or why nothing went.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

from amavisd import failures, logs, metrics
from amavisd.actions import relay_dsn
from amavisd.actions.edits import MAX_HEADER, edit_bytes, edit_spool
from amavisd.actions.forward import ForwardError, Handed, Params, forwarder
from amavisd.actions.relayed import relayed
from amavisd.envelope import Envelope, bare_address
from amavisd.policy.destinies import REPLIES, Reply
from amavisd.protocol.handover import RequestError
from amavisd.quarantine import resent
from amavisd.verdict import Destiny, HeaderEdit, Result

log = logging.getLogger("amavisd.ampdp")

DEFAULT_FORWARD_METHOD = "smtp:[127.0.0.1]:10025"


class Snapshot:
    """The client's message read once into a private copy (a memfd nobody
    else holds), which the pipeline scans and which is then forwarded.

    A message over `limit` is not copied, but its size is: the pipeline gets
    a memfd of that size with nothing in it (sparse: it costs no memory),
    finds it too large and reads none of it (UNCHECKED). Handing it the
    client's descriptor instead would let the client shrink the file in
    between, have a clean message scanned, then write a virus of the same
    size for us to forward. Passed anyway (a postmaster's destiny for
    oversized mail), the client's file is forwarded unscanned, as such mail
    is, and only while it still has the size that made the verdict."""

    def __init__(self, client_fd: int, limit: int):
        self._client = client_fd
        self.size = _size(client_fd)
        self.oversized = self.size > limit
        # ENOMEM, EMFILE, EFBIG: our problem, an OSError for the caller
        self._private = os.memfd_create("amavisd-message", os.MFD_CLOEXEC)
        try:
            if self.oversized:
                os.ftruncate(self._private, self.size)
            else:  # in the kernel; the client's failures are RequestErrors
                _copy_all(self._client, self._private, self.size)
        except BaseException:
            os.close(self._private)
            self._private = -1
            raise
        self.fd = self._private
        self.line = logs.HeldLine()  # the message's log line, until it is forwarded

    def open(self) -> BinaryIO:
        """The message from its start, to be forwarded and closed: our copy,
        the bytes the pipeline scanned; or, over the limit (passed unscanned
        by a postmaster's destiny), the client's file if it still has the
        size it was judged by."""
        fd = self._client if self.oversized else self.fd
        try:
            if os.fstat(fd).st_size != self.size:
                raise OSError(0, "the message changed size")
            return os.fdopen(os.dup(fd), "rb")
        except OSError as err:
            raise RequestError(failures.MESSAGE_UNREADABLE,
                               f"cannot read the message: {err.strerror or err}") from None

    def bytes(self) -> bytes:
        """The whole message in memory (tests; delivery reads `open()`)."""
        with self.open() as fh:
            return fh.read()

    def __enter__(self) -> Snapshot:
        self.line.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.line.__exit__(exc_type, exc, tb)
        finally:
            if self._private >= 0:
                os.close(self._private)
                self._private = -1


def _size(fd: int) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as err:
        raise RequestError(failures.MESSAGE_UNREADABLE,
                           f"cannot stat the message: {err.strerror or err}") from None


def _copy_all(source: int, target: int, size: int) -> None:
    """The whole regular file behind `source`, which must be `size` bytes
    long and stay so meanwhile, copied into `target` in the kernel."""
    st = os.fstat(source)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError(failures.MESSAGE_UNREADABLE, "cannot read the message: "
                           "not a regular file")
    offset = 0
    while offset <= size:
        try:
            sent = os.sendfile(target, source, offset, size + 1 - offset)
        except OSError as err:
            if err.errno in (errno.ENOMEM, errno.ENOSPC, errno.EFBIG, errno.EMFILE):
                raise  # our memfd: our problem
            raise RequestError(failures.MESSAGE_UNREADABLE,
                               f"cannot read the message: {err.strerror or err}") from None
        if not sent:
            break
        offset += sent
    if offset != size or os.fstat(source).st_size != size:
        raise RequestError(failures.MESSAGE_UNREADABLE,
                           "cannot read the message: it changed size while being read")


@dataclass(frozen=True)
class Answer:
    """One AM.PDP answer: the setreply triple, and the row (return_value,
    exit_code) it goes with."""

    smtp: str
    enhanced: str
    text: str
    row: Reply


def edited(data: bytes, edits: list[HeaderEdit], received: resent.Field) -> bytes:
    """Our Received: on top, then our header edits as a milter MTA applies
    them (X-Virus-Scanned inserted at index 0 lands above the Received:)."""
    return edit_bytes(resent.prepend(data, [received]), edits)


def edited_stream(source: BinaryIO, size: int, edits: list[HeaderEdit],
                  received: resent.Field) -> BinaryIO:
    """`edited` for a message in a file: the same bytes, read as they go out."""
    source.seek(0)
    sample = source.read(1024)  # its first line says which line ends our Received: gets
    full = resent.prepend(sample, [received])
    return edit_spool(source, size, edits, top=full[:len(full) - len(sample)])


def _ascii(source: BinaryIO) -> bool:
    """Whether the message is 7-bit (else BODY=8BITMIME), read a block at a time."""
    source.seek(0)
    while block := source.read(256 * 1024):
        if not block.isascii():
            return False
    return True


class ServerDelivery:
    """Forward one passed message and say what to answer. `via` and
    `client` describe the AM.PDP connection for our Received: line."""

    def __init__(self, config, via: str = "unix socket", client: str = ""):
        self.config = config
        self.via, self.client = via, client
        method = getattr(config, "forward_method", None) or DEFAULT_FORWARD_METHOD
        timeout = getattr(config, "forward_timeout", None) or config["smtp_timeout"]
        self.forward = forwarder(method, timeout, getattr(config, "hostname", None) or None,
                                 getattr(config, "forward_keep_idle", 0.0) or 0.0)
        self.where = getattr(self.forward, "where", method)

    def deliver(self, result: Result, envelope: Envelope, data: bytes | BinaryIO,
                size: int | None = None) -> Answer:
        """Forward `data` (bytes, or a file of `size` bytes read from its start)."""
        log_id = result.log_id
        if isinstance(data, (bytes, bytearray)):
            data, size = io.BytesIO(data), len(data)
        assert size is not None
        recipients = [bare_address(r) for r in envelope.recipients]
        received = resent.received(log_id, recipients, via=self.via, client=self.client)
        eight_bit = not (_ascii(data) and edited(b"", result.header_edits, received).isascii())
        message = edited_stream(data, size, result.header_edits, received)
        try:
            handed = self.forward.hand_over(envelope.sender, recipients, message,
                                            params=self.params(envelope, eight_bit))
        except ForwardError as err:
            return self.not_taken(log_id, err)
        logs.held().forwarded(log_id, handed.where, handed.reply, handed.queued_as,
                              handed.refused)
        return self.taken(result, envelope, data, handed)

    def params(self, envelope: Envelope, eight_bit: bool) -> Params:
        xforward = {"NAME": envelope.client_name, "ADDR": envelope.client_address,
                    "HELO": envelope.helo_name, "PROTO": envelope.protocol_name,
                    "IDENT": envelope.queue_id}
        mail = {"BODY": "8BITMIME"} if eight_bit else {}
        return Params(mail=mail, xforward={k: v for k, v in xforward.items() if v})

    def taken(self, result: Result, envelope: Envelope, data: BinaryIO,
              handed: Handed) -> Answer:
        code, enhanced, text = relayed(handed.where, handed.reply)
        if handed.refused:  # 5xx only: a 4xx made the whole hand-over temporary
            text += f", but {len(handed.refused)} REJECT"
            try:
                data.seek(0)  # the bounce quotes the header block only
                relay_dsn.bounce(self.config, handed.refused, envelope, data.read(MAX_HEADER),
                                 result.log_id)
            except ForwardError as err:
                if err.temporary:  # as amavisd-new: "temporarily unable to send DSN"
                    log.warning("(%s) DSN for %s refused by %s not sent: %s; tempfail",
                                result.log_id, ", ".join(handed.refused), handed.where, err)
                    return self.tempfail(result.log_id, failures.RELAY_TEMPFAIL)
                log.warning("(%s) DSN for %s refused by %s not accepted: %s", result.log_id,
                            ", ".join(handed.refused), handed.where, err)
        return Answer(code, enhanced, text, REPLIES[Destiny.DISCARD])

    def not_taken(self, log_id: str, err: ForwardError) -> Answer:
        logs.held().not_forwarded(log_id, self.where, str(err), err.temporary)
        if err.temporary:
            return self.tempfail(log_id, failures.public_reason(err))
        code, enhanced, text = relayed(self.where, err.reply)
        if code[0] != "5":  # a permanent error must be said as one
            code, enhanced = "554", "5.0.0"
        if not getattr(err, "from_hop", True):  # our own words, with host or errno: log only
            return Answer(code, enhanced, f"id={log_id} - {failures.RELAY_FAILED}",
                          REPLIES[Destiny.REJECT])
        return Answer(code, enhanced, f"id={log_id} - {failures.RELAY_REJECTED}, {text}",
                      REPLIES[Destiny.REJECT])

    @staticmethod
    def tempfail(log_id: str, public: str) -> Answer:
        metrics.tempfail(public)  # after a passing verdict: the forward did not go
        row = REPLIES[Destiny.TEMPFAIL]
        return Answer(row.smtp, row.enhanced,
                      row.text.format(log_id=log_id, summary=f"TEMPFAIL: {public}"), row)
