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

Every error a client can provoke is answered as amavisd-new answers a
request it cannot act on, "450 4.5.0 Failure: request refused: <which
rule>" (return_value=tempfail, exit_code=75), logged once a connection: the
MTA keeps the mail, nothing is dropped, and a flood of bad requests does not
flood the log. Replies name the class of a failure only, never a path,
errno or address (`amavisd.failures`); the detail is in the log line.

Requests, by their `request` attribute (`REQUESTS`): AM.PDP (a message to
check; with delivery_care_of=server we also forward it, see
`protocol.server_delivery`), release and requeue (quarantine.release), and
report, amavisd-new's spam/abuse reporting, which this server does not do:
it is refused the way amavisd-new refuses what is not enabled.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from amavisd import failures
from amavisd.actions.edits import milter_edits
from amavisd.beneath import OutsideBase, components, held
from amavisd.envelope import Envelope, Job
from amavisd.policy.destinies import REFUSED, REPLIES
from amavisd.protocol import session
from amavisd.protocol.handover import (
    HandOver,
    RequestError,
    peer_uid,
    printable_path,
)
from amavisd.protocol.server_delivery import Answer, ServerDelivery, Snapshot
from amavisd.protocol.session import Handler
from amavisd.quarantine.release import ReleaseOutcome, ReleaseRequest
from amavisd.verdict import Destiny, HeaderEdit, Result
from amavisd_client.wire.ampdp import Block, Decoder, encode_block

log = logging.getLogger("amavisd.ampdp")

MAX_REQUEST_BYTES = 4 * 1024 * 1024
CARE_OF = ("client", "server")  # delivery_care_of: who delivers a passed message


@dataclass
class MessageRequest:
    job: Job
    tempdir: str | None
    remove_tempdir: bool
    mail_file: str | None = None  # None: the protocol's default, email.txt in tempdir
    care_of_server: bool = False  # delivery_care_of=server: we forward passed mail


def within(path: str, tempbase: str, what: str, real: str | None = None) -> str:
    """`path` spelled from the temp base: absolute, strictly below it, no `.`,
    `..` or empty component. Lexical: what the path leads to is checked when
    it is opened, component by component (amavisd.beneath). `real`: the temp
    base's realpath, when the caller knows it (clients may use either name)."""
    base = os.path.normpath(tempbase)
    try:
        names = components(path, base, real or os.path.realpath(base))
    except OutsideBase as err:
        raise RequestError(failures.refused(f"{what} is outside the temp base"),
                           f"{what} {printable_path(path)} is outside the temp base "
                           f"{tempbase} ({err})") from None
    return os.path.join(base, *names)


def parse_message_request(block: Block, tempbase: str, log_id: str,
                          real: str | None = None) -> MessageRequest:
    if block.errors:
        more = block.error_count - 3
        # the codec's words about the client's own bytes: nothing of ours
        raise RequestError(failures.refused(f"protocol error: {block.errors[0][:100]}"),
                           "protocol error: " + "; ".join(block.errors[:3])
                           + (f" (and {more} more)" if more > 0 else ""))
    first = block.firsts()  # each attribute's first value, as block.get gives it
    tempdir_raw = first.get("tempdir")
    mail_file_raw = first.get("mail_file")
    if not tempdir_raw and not mail_file_raw:
        raise RequestError(failures.refused("request names neither tempdir nor mail_file"))
    tempdir = within(tempdir_raw, tempbase, "tempdir", real) if tempdir_raw else None
    mail_file = within(mail_file_raw, tempbase, "mail_file", real) if mail_file_raw else None
    care_of = (first.get("delivery_care_of") or "client").lower()
    if care_of not in CARE_OF:
        raise RequestError(failures.refused("delivery_care_of must be client or server"),
                           f"delivery_care_of={printable_path(care_of)[:60]}")
    removed_by = first.get("tempdir_removed_by", "server")  # the protocol's default
    envelope = Envelope(
        sender=first.get("sender") or "<>",
        recipients=block.getall("recipient"),
        queue_id=first.get("queue_id") or "",
        client_address=first.get("client_address") or "",
        client_name=first.get("client_name") or "",
        helo_name=first.get("helo_name") or "",
        protocol_name=first.get("protocol_name") or "",
        policy_bank=first.get("policy_bank") or "",
    )
    mail_path = mail_file or os.path.join(tempdir, "email.txt")  # the protocol's default
    return MessageRequest(
        job=Job(log_id=log_id, mail_path=mail_path, envelope=envelope),
        tempdir=tempdir,
        remove_tempdir=removed_by == "server" and tempdir is not None,
        mail_file=mail_file,
        care_of_server=care_of == "server",
    )


Attributes = list[tuple[str, str | list[str]]]


def encode_reply(log_id: str, destiny: Destiny, summary: str,
                 edits: list[HeaderEdit] | None = None) -> bytes:
    reply = REPLIES[destiny]
    attrs: Attributes = [("version_server", "2"), ("log_id", log_id)]
    attrs += milter_edits(edits or [])  # in the order a milter MTA applies them
    attrs.append(("return_value", reply.ampdp))
    text = reply.text.format(log_id=log_id, summary=summary)
    attrs.append(("setreply", [reply.smtp, reply.enhanced, text]))
    attrs.append(("exit_code", str(reply.exit_code)))
    return encode_block(attrs)


def reply_for(result: Result) -> bytes:
    return encode_reply(result.log_id, result.destiny, result.summary(), result.header_edits)


def tempfail_reply(log_id: str, reason: str) -> bytes:
    """A tempfail for what went wrong on our side; `reason` is a public class
    of failure (amavisd.failures), never a detail."""
    return encode_reply(log_id, Destiny.TEMPFAIL, f"TEMPFAIL: {reason}")


def refusal_reply(log_id: str, public: str) -> bytes:
    """amavisd-new's answer to a request it cannot act on: 450 4.5.0 Failure: ..."""
    return encode_block([("version_server", "2"), ("log_id", log_id),
                         ("setreply", [REFUSED.smtp, REFUSED.enhanced,
                                       REFUSED.text.format(log_id=log_id, summary=public)]),
                         ("return_value", REFUSED.ampdp),
                         ("exit_code", str(REFUSED.exit_code))])


def answer_reply(log_id: str, answer: Answer) -> bytes:
    """A message we forwarded ourselves (delivery_care_of=server): no header
    edits (they are in the forwarded bytes)."""
    return encode_block([("version_server", "2"), ("log_id", log_id),
                         ("setreply", [answer.smtp, answer.enhanced, answer.text]),
                         ("return_value", answer.row.ampdp),
                         ("exit_code", str(answer.row.exit_code))])


def release_reply(log_id: str, outcome: ReleaseOutcome) -> bytes:
    """amavisd-new's: the next hop's reply for each recipient, setreply lines
    only; a refusal or failure is one "450 4.5.0 Failure: ..." with
    return_value=tempfail and exit_code=75."""
    attrs: Attributes = [("version_server", "2"), ("log_id", log_id)]
    if outcome.replies:
        attrs += [("setreply", list(reply)) for reply in outcome.replies]
    else:
        attrs.append(("setreply", [outcome.smtp, outcome.enhanced, outcome.text]))
    if not outcome.ok and not outcome.replies:
        attrs += [("return_value", REFUSED.ampdp), ("exit_code", str(REFUSED.exit_code))]
    return encode_block(attrs)


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
    # seconds silent between requests, then closed if others wait for a worker
    # (protocol.loop): AM.PDP clients reconnect when they find it closed
    gives_way = 0.1
    # and right after a reply while others wait (a client never silent)
    yields_after_reply = True

    def __init__(self, conn: socket.socket, handler: Handler) -> None:
        super().__init__(conn, handler)
        self.tempbase = handler.config.tempbase_path
        self.work_base = handler.config.work_base_path
        # who owns the files a request names: SO_PEERCRED, or the owner of the
        # client's end of a loopback TCP connection; None: unknown, nobody to check
        self.peer_uid = peer_uid(conn)
        self.over_tcp = conn.family != socket.AF_UNIX
        self.decoder = Decoder()
        self.pending: list[Block] = []
        self.in_flight: str | None = None  # log id of the request being worked on
        self.refused = 0  # requests refused on this connection (logged once)
        self.tidy: tuple[HandOver, str] | None = None  # removal after the reply
        self.avoid = (self.work_base,) if self.work_base else ()

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
        return self._refuse(self.handler.next_log_id(),
                            RequestError(failures.refused("request too large")))

    def last_words(self, reason: str) -> bytes:
        return b"" if self.in_flight is None else tempfail_reply(self.in_flight, reason)

    def finish(self) -> None:
        self.after_reply()  # nothing left behind, whatever ended the connection
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
                return self._refuse(log_id, RequestError(
                    failures.refused("the first attribute must be 'request'")))
            answer = REQUESTS.get(request or "")
            if answer is None:
                return self._refuse(log_id, RequestError(failures.refused(
                    f"unsupported request {printable_path(request)[:40]!r}")))
            return answer(self, block, log_id)
        except Exception:
            log.exception("(%s) internal error handling an AM.PDP request", log_id)
            return tempfail_reply(log_id, failures.INTERNAL_ERROR)
        finally:
            self.in_flight = None

    def answer_message(self, block: Block, log_id: str) -> bytes:
        try:  # held open across requests; re-opened if the path names another dir now
            base, problem = held(self.tempbase, self.avoid), None
        except OSError as err:
            base, problem = None, err
        try:
            message = parse_message_request(block, self.tempbase, log_id,
                                            base.real if base else None)
        except RequestError as err:
            return self._refuse(log_id, err)
        if message.care_of_server and self.peer_uid is None:
            # we would deliver a file of anyone's to recipients the client names
            return self._refuse(log_id, RequestError(failures.refused(
                "delivery_care_of=server needs the client's uid (not found)")))
        if base is None:
            log.error("(%s) temp base %s unusable: %s", log_id, self.tempbase,
                      problem.strerror if problem else "")
            return tempfail_reply(log_id, failures.LOCAL_PROBLEM)
        handed = HandOver(base, self.peer_uid, self.over_tcp)
        try:
            try:
                handed.open(message.tempdir, message.mail_file, message.job.mail_path)
                if message.care_of_server:
                    reply = self.check_and_forward(message, handed.mail_fd)
                else:
                    job = Job(log_id=message.job.log_id, mail_path=message.job.mail_path,
                              envelope=message.job.envelope, mail_fd=handed.mail_fd)
                    reply = reply_for(self.handler.handle_message(job))
            except RequestError as err:
                return self._refuse(log_id, err)
            if message.remove_tempdir:
                # after the reply is sent (freeing the inodes can take
                # milliseconds on a busy disk), with the descriptors still held
                self.tidy = (handed, message.tempdir)
            return reply
        finally:
            if self.tidy is None:
                handed.close()

    def after_reply(self) -> None:
        """Remove the answered request's tempdir while its descriptor is still
        held: the identity it was checked under cannot pass to a new dir
        (inode reuse)."""
        if self.tidy is None:
            return
        handed, tempdir = self.tidy
        self.tidy = None
        try:
            handed.remove_tempdir(tempdir)
        finally:
            handed.close()

    def check_and_forward(self, message: MessageRequest, mail_fd: int) -> bytes:
        """delivery_care_of=server: scan a private copy of the message, and
        forward that very copy if it passes (protocol.server_delivery)."""
        log_id = message.job.log_id
        config = self.handler.config
        try:
            snapshot = Snapshot(mail_fd, config.max_message_size)
        except OSError as err:  # our memfd: memory, descriptors
            log.error("(%s) cannot copy the message: %s", log_id, err.strerror or err)
            return tempfail_reply(log_id, failures.LOCAL_PROBLEM)
        with snapshot:
            job = Job(log_id=log_id, mail_path=message.job.mail_path,
                      envelope=message.job.envelope, mail_fd=snapshot.fd)
            result = self.handler.handle_message(job)
            if result.destiny is not Destiny.PASS:  # nothing to forward
                return reply_for(result)
            via, client = self._where_from()
            delivery = ServerDelivery(config, via, client)
            with snapshot.open() as source:  # a RequestError is answered by our caller
                return answer_reply(log_id, delivery.deliver(result, job.envelope, source,
                                                             snapshot.size))

    def _where_from(self) -> tuple[str, str]:
        """How this connection reached us, for our Received: line."""
        if self.conn.family == socket.AF_UNIX:
            return "unix socket", ""
        try:
            return f"port {self.conn.getsockname()[1]}", self.conn.getpeername()[0]
        except OSError:
            return "tcp", ""

    def answer_release(self, block: Block, log_id: str) -> bytes:
        """amavisd-release sends mail_id (and mail_file, the name it was given),
        secret_id, and optional recipient=... to override the original
        recipients; other clients may add requested_by (the Resent-From:).
        The secret travels inside the ReleaseRequest, which the worker passes
        on as the name; quarantine.release checks it."""
        name = block.get("mail_file") or block.get("mail_id") or ""
        via, client = self._where_from()
        request = ReleaseRequest(os.path.basename(name), block.get("secret_id"),
                                 block.get("requested_by") or "", via, client)
        outcome = self.handler.handle_release(request, block.getall("recipient"), log_id)
        return release_reply(log_id, outcome)

    def answer_report(self, block: Block, log_id: str) -> bytes:
        """amavisd-new's request=report sends a spam/abuse report (ARF) about
        a quarantined message; we do no spam reporting, and say so as
        amavisd-new says that a feature is not enabled: 450 4.5.0 Failure."""
        return self._refuse(log_id, RequestError(
            "spam/abuse reporting (request=report) not enabled on this server"))

    def _refuse(self, log_id: str, err: RequestError) -> bytes:
        self.refused += 1
        if self.refused == 1:  # one log line a connection, however many bad requests
            log.warning("(%s) AM.PDP request refused: %s", log_id, err)
        return refusal_reply(log_id, err.public)


# request=... -> how it is answered (amavisd-new's names; any other is refused)
REQUESTS: dict[str, Callable[[Session, Block, str], bytes]] = {
    "AM.PDP": Session.answer_message,
    "release": Session.answer_release,
    "requeue": Session.answer_release,
    "report": Session.answer_report,
}
