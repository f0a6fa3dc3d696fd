"""Replies say nothing internal (issue 12, item 4).

A reply goes from us to the milter, the MTA and the sending client on the
Internet: it names the class of a failure ("virus scanner unavailable"),
and the detail (paths, errno, addresses) goes to the log line only. Real
parts where a failure can be had for real: a clamd socket nobody listens
on, a message file that is not there, a temp base that is not a directory.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd import failures
from amavisd.beneath import Base
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.protocol.ampdp import parse_message_request, tempfail_reply
from amavisd.protocol.handover import HandOver, RequestError
from amavisd.verdict import Destiny, Result
from amavisd_client.wire.ampdp import Block, Decoder

# Where each class of BY_CLASS_NAME lives: the table is keyed by name, so a
# rename must show up here rather than silently fall back to the vaguest class.
HOMES = {
    "ScannerError": "amavisd.scan.base",
    "MessageUnreadable": "amavisd.pipeline",
    "QuarantineFailed": "amavisd.pipeline",
    "QuarantineError": "amavisd.quarantine.entry",
    "ForwardError": "amavisd.actions.outcome",
    "WorkDirFailed": "amavisd.decode.registry",
    "MemoryError": "builtins",
    "OSError": "builtins",
}
INTERNALS = ("/", "Errno", "errno", "No such file", "nonexistent", "127.0.0.1", "uid ")


def block(*pairs: tuple[str, str]) -> Block:
    return Block([(k, v.encode()) for k, v in pairs])


def test_every_class_name_in_the_table_is_a_real_exception_class():
    assert set(HOMES) == set(failures.BY_CLASS_NAME)
    for name, module in HOMES.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, BaseException), name
        assert failures.public_reason(cls("x")) == failures.BY_CLASS_NAME[name]


def test_subclasses_take_their_parents_class_and_strangers_the_vaguest():
    from amavisd.quarantine.entry import UnknownEntry

    assert failures.public_reason(UnknownEntry("x")) == failures.QUARANTINE_UNAVAILABLE
    assert failures.public_reason(TimeoutError("t")) == failures.LOCAL_PROBLEM  # an OSError
    assert failures.public_reason(KeyError("k")) == failures.LOCAL_PROBLEM


def test_a_tempfail_result_shows_its_class_and_keeps_the_detail():
    result = Result(log_id="1-01")
    err = OSError(28, "No space left on device", "/var/lib/amavis/work/x")
    result.tempfail(failures.detail(err), failures.public_reason(err))
    assert result.destiny is Destiny.TEMPFAIL and result.category is None
    assert result.summary() == "TEMPFAIL: temporary local problem"
    assert "No space left" in result.tempfail_reason and "/var/lib" in result.tempfail_reason
    # a Result built by hand without a class says the vaguest one, never its detail
    bare = Result(log_id="1-02", tempfail_reason="clamd at unix:/x.sock: [Errno 2] ...")
    assert bare.summary() == f"TEMPFAIL: {failures.LOCAL_PROBLEM}"


def pipeline(tmp_path: Path, **settings) -> Pipeline:
    values = {"clamd": f"unix:{tmp_path}/nonexistent.sock", "backup_scanners": [],
              "quarantine_dir": "", "notify_method": "smtp:127.0.0.1:9"} | settings
    return Pipeline(configuration.load(None, values))


def test_a_dead_clamd_is_a_scanner_unavailable_reply_and_a_detailed_log_line(tmp_path, caplog):
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    with caplog.at_level(logging.INFO):
        result = pipeline(tmp_path).process(Job(log_id="9-01", mail_path=str(message),
                                                envelope=Envelope(recipients=["b@x.test"])))
    assert result.destiny is Destiny.TEMPFAIL
    assert result.summary() == "TEMPFAIL: virus scanner unavailable"
    reply = Decoder().feed(tempfail_reply("9-01", result.public_reason))[0].get("setreply")
    assert reply == "451 4.5.0 Temporary failure, id=9-01 - TEMPFAIL: virus scanner unavailable"
    assert not any(word in reply for word in INTERNALS)
    # the log line, with the log id, has what the postmaster needs
    logged = [r.getMessage() for r in caplog.records if "(9-01) tempfail" in r.getMessage()]
    assert len(logged) == 1 and "nonexistent.sock" in logged[0] and "cannot connect" in logged[0]
    assert "virus scanner unavailable" in logged[0]


def test_a_message_file_that_is_gone_is_unreadable(tmp_path):
    result = pipeline(tmp_path).process(Job(log_id="9-02", mail_path=str(tmp_path / "gone")))
    assert result.summary() == "TEMPFAIL: message file unreadable"
    assert str(tmp_path) in result.tempfail_reason


def test_a_quarantine_that_cannot_store_is_named_without_its_location(tmp_path):
    from amavisd.pipeline import QuarantineFailed

    result = Result(log_id="9-03")
    err = QuarantineFailed(f"quarantine {tmp_path}/q: Permission denied")
    result.tempfail(failures.detail(err), failures.public_reason(err))
    assert result.summary() == "TEMPFAIL: quarantine unavailable"


def test_request_refusals_name_the_rule_never_the_path(tmp_path):
    tempbase = tmp_path / "tmp"
    tempbase.mkdir()
    with pytest.raises(RequestError) as outside:
        parse_message_request(block(("request", "AM.PDP"), ("mail_file", "/etc/passwd")),
                              str(tempbase), "1-01")
    assert outside.value.public == "request refused: mail_file is outside the temp base"
    assert "/etc/passwd" in str(outside.value) and str(tempbase) in str(outside.value)

    (tempbase / "fifo").mkdir()
    os.mkfifo(tempbase / "fifo" / "email.txt")
    (tempbase / "other").mkdir()
    (tempbase / "link").mkdir()
    os.symlink("/etc/passwd", tempbase / "link" / "email.txt")
    cases = {
        "fifo": "request refused: mail_file is not a regular file",
        "other": failures.MESSAGE_UNREADABLE,  # no email.txt: missing
        "link": "request refused: mail_file: a symlink or a non-directory on the way",
    }
    with Base(str(tempbase), []) as base:
        for name, public in cases.items():
            handed = HandOver(base, None)
            with pytest.raises(RequestError) as refused:
                handed.open(str(tempbase / name), None, str(tempbase / name / "email.txt"))
            handed.close()
            assert refused.value.public == public, name
            assert str(tempbase) in str(refused.value)  # the detail, for the log
            assert not any(word in refused.value.public for word in INTERNALS), name


def test_a_file_of_another_user_is_refused_without_naming_the_uid(tmp_path):
    tempbase = tmp_path / "tmp"
    (tempbase / "job").mkdir(parents=True)
    (tempbase / "job" / "email.txt").write_bytes(b"x")
    with Base(str(tempbase), []) as base:
        handed = HandOver(base, os.getuid() + 1)  # the peer is someone else
        with pytest.raises(RequestError) as refused:
            handed.open(str(tempbase / "job"), None, str(tempbase / "job" / "email.txt"))
        handed.close()
    assert refused.value.public == "request refused: tempdir does not belong to the client"
    assert f"uid {os.getuid() + 1}" in str(refused.value)


def test_worker_tempfails_say_the_class(tmp_path):
    """The worker's own tempfails: a temp base that cannot be made, a bug."""
    from amavisd.worker import Worker

    home = tmp_path / "home"
    home.mkdir()
    (home / "tmp").write_bytes(b"a file where the temp base should be")
    config = configuration.load(None, {"workdir": str(home), "clamd": "unix:/nonexistent"})
    worker = Worker(1, 1, os.getppid(), config, [], heartbeat=_Beat())
    worker.pipeline = _Broken()
    result = worker.handle_message(Job(log_id="5-01", mail_path="/x"))
    assert "is not a directory" in result.tempfail_reason
    assert result.summary() == "TEMPFAIL: temporary local problem"
    (home / "tmp").unlink()
    result = worker.handle_message(Job(log_id="5-02", mail_path="/x"))
    assert result.summary() == "TEMPFAIL: internal error"
    assert result.tempfail_reason == "internal error: ZeroDivisionError"


class _Beat:
    """Stands in for the master's heartbeat file (not what is tested here)."""

    def notify(self) -> None:
        pass


class _Broken:
    """Fault: a pipeline with a bug in it."""

    def process(self, job: Job) -> Result:
        raise ZeroDivisionError("a bug")


def test_a_stuck_workers_last_words_name_the_timeout():
    from amavisd.protocol.ampdp import Session

    class Handler:
        config = configuration.load(None, {})

        def next_log_id(self) -> str:
            return "3-07"

    left, right = socket.socketpair()
    with left, right:
        session = Session(left, Handler())
        session.in_flight = "3-07"
        reply = Decoder().feed(session.last_words(failures.TIME_EXCEEDED))[0]
    assert reply.get("setreply") == ("451 4.5.0 Temporary failure, id=3-07 - TEMPFAIL: "
                                     "processing time exceeded (child_timeout)")
    assert reply.get("exit_code") == "75"
