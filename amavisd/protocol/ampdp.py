"""AM.PDP on the server side: requests in, verdicts out.

The byte-level codec lives in `amavisd_client.ampdp` (shared with the
client). This module turns a decoded block into a `Job`, maps each `Destiny`
onto `return_value`/`setreply`/`exit_code` in one table, and serves one
connection, request after request.

The Unix socket is a trust boundary (any local user in the daemon's group
may connect): a request's files are opened and checked by
`protocol.handover`, and a connection holds a worker for bounded time only:
`client_idle_timeout` before each request, `request_timeout` for a whole
request however slowly it trickles, `max_connection_requests` a connection,
and a client that does not read its replies is hung up on.

Every error a client can provoke is answered with a tempfail reply and a
clear reason, logged once a connection: the MTA keeps the mail, nothing is
dropped, and a flood of bad requests does not flood the log.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from amavisd.actions.release import ReleaseOutcome
from amavisd.beneath import Base, OutsideBase, components
from amavisd.envelope import Envelope, Job
from amavisd.policy.destinies import REPLIES
from amavisd.protocol.handover import (
    HandOver,
    RequestError,
    peer_uid,
    printable_path,
)
from amavisd.verdict import Destiny, HeaderEdit, Result
from amavisd_client.ampdp import Block, Decoder, encode_block

log = logging.getLogger("amavisd.ampdp")

MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass
class MessageRequest:
    job: Job
    tempdir: str | None
    remove_tempdir: bool
    mail_file: str | None = None  # None: the protocol's default, email.txt in tempdir


@dataclass
class SessionLimits:
    """How long, and for how many requests, one connection may hold a worker."""

    idle_timeout: float = 10.0  # connect or last reply -> first byte of the next request
    request_timeout: float = 30.0  # first byte of a request -> its end, however it trickles
    max_requests: int = 100  # requests answered on one connection
    work_base: str = ""  # the daemon's own dirs: no client path may lead there

    @classmethod
    def from_config(cls, config) -> SessionLimits:
        return cls(config.client_idle_timeout, config.request_timeout,
                   config.max_connection_requests, config.work_base_path)


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


class Session:
    """One client connection: read a request block, answer it, repeat until EOF.

    `process` runs the pipeline; `keep_going` lets a retiring worker close
    the connection after its current reply. `in_flight` is True between a
    complete request and its reply, so an aborted worker can still answer.
    """

    def __init__(self, conn: socket.socket, tempbase: str,
                 process: Callable[[Job], Result], next_log_id: Callable[[], str],
                 keep_going: Callable[[], bool], limits: SessionLimits | None = None,
                 release: Callable[[str, list[str], str], ReleaseOutcome] | None = None,
                 after_reply: Callable[[], None] | None = None):
        self.conn = conn
        self.release = release  # quarantine release, for request=release (amavisd-release)
        self.after_reply = after_reply  # work that must not delay a reply (notifications)
        self.tempbase = tempbase
        self.process = process
        self.next_log_id = next_log_id
        self.keep_going = keep_going
        self.limits = limits or SessionLimits()
        self.peer_uid = peer_uid(conn)  # None over TCP: nobody to check ownership against
        self.decoder = Decoder()
        self.pending: list[Block] = []
        self.in_flight: str | None = None  # log id of the request being worked on
        self.refused = 0  # requests refused on this connection (logged once)

    def serve(self) -> int:
        """Returns the number of requests answered."""
        answered = 0
        try:
            while answered < self.limits.max_requests:
                block = self.next_block()
                if block is None:
                    break
                answered += 1
                if not self._send(self.answer(block)):
                    break
                if self.after_reply is not None:
                    self.after_reply()
                if not self.keep_going():
                    break
        finally:
            if self.refused > 1:
                log.warning("%d more AM.PDP requests refused on this connection",
                            self.refused - 1)
        return answered

    def next_block(self) -> Block | None:
        """The next complete request, or None when the connection should end:
        EOF, idle past client_idle_timeout, a request not complete within
        request_timeout (from its first byte), or one too large (answered)."""
        if self.pending:
            return self.pending.pop(0)
        now = time.monotonic()
        idle_until = now + self.limits.idle_timeout
        # Bytes of the next request already here: its clock is running.
        request_until = now + self.limits.request_timeout if self.decoder.pending else None
        received = 0
        while not self.pending:
            deadline = request_until if request_until is not None else idle_until
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._hang_up(request_until is not None)
                return None
            self.conn.settimeout(remaining)
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                continue  # the deadline check above decides
            except OSError:
                return None
            if not data:
                return None
            if request_until is None:
                request_until = time.monotonic() + self.limits.request_timeout
            received += len(data)
            self.pending.extend(self.decoder.feed(data))
            if received > MAX_REQUEST_BYTES and not self.pending:
                self._send(self._refuse(self.next_log_id(), "request too large"))
                return None
        return self.pending.pop(0)

    def _hang_up(self, mid_request: bool) -> None:
        if mid_request:
            log.warning("AM.PDP request not complete within request_timeout (%gs): "
                        "closing the connection", self.limits.request_timeout)
        else:
            log.info("AM.PDP client idle for client_idle_timeout (%gs): closing the "
                     "connection", self.limits.idle_timeout)

    def answer(self, block: Block) -> bytes:
        """The reply to one request; never raises: whatever goes wrong, the
        client hears tempfail rather than a dropped connection."""
        log_id = self.next_log_id()
        self.in_flight = log_id
        try:
            request = block.get("request")
            if block.first_name != "request":
                return self._refuse(log_id, "the first attribute must be 'request'")
            if request in ("release", "requeue") and self.release is not None:
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
        avoid = [self.limits.work_base] if self.limits.work_base else []
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
                reply = reply_for(self.process(job))
            finally:
                handed.close()
            if message.remove_tempdir:
                handed.remove_tempdir(message.tempdir)
            return reply

    def answer_release(self, block: Block, log_id: str) -> bytes:
        """amavisd-release sends mail_id (and mail_file, the name it was given),
        secret_id, and optional recipient=... to override the original
        recipients. The secret travels inside the ReleaseRequest, which the
        worker passes on as the name; actions.release checks it."""
        from amavisd.actions.release import ReleaseRequest

        name = block.get("mail_file") or block.get("mail_id") or ""
        request = ReleaseRequest(os.path.basename(name), block.get("secret_id"))
        outcome = self.release(request, block.getall("recipient"), log_id)
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

    def _send(self, data: bytes) -> bool:
        """False when the reply could not be sent: the connection is over (a
        client that does not read its replies must not hold the worker)."""
        try:
            self.conn.settimeout(self.limits.idle_timeout)
            self.conn.sendall(data)
        except OSError as err:
            log.warning("AM.PDP client did not take its reply: %s",
                        err.strerror or type(err).__name__)
            return False
        return True

    def emergency_tempfail(self, reason: str) -> None:
        """Called from a dying worker: answer the request in flight, if any."""
        if self.in_flight is None:
            return
        try:
            self.conn.settimeout(1.0)
            self.conn.sendall(tempfail_reply(self.in_flight, reason))
        except OSError:
            pass

