"""Logging set-up: syslog (facility mail) and/or stderr, plus an optional file.

`reopen()` (SIGUSR1) reopens the file and the syslog connection, for
logrotate and a restarted syslogd. It never kills the caller: the new file
is opened before the old one is closed, so when it cannot be (a directory
made unwritable, a symlink planted at the path) logging goes on into the old
file, and the failure is logged through whatever still works. When the
syslog socket (`syslog_socket`, /dev/log by default) is absent the syslog
target is skipped with one warning rather than failing the daemon.

Under systemd with both targets (the shipped default), stderr is the
journal (JOURNAL_STREAM names it) and so is /dev/log: every line would be in
the journal twice, and twice in mail.log where rsyslog takes the journal's,
double counted by log summarisers. Then syslog alone is used; stderr stays
when it is anything else (a terminal, a file) or when syslog is missing.

The log file is created 0640 (it names every quarantine id and address: not
for other users), given to the daemon's user when we are root, and never
opened through a symlink.

One line per message, amavisd-new's (`log_summary`), or with `log_format =
"json"` one JSON object per record for log shippers: the message's record
carries the same fields as the line, as fields; other records carry their
text. An ingress that forwards the message itself (the SMTP/LMTP filter,
AM.PDP delivery_care_of=server) holds the line back (`HeldLine`) until the
next hop has answered, so that the one line also says what became of the
message: amavisd-new's `queued_as: ID`, the recipients it refused, or why
nothing went. ASCII only (json escapes the rest), so a hostile address or
Message-ID can neither split a record nor forge one. Never a body, nor a
header beyond the Message-ID the line shows: not the Subject either (it is
content, often personal), nor an attachment's name unless it is why the
mail was BANNED, nor a secret_id (tests/integration/test_logs_no_content.py,
at log_level debug).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import stat
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from amavisd.envelope import Job, angled
from amavisd.verdict import Destiny, Result

_OURS = "_amavisd_handler"
FORMAT_STDERR = "%(asctime)s amavisd[%(process)d]: %(levelname)s %(message)s"
FORMAT_SYSLOG = "%(ident)s[%(process)d]: %(message)s"
LOG_FILE_MODE = 0o640

log = logging.getLogger("amavisd.logs")


class _IdentFilter(logging.Filter):
    def __init__(self, ident: str):
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        record.ident = self.ident
        return True


class LogFile(logging.FileHandler):
    """A FileHandler that creates its file 0640, refuses a symlink at the path,
    takes the world's bits off an existing file (ours, or any when root), and
    reopens without ever being left without a stream."""

    def __init__(self, path: str, owner: tuple[int, int] | None = None):
        self.owner = owner  # (uid, gid) to give a file we create as root
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")

    def _open(self):  # noqa: ANN202 (logging's own hook)
        # O_NONBLOCK: a FIFO planted at the path must not hang the daemon here.
        flags = (os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
                 | os.O_NONBLOCK)
        try:
            fd = os.open(self.baseFilename, flags | os.O_CREAT | os.O_EXCL, LOG_FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(self.baseFilename, flags)
            created = False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(f"{self.baseFilename} is not a regular file")
            os.set_blocking(fd, True)
            if created:
                os.fchmod(fd, LOG_FILE_MODE)  # whatever the umask
                if self.owner is not None and os.geteuid() == 0:
                    os.fchown(fd, *self.owner)
            elif info.st_mode & 0o037 and os.geteuid() in (0, info.st_uid):
                # nobody but us writes our log (the socket's group could forge lines)
                os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~0o037)
            if info.st_nlink > 1:
                raise OSError(f"{self.baseFilename} has {info.st_nlink} hard links; "
                              "refusing to append to a file that is also elsewhere")
            return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self) -> None:
        """Open the path again (logrotate moved the file); on failure keep the old
        stream and raise, so the caller can say so."""
        fresh = self._open()  # raises OSError, with the old stream untouched
        self.acquire()
        try:
            old, self.stream = self.stream, fresh
        finally:
            self.release()
        if old is not None:
            try:
                old.close()
            except OSError:
                pass


def stderr_is_journal() -> bool:
    """systemd connected our stderr to the journal: JOURNAL_STREAM is the
    "device:inode" of that stream, and fd 2 is still it (not redirected since)."""
    try:
        device, inode = (int(n) for n in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup(config: Mapping[str, Any], stderr: bool | None = None) -> None:
    """(Re)build our handlers on the root logger; safe to call again on reload.
    The new handlers are all made before the old ones go: if the log file
    cannot be opened, OSError is raised and the running set is kept."""
    targets = list(config["log_to"])
    handlers: list[logging.Handler] = []
    missing_syslog = False
    as_json = config.get("log_format", "text") == "json"
    plain = JsonFormatter() if as_json else logging.Formatter(FORMAT_STDERR)
    syslog_there = "syslog" in targets and os.path.exists(config["syslog_socket"])
    if stderr is None:
        stderr = "stderr" in targets and not (syslog_there and stderr_is_journal())
    if stderr:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(plain)
        handlers.append(h)
    if config["log_file"]:
        h = LogFile(config["log_file"], _owner(config))
        h.setFormatter(plain)
        handlers.append(h)
    if "syslog" in targets:
        address = config["syslog_socket"]
        if syslog_there:
            facility = logging.handlers.SysLogHandler.facility_names[config["syslog_facility"]]
            h = logging.handlers.SysLogHandler(address=address, facility=facility)
            h.addFilter(_IdentFilter(config["syslog_ident"]))
            h.setFormatter(JsonFormatter(syslog=True) if as_json
                           else logging.Formatter(FORMAT_SYSLOG))
            handlers.append(h)
        else:
            missing_syslog = True
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(config["log_level"].upper())
    for h in handlers:
        setattr(h, _OURS, True)
        root.addHandler(h)
    if missing_syslog:
        log.warning("syslog requested but no %s; logging without it", config["syslog_socket"])


# -- the line per message ------------------------------------------------------------

ACTIONS = {
    Destiny.PASS: "Passed",
    Destiny.DISCARD: "Blocked",
    Destiny.BOUNCE: "Blocked",
    Destiny.REJECT: "Blocked",
    Destiny.TEMPFAIL: "Tempfailed",
}


def summary_fields(job: Job, result: Result) -> dict[str, Any]:
    """What the line per message says, as fields (the JSON record's)."""
    env = job.envelope
    return {
        "log_id": job.log_id,
        "action": ACTIONS[result.destiny],
        "verdict": result.verdict,
        "reason": result.summary(),
        "destiny": result.destiny.value,
        "viruses": result.viruses,
        "banned": list(result.banned),
        "unchecked": [str(u) for u in result.unchecked],
        "policy_banks": list(result.policy_banks),
        "originating": result.originating,
        "client_address": env.client_address,
        "sender": env.sender,
        "recipients": list(env.recipients),
        "queue_id": env.queue_id,
        "message_id": result.headers.get("Message-ID", ""),
        "quarantine_id": result.quarantine_id,
        "size": result.size,
        "elapsed_ms": result.elapsed_ms,
    }


def summary_line(fields: Mapping[str, Any]) -> str:
    """amavisd-new's line: log id, what was done and why, the envelope, queue
    id, Message-ID, quarantine id, size, time."""
    parts = [f"({fields['log_id']}) {fields['action']} {fields['reason']}",
             f"{{{fields['destiny']}}}"]
    # amavisd-new's "%p" and "LOCAL": the banks applied (A/B), originating mail
    banks = f"{'/'.join(fields['policy_banks'])} " if fields["policy_banks"] else ""
    local = "LOCAL " if fields["originating"] else ""
    client = f"[{fields['client_address']}] " if fields["client_address"] else ""
    parts.append(f"{banks}{local}{client}{angled(fields['sender'])} -> "
                 + (",".join(angled(r) for r in fields["recipients"]) or "-"))
    if fields["queue_id"]:
        parts.append(f"Queue-ID: {fields['queue_id']}")
    if fields["message_id"]:
        parts.append(f"Message-ID: {fields['message_id']}")
    if fields["quarantine_id"]:
        parts.append(f"quarantine: {fields['quarantine_id']}")
    parts.append(f"size: {fields['size']}")
    if "forwarded_to" in fields:  # where amavisd-new has queued_as
        parts += forward_parts(fields)
    if fields.get("interrupted"):
        parts.append(f"interrupted: {fields['interrupted']}")
    parts.append(f"{fields['elapsed_ms']:.0f} ms")
    return ", ".join(parts[:1]) + " " + ", ".join(parts[1:])


def forward_parts(fields: Mapping[str, Any]) -> list[str]:
    """What the next hop did, for the line: its queue id, the recipients it
    refused, or why nothing went; where to when it named no queue id."""
    if fields["forward_failed"]:
        where, error = fields["forwarded_to"], fields["forward_error"]
        return [f"forwarding failed ({fields['forward_failed']}): "
                + (error if error.startswith(where) else f"{where}: {error}")]
    parts = [f"queued_as: {fields['queued_as']}" if fields["queued_as"]
             else f"forwarded to {fields['forwarded_to']}"]
    if fields["forward_refused"]:
        parts.append("refused: " + "; ".join(f"{angled(r)}: {why}" for r, why
                                             in fields["forward_refused"].items()))
    return parts


def log_summary(logger: logging.Logger, job: Job, result: Result) -> None:
    """The one record per message: the line, with its fields attached for
    the JSON format. A tempfail is a warning. Held back while the message's
    ingress forwards it (`HeldLine`)."""
    fields = summary_fields(job, result)
    level = logging.WARNING if result.destiny is Destiny.TEMPFAIL else logging.INFO
    held = getattr(_holding, "line", None)
    if held is not None and held.fields is None:
        held.logger, held.fields, held.level = logger, fields, max(held.level, level)
        return
    logger.log(level, "%s", summary_line(fields), extra={"summary": fields})


_holding = threading.local()  # the HeldLine of the request in hand, in this thread


class HeldLine:
    """The line of the message in hand, held back while its ingress forwards
    it, then written once with what the next hop did.

    A context manager around the check and the forward: the pipeline's line
    (`log_summary`) waits in it, `forwarded` or `not_forwarded` add the
    outcome, and on the way out, however it is left, the line is written,
    once. An exception on the way adds `interrupted: <its class>`; a worker
    killed for its deadline writes it from its abort handler
    (`write_held`). Holds nothing when no line comes (a request refused
    before its check): then nothing is written either."""

    def __init__(self) -> None:
        self.logger: logging.Logger | None = None
        self.fields: dict[str, Any] | None = None
        self.level = logging.INFO
        self.outer: HeldLine | None = None

    def __enter__(self) -> HeldLine:
        self.outer = getattr(_holding, "line", None)
        _holding.line = self
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Still findable while it is written: an abort handled meanwhile
        # (write_held, then os._exit) writes it, else it would be lost.
        try:
            if exc_type is not None:
                self.interrupt(exc_type.__name__)
            self.write()
        finally:
            _holding.line = self.outer

    def forwarded(self, log_id: str, where: str, reply: str, queued_as: str,
                  refused: Mapping[str, str]) -> None:
        """The next hop took the message (for some recipients at least)."""
        self.add(log_id, logging.WARNING if refused else logging.INFO, forwarded_to=where,
                 queued_as=queued_as, forward_reply=reply, forward_refused=dict(refused),
                 forward_failed="", forward_error="")

    def not_forwarded(self, log_id: str, where: str, error: str, temporary: bool,
                      level: int = logging.WARNING) -> None:
        """The next hop took nothing: `error` says why."""
        self.add(log_id, level, forwarded_to=where, queued_as="", forward_reply="",
                 forward_refused={}, forward_failed="temporary" if temporary else "permanent",
                 forward_error=error)

    def add(self, log_id: str, level: int, **facts: Any) -> None:
        """The forward's facts for the message's line; said on a line of
        their own when no line of that message is held (never lost)."""
        if self.fields is not None and self.fields["log_id"] == log_id:
            self.fields.update(facts)
            self.level = max(self.level, level)
            return
        said = (forward_parts(facts) if facts["forward_failed"] else
                [f"forwarded to {facts['forwarded_to']}: {facts['forward_reply']}",
                 *forward_parts(facts)[1:]])
        logging.getLogger("amavisd.logs").log(level, "(%s) %s", log_id, ", ".join(said))

    def interrupt(self, why: str) -> None:
        if self.fields is not None:
            self.fields["interrupted"] = why
            self.level = max(self.level, logging.WARNING)

    def write(self) -> None:
        """Never raises: it runs after the next hop took the message, where
        an exception would become our tempfail and the MTA's retry a second
        delivery. A line that cannot be made is said as a bug, with its id."""
        fields, self.fields = self.fields, None
        if fields is None or self.logger is None:
            return
        try:
            text = summary_line(fields)
        except Exception:  # noqa: BLE001 - a bug of ours must not change the answer
            log.exception("(%s) the message's line could not be made",
                          fields.get("log_id", "?"))
            return
        self.logger.log(self.level, "%s", text, extra={"summary": fields})


def held() -> HeldLine:
    """The HeldLine of the request in hand; one that holds nothing (its
    facts are then said on a line of their own) when there is none."""
    return getattr(_holding, "line", None) or HeldLine()


def write_held(why: str) -> None:
    """Write the held line now, saying why (a worker about to die mid-request)."""
    line = getattr(_holding, "line", None)
    while line is not None:
        line.interrupt(why)
        line.write()
        line = line.outer


class JsonFormatter(logging.Formatter):
    """One JSON object a record (log_format = "json"): time, level, pid,
    logger, and the message's fields or the record's text. For syslog, the
    object follows the usual `ident[pid]: ` prefix."""

    def __init__(self, syslog: bool = False):
        super().__init__()
        self.syslog = syslog

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created).astimezone()
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
        }
        summary = getattr(record, "summary", None)
        if isinstance(summary, Mapping):
            obj["event"] = "message"
            obj.update(summary)
        else:
            obj["message"] = record.getMessage()
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        text = json.dumps(obj, ensure_ascii=True, default=str)
        if self.syslog:
            return f"{getattr(record, 'ident', 'amavisd')}[{record.process}]: {text}"
        return text


def _owner(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The daemon's uid and gid, for a log file created before dropping root."""
    if not config["user"] or os.geteuid() != 0:
        return None
    from amavisd.privileges import PrivilegeError, resolve

    try:
        uid, gid, _ = resolve(config["user"], config["group"])
    except PrivilegeError:
        return None  # privileges.drop says so, and stops the start
    return uid, gid


def reopen() -> list[str]:
    """Reopen our log file and syslog connection. Never raises: a target that
    cannot be reopened keeps what it had, and the failure is logged (through
    the targets that still work) and returned."""
    failures = []
    for handler in logging.getLogger().handlers:
        if not getattr(handler, _OURS, False):
            continue
        if isinstance(handler, LogFile):
            try:
                handler.reopen()
            except OSError as err:
                failures.append(f"cannot reopen log file {handler.baseFilename}: {err}; "
                                "still writing to the file it had open")
        elif isinstance(handler, logging.handlers.SysLogHandler):
            try:
                handler.socket.close()
                handler._connect_unixsocket(handler.address)
            except OSError as err:
                failures.append(f"cannot reconnect to syslog at {handler.address}: {err}")
    for failure in failures:
        log.error("%s", failure)
    return failures


def preserved_fds() -> list[int]:
    """Descriptors our handlers use, for python-daemon's files_preserve."""
    fds = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        sock = getattr(handler, "socket", None)
        for obj in (stream, sock):
            try:
                fds.append(obj.fileno())
            except (AttributeError, OSError, ValueError):
                pass
    return fds
