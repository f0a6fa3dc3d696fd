"""AM.PDP on the server side: requests in, verdicts out.

The byte-level codec lives in `amavisd_client.ampdp` (shared with the
client). This module turns a decoded block into a `Job`, refuses file paths
outside the temp base (a local client must not make the daemon read
arbitrary files), maps each `Destiny` onto `return_value`/`setreply`/
`exit_code` in one table, and serves one connection, request after request.

Every error a client can provoke is answered with a tempfail reply and a
clear reason: the MTA keeps the mail, nothing is dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass

from amavisd.actions.release import ReleaseOutcome
from amavisd.envelope import Envelope, Job
from amavisd.policy.destinies import REPLIES
from amavisd.verdict import Destiny, HeaderEdit, Result
from amavisd_client.ampdp import Block, Decoder, encode_block

log = logging.getLogger("amavisd.ampdp")

MAX_REQUEST_BYTES = 4 * 1024 * 1024


class RequestError(Exception):
    """A request we refuse; the text goes back to the client in setreply."""


@dataclass
class MessageRequest:
    job: Job
    tempdir: str | None
    remove_tempdir: bool


def confine(path: str, tempbase: str, what: str) -> str:
    """Resolve `path` (symlinks included) and insist it lies strictly below tempbase."""
    if not path or not os.path.isabs(path) or "\0" in path:
        raise RequestError(f"{what} must be an absolute path")
    base = os.path.realpath(tempbase)
    real = os.path.realpath(path)
    if real == base or os.path.commonpath([real, base]) != base:
        raise RequestError(f"{what} {path} is outside the temp base {tempbase}")
    return real


def parse_message_request(block: Block, tempbase: str, log_id: str) -> MessageRequest:
    if block.errors:
        raise RequestError("protocol error: " + "; ".join(block.errors[:3]))
    tempdir_raw = block.get("tempdir")
    mail_file_raw = block.get("mail_file")
    if not tempdir_raw and not mail_file_raw:
        raise RequestError("request names neither tempdir nor mail_file")
    tempdir = confine(tempdir_raw, tempbase, "tempdir") if tempdir_raw else None
    if mail_file_raw:
        mail_file = confine(mail_file_raw, tempbase, "mail_file")
    else:
        mail_file = os.path.join(tempdir, "email.txt")  # the protocol's default
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
    return MessageRequest(
        job=Job(log_id=log_id, mail_path=mail_file, envelope=envelope),
        tempdir=tempdir,
        remove_tempdir=removed_by == "server" and tempdir is not None,
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
                 keep_going: Callable[[], bool], timeout: float,
                 release: Callable[[str, list[str], str], ReleaseOutcome] | None = None,
                 after_reply: Callable[[], None] | None = None):
        self.conn = conn
        self.release = release  # quarantine release, for request=release (amavisd-release)
        self.after_reply = after_reply  # work that must not delay a reply (notifications)
        self.tempbase = tempbase
        self.process = process
        self.next_log_id = next_log_id
        self.keep_going = keep_going
        self.timeout = timeout
        self.decoder = Decoder()
        self.in_flight: str | None = None  # log id of the request being worked on

    def serve(self) -> int:
        """Returns the number of requests answered."""
        answered = 0
        self.conn.settimeout(self.timeout)
        pending: list[Block] = []
        received = 0
        while True:
            while not pending:
                try:
                    data = self.conn.recv(65536)
                except (TimeoutError, OSError):
                    return answered
                if not data:
                    return answered
                received += len(data)
                pending.extend(self.decoder.feed(data))
                if received > MAX_REQUEST_BYTES and not pending:
                    log_id = self.next_log_id()
                    self._send(tempfail_reply(log_id, "request too large"))
                    return answered + 1
            block = pending.pop(0)
            received = 0
            self._send(self.answer(block))
            answered += 1
            if self.after_reply is not None:
                self.after_reply()
            if not self.keep_going():
                return answered

    def answer(self, block: Block) -> bytes:
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
            try:
                message = parse_message_request(block, self.tempbase, log_id)
            except RequestError as err:
                return self._refuse(log_id, str(err))
            try:
                return reply_for(self.process(message.job))
            finally:
                if message.remove_tempdir:
                    remove_tempdir(message.tempdir, self.tempbase)
        finally:
            self.in_flight = None

    def answer_release(self, block: Block, log_id: str) -> bytes:
        """amavisd-release sends mail_id (and mail_file, the name it was given),
        optional recipient=... to override the original recipients."""
        name = block.get("mail_file") or block.get("mail_id") or ""
        outcome = self.release(os.path.basename(name), block.getall("recipient"), log_id)
        attrs: list[tuple[str, str | list[str]]] = [
            ("version_server", "2"), ("log_id", log_id),
            ("setreply", [outcome.smtp, outcome.enhanced, outcome.text]),
            ("exit_code", "0" if outcome.ok else "75" if outcome.temporary else "69")]
        return encode_block(attrs)

    def _refuse(self, log_id: str, reason: str) -> bytes:
        log.warning("(%s) AM.PDP request refused: %s", log_id, reason)
        return tempfail_reply(log_id, reason)

    def _send(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError as err:
            log.warning("AM.PDP client went away before the reply: %s", err)

    def emergency_tempfail(self, reason: str) -> None:
        """Called from a dying worker: answer the request in flight, if any."""
        if self.in_flight is None:
            return
        try:
            self.conn.settimeout(1.0)
            self.conn.sendall(tempfail_reply(self.in_flight, reason))
        except OSError:
            pass


def remove_tempdir(tempdir: str | None, tempbase: str) -> None:
    if not tempdir:
        return
    try:
        confine(tempdir, tempbase, "tempdir")
    except RequestError:
        return
    shutil.rmtree(tempdir, ignore_errors=True)
