"""AM.PDP on the server side: requests in, verdicts out.

The byte-level codec lives in `amavisd_client.wire.ampdp` (shared with the
client). This module turns a decoded block into a `Job`, maps each `Destiny`
onto `return_value`/`setreply`/`exit_code` in one table, and answers one
connection's requests as a sans-IO `Session` (registered as "ampdp" in
`protocol.registry`); `protocol.loop` drives it.

The Unix socket is a trust boundary (any local user in the daemon's group
may connect): a request's files are opened and checked by
`protocol.handover`, and a connection holds a worker for bounded time only
(`protocol.loop`: `client_idle_timeout` before each request,
`request_timeout` for a whole request however slowly it trickles,
`max_connection_requests` a connection; a client that does not read its
replies is hung up on).

Every error a client can provoke is answered with a tempfail reply and a
clear reason, logged once a connection: the MTA keeps the mail, nothing is
dropped, and a flood of bad requests does not flood the log.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from amavisd.beneath import Base, OutsideBase, components
from amavisd.envelope import Envelope, Job
from amavisd.policy.destinies import REPLIES
from amavisd.protocol import session
from amavisd.protocol.handover import (
    HandOver,
    RequestError,
    peer_uid,
    printable_path,
)
from amavisd.protocol.session import Handler
from amavisd.quarantine.release import ReleaseRequest
from amavisd.verdict import Destiny, HeaderEdit, Result
from amavisd_client.wire.ampdp import Block, Decoder, encode_block

log = logging.getLogger("amavisd.ampdp")

MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass
class MessageRequest:
    job: Job
    tempdir: str | None
    remove_tempdir: bool
    mail_file: str | None = None  # None: the protocol's default, email.txt in tempdir


def within(path: str, tempbase: str, what: str) -> str:
    """`path` spelled from the temp base: absolute, strictly below it, no `.`,
    `..` or empty component. Lexical: what the path leads to is checked when
    it is opened, component by component (amavisd.beneath)."""
    base = os.path.normpath(tempbase)
    try:
        names = components(path, base, os.path.realpath(base))
    except OutsideBase as err:
        raise RequestError(f"{what} {printable_path(path)} is outside the temp base "
                           f"{tempbase} ({err})") from None
    return os.path.join(base, *names)


def parse_message_request(block: Block, tempbase: str, log_id: str) -> MessageRequest:
    if block.errors:
        more = block.error_count - 3
        raise RequestError("protocol error: " + "; ".join(block.errors[:3])
                           + (f" (and {more} more)" if more > 0 else ""))
    tempdir_raw = block.get("tempdir")
    mail_file_raw = block.get("mail_file")
    if not tempdir_raw and not mail_file_raw:
        raise RequestError("request names neither tempdir nor mail_file")
    tempdir = within(tempdir_raw, tempbase, "tempdir") if tempdir_raw else None
    mail_file = within(mail_file_raw, tempbase, "mail_file") if mail_file_raw else None
    if block.get("delivery_care_of", "client") == "server":
        raise RequestError("delivery_care_of=server is not configured on this server")
    removed_by = block.get("tempdir_removed_by", "server")  # the protocol's default
    envelope = Envelope(
        sender=block.get("sender", "<>") or "<>",
        recipients=block.getall("recipient"),
        queue_id=block.get("queue_id", "") or "",
        client_address=block.get("client_address", "") or "",
        client_name=block.get("client_name", "") or "",
        helo_name=block.get("helo_name", "") or "",
        protocol_name=block.get("protocol_name", "") or "",
        policy_bank=block.get("policy_bank", "") or "",
    )
    mail_path = mail_file or os.path.join(tempdir, "email.txt")  # the protocol's default
    return MessageRequest(
        job=Job(log_id=log_id, mail_path=mail_path, envelope=envelope),
        tempdir=tempdir,
        remove_tempdir=removed_by == "server" and tempdir is not None,
        mail_file=mail_file,
    )


def header_attribute(edit: HeaderEdit) -> tuple[str, list[str]]:
    if edit.op == "insert":
        return "insheader", [str(edit.index), edit.name, edit.value]
    if edit.op == "add":
        return "addheader", [edit.name, edit.value]
    if edit.op == "change":
        return "chgheader", [str(edit.index), edit.name, edit.value]
    return "delheader", [str(edit.index), edit.name]


_HEADER_ORDER = {"delete": 0, "change": 1, "insert": 2, "add": 3}  # version 2 ordering


def encode_reply(log_id: str, destiny: Destiny, summary: str,
                 edits: list[HeaderEdit] | None = None) -> bytes:
    reply = REPLIES[destiny]
    attrs: list[tuple[str, str | list[str]]] = [("version_server", "2"), ("log_id", log_id)]
    for edit in sorted(edits or [], key=lambda e: _HEADER_ORDER[e.op]):
        attrs.append(header_attribute(edit))
    attrs.append(("return_value", reply.ampdp))
    text = reply.text.format(log_id=log_id, summary=summary)
    attrs.append(("setreply", [reply.smtp, reply.enhanced, text]))
    attrs.append(("exit_code", str(reply.exit_code)))
    return encode_block(attrs)


def reply_for(result: Result) -> bytes:
    return encode_reply(result.log_id, result.destiny, result.summary(), result.header_edits)


def tempfail_reply(log_id: str, reason: str) -> bytes:
    return encode_reply(log_id, Destiny.TEMPFAIL, reason)


class Session(session.Session):
    """One client connection: request blocks in, replies out, until EOF.

    `in_flight` holds the log id between a complete request and its reply,
    so an aborted worker can still answer (`last_words`). Settings come from
    the handler's config: the temp base requests must name their files in,
    and the work base no client path may lead to.
    """

    label = "AM.PDP"
    log = log
    max_request_bytes = MAX_REQUEST_BYTES

    def __init__(self, conn: socket.socket, handler: Handler) -> None:
        super().__init__(conn, handler)
        self.tempbase = handler.config.tempbase_path
        self.work_base = handler.config.work_base_path
        self.peer_uid = peer_uid(conn)  # None over TCP: nobody to check ownership against
        self.decoder = Decoder()
        self.pending: list[Block] = []
        self.in_flight: str | None = None  # log id of the request being worked on
        self.refused = 0  # requests refused on this connection (logged once)

    # -- what the loop asks ---------------------------------------------------

    def receive(self, data: bytes) -> None:
        self.pending.extend(self.decoder.feed(data))

    def request_ready(self) -> bool:
        return bool(self.pending)

    def mid_request(self) -> bool:
        return bool(self.decoder.pending)

    def answer(self) -> bytes:
        return self.answer_block(self.pending.pop(0))

    def oversize(self) -> bytes:
        return self._refuse(self.handler.next_log_id(), "request too large")

    def last_words(self, reason: str) -> bytes:
        return b"" if self.in_flight is None else tempfail_reply(self.in_flight, reason)

    def finish(self) -> None:
        if self.refused > 1:
            log.warning("%d more AM.PDP requests refused on this connection",
                        self.refused - 1)

    # -- answering ----------------------------------------------------------------

    def answer_block(self, block: Block) -> bytes:
        """The reply to one request; never raises: whatever goes wrong, the
        client hears tempfail rather than a dropped connection."""
        log_id = self.handler.next_log_id()
        self.in_flight = log_id
        try:
            request = block.get("request")
            if block.first_name != "request":
                return self._refuse(log_id, "the first attribute must be 'request'")
            if request in ("release", "requeue"):
                return self.answer_release(block, log_id)
            if request != "AM.PDP":
                return self._refuse(log_id, f"unsupported request {request!r}")
            return self.answer_message(block, log_id)
        except Exception as err:
            log.exception("(%s) internal error handling an AM.PDP request", log_id)
            return tempfail_reply(log_id, f"internal error: {type(err).__name__}")
        finally:
            self.in_flight = None

    def answer_message(self, block: Block, log_id: str) -> bytes:
        try:
            message = parse_message_request(block, self.tempbase, log_id)
        except RequestError as err:
            return self._refuse(log_id, str(err))
        avoid = [self.work_base] if self.work_base else []
        try:
            base = Base(self.tempbase, avoid)
        except OSError as err:
            log.error("(%s) temp base %s unusable: %s", log_id, self.tempbase, err.strerror)
            return tempfail_reply(log_id, f"temp base unusable: {err.strerror}")
        with base:
            handed = HandOver(base, self.peer_uid)
            try:
                try:
                    handed.open(message.tempdir, message.mail_file, message.job.mail_path)
                except RequestError as err:
                    return self._refuse(log_id, str(err))
                job = Job(log_id=message.job.log_id, mail_path=message.job.mail_path,
                          envelope=message.job.envelope, mail_fd=handed.mail_fd)
                reply = reply_for(self.handler.handle_message(job))
                if message.remove_tempdir:
                    # while its descriptor is still held: the identity it was
                    # checked under cannot pass to a new dir (inode reuse)
                    handed.remove_tempdir(message.tempdir)
            finally:
                handed.close()
            return reply

    def answer_release(self, block: Block, log_id: str) -> bytes:
        """amavisd-release sends mail_id (and mail_file, the name it was given),
        secret_id, and optional recipient=... to override the original
        recipients. The secret travels inside the ReleaseRequest, which the
        worker passes on as the name; quarantine.release checks it."""
        name = block.get("mail_file") or block.get("mail_id") or ""
        request = ReleaseRequest(os.path.basename(name), block.get("secret_id"))
        outcome = self.handler.handle_release(request, block.getall("recipient"), log_id)
        attrs: list[tuple[str, str | list[str]]] = [
            ("version_server", "2"), ("log_id", log_id),
            ("setreply", [outcome.smtp, outcome.enhanced, outcome.text]),
            ("exit_code", "0" if outcome.ok else "75" if outcome.temporary else "69")]
        return encode_block(attrs)

    def _refuse(self, log_id: str, reason: str) -> bytes:
        self.refused += 1
        if self.refused == 1:  # one log line a connection, however many bad requests
            log.warning("(%s) AM.PDP request refused: %s", log_id, reason)
        return tempfail_reply(log_id, reason)
