"""One log line a message where we forward it ourselves (the SMTP/LMTP
filter, AM.PDP delivery_care_of=server): the pipeline's line, held until the
next hop answered, with amavisd-new's `queued_as: ID` in it, or the
recipients it refused, or why nothing went. Never two lines, never none:
not when the forward fails, times out or raises."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from amavisd import logs
from amavisd.actions.forward import SMTPForwarder
from amavisd.actions.outcome import Handed, queue_id
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import log_result
from amavisd.verdict import Category, Destiny, Result
from tests.rigs.nexthop import NextHop
from tests.rigs.smtp_standin import StandIn
from tests.unit.test_ampdp_server import encode_block, run_session
from tests.unit.test_ampdp_server import tempbase as tempbase  # noqa: F401 (the fixture)
from tests.unit.test_metrics_logs import log_setup as log_setup  # noqa: F401 (the fixture)
from tests.unit.test_smtp_listen import drive

MESSAGE = b"Message-ID: <m1@example.test>\r\nSubject: s\r\n\r\nhi\r\n.\r\n"


class Logging(StandIn):
    """The stand-in, writing the pipeline's own line for each message."""

    def __init__(self, *args, category: Category = Category.CLEAN, **kwargs):
        super().__init__(*args, **kwargs)
        self.category = category

    def handle_message(self, job: Job) -> Result:
        super().handle_message(job)
        result = Result(log_id=job.log_id, category=self.category, destiny=self.destiny,
                        size=42, elapsed_ms=3.0)
        log_result(job, result)  # what Pipeline.process ends with
        return result


def filter_at(tmp_path, hop: NextHop | str, **settings) -> Logging:
    forward = hop if isinstance(hop, str) else hop.spec
    base = StandIn.at(tmp_path, forward=forward, **settings)
    return Logging(base.config, Destiny.PASS, name="9")


def smtp(rcpts: list[str], messages: int = 1) -> bytes:
    one = (b"MAIL FROM:<alice@example.test>\r\n"
           + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n" + MESSAGE)
    return b"EHLO mta.test\r\n" + one * messages + b"QUIT\r\n"


def lines(caplog) -> list[logging.LogRecord]:
    """The records that speak of a message ("(9-01) ..."), in order."""
    return [r for r in caplog.records if r.getMessage().startswith(("(9-", "(7-"))]


def dead_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"smtp:[127.0.0.1]:{probe.getsockname()[1]}"


# -- the SMTP/LMTP filter --------------------------------------------------------------


def test_each_message_has_one_line_with_the_next_hops_queue_id(tmp_path, caplog):
    with NextHop(data_reply="250 2.0.0 Ok: queued as 4QXhop1") as hop, \
            caplog.at_level(logging.INFO):
        replies = drive(filter_at(tmp_path, hop), smtp(["bob@example.test"], messages=2))
    assert replies[-1] == b"221 2.0.0 Bye" and len(hop.messages) == 2
    assert replies[-2].endswith(b"250 2.0.0 Ok: queued as 4QXhop1")  # the reply is as it was
    one, two = lines(caplog)
    assert one.getMessage() == (
        "(9-01) Passed CLEAN {pass}, <alice@example.test> -> <bob@example.test>, "
        "size: 42, queued_as: 4QXhop1, 3 ms")
    assert two.getMessage().startswith("(9-02) Passed CLEAN {pass}")
    assert one.levelno == logging.INFO and one.name == "amavisd.pipeline"
    assert one.summary["queued_as"] == "4QXhop1" and one.summary["forwarded_to"] == hop.spec
    assert one.summary["forward_reply"] == "250 2.0.0 Ok: queued as 4QXhop1"
    assert not any("forwarded to" in r.getMessage() for r in caplog.records)


def test_a_next_hop_that_names_no_queue_id_is_named_itself(tmp_path, caplog):
    with NextHop(data_reply="250 2.0.0 Ok") as hop, caplog.at_level(logging.INFO):
        drive(filter_at(tmp_path, hop), smtp(["bob@example.test"]))
    [line] = lines(caplog)
    assert line.getMessage().endswith(f"size: 42, forwarded to {hop.spec}, 3 ms")
    assert line.summary["queued_as"] == "" and line.summary["forward_reply"] == "250 2.0.0 Ok"


def test_lmtp_with_several_recipients_one_line_their_ids_and_the_refused(tmp_path, caplog):
    with NextHop(lmtp=True, rcpt_replies={"carol@example.test": "550 5.1.1 unknown user"},
                 data_replies={"bob@example.test": "250 2.0.0 Ok: queued as B1",
                               "dave@example.test": "250 2.0.0 Ok: queued as D4",
                               "erin@example.test": "250 2.0.0 Ok: queued as B1"}) as hop, \
            caplog.at_level(logging.INFO):
        rcpts = ["bob@example.test", "carol@example.test", "dave@example.test",
                 "erin@example.test"]
        replies = drive(filter_at(tmp_path, hop), smtp(rcpts).replace(b"EHLO", b"LHLO"),
                        lmtp=True)
    assert [r[:3] for r in replies[-5:]] == [b"250", b"550", b"250", b"250", b"221"]
    [line] = lines(caplog)
    assert line.getMessage().endswith(
        "size: 42, queued_as: B1/D4, refused: <carol@example.test>: 550 5.1.1 unknown user, "
        "3 ms")
    assert line.levelno == logging.WARNING  # someone was refused
    assert line.summary["forward_refused"] == {"carol@example.test": "550 5.1.1 unknown user"}


@pytest.mark.parametrize("hop_settings, temporary, said", [
    ({"data_reply": "451 4.3.0 queue file write error"}, True, "451 4.3.0 queue file write"),
    ({"data_reply": "554 5.7.1 refused by policy"}, False, "554 5.7.1 refused by policy"),
    ({"drop_after": "DOT"}, True, "connection"),
])
def test_a_forward_refused_or_tempfailed_says_so_in_the_one_line(tmp_path, caplog,
                                                                  hop_settings, temporary, said):
    with NextHop(**hop_settings) as hop, caplog.at_level(logging.INFO):
        replies = drive(filter_at(tmp_path, hop), smtp(["bob@example.test"]))
    assert replies[-2][:1] == (b"4" if temporary else b"5")  # the reply is as it was
    [line] = lines(caplog)
    kind = "temporary" if temporary else "permanent"
    text = line.getMessage()
    assert f"size: 42, forwarding failed ({kind}): {hop.spec}: " in text
    assert said in text and line.levelno == logging.WARNING
    assert line.summary["forward_failed"] == kind and said in line.summary["forward_error"]


def test_a_next_hop_down_or_too_slow_still_gets_one_line(tmp_path, caplog):
    down = dead_port()
    with caplog.at_level(logging.INFO):
        replies = drive(filter_at(tmp_path, down), smtp(["bob@example.test"]))
    assert replies[-2].startswith(b"451 ")
    [line] = lines(caplog)
    assert (f"size: 42, forwarding failed (temporary): {down}: cannot connect: "
            "Connection refused, 3 ms") in line.getMessage()  # as the warning said it
    caplog.clear()
    with NextHop(data_delay=2.0) as hop, caplog.at_level(logging.INFO):
        replies = drive(filter_at(tmp_path, hop, forward_timeout=0.5), smtp(["b@example.test"]))
    assert replies[-2].startswith(b"451 ")
    [line] = lines(caplog)
    assert f"forwarding failed (temporary): {hop.spec}: " in line.getMessage()


def test_smtp_with_one_recipient_refused_names_it_in_the_line(tmp_path, caplog):
    with NextHop(rcpt_replies={"carol@example.test": "550 5.1.1 unknown user"},
                 data_reply="250 2.0.0 Ok: queued as C3") as hop, caplog.at_level(logging.INFO):
        handler = filter_at(tmp_path, hop, notify_method=hop.spec)  # the DSN goes there too
        replies = drive(handler, smtp(["bob@example.test", "carol@example.test"]))
    assert replies[-2].endswith(b"but 1 refused by the next hop")
    summary = [r for r in lines(caplog) if hasattr(r, "summary")]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert summary[0].getMessage().endswith(
        "queued_as: C3, refused: <carol@example.test>: 550 5.1.1 unknown user, 3 ms")
    others = [r.getMessage() for r in lines(caplog) if not hasattr(r, "summary")]
    assert others == ["(9-01) DSN sent to <alice@example.test> for carol@example.test "
                      "refused by the next hop"]  # the bounce: an event of its own


def test_a_forward_that_raises_still_writes_the_line_once(tmp_path, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(SMTPForwarder, "hand_over", broken)
    with NextHop() as hop, caplog.at_level(logging.INFO):
        replies = drive(filter_at(tmp_path, hop), smtp(["bob@example.test"]))
    assert replies[-1].startswith(b"421 4.3.0 ")  # the session's answer to a bug, as it was
    [line] = [r for r in lines(caplog) if hasattr(r, "summary")]
    assert line.getMessage().endswith("size: 42, interrupted: RuntimeError, 3 ms")
    assert line.levelno == logging.WARNING


def test_mail_not_passed_is_not_forwarded_and_has_its_one_line(tmp_path, caplog):
    with NextHop() as hop, caplog.at_level(logging.INFO):
        handler = filter_at(tmp_path, hop)
        handler.destiny, handler.category = Destiny.DISCARD, Category.INFECTED
        drive(handler, smtp(["bob@example.test"]))
    [line] = lines(caplog)
    assert line.getMessage().startswith("(9-01) Blocked ") and "forward" not in line.summary
    assert hop.messages == []


# -- AM.PDP delivery_care_of=server -----------------------------------------------------


def care_of_server(tempbase) -> bytes:
    return encode_block([("request", "AM.PDP"), ("tempdir", str(tempbase / "job")),
                         ("sender", "<a@x.test>"), ("recipient", "<b@x.test>"),
                         ("delivery_care_of", "server"), ("tempdir_removed_by", "client")])


def logged(destiny: Destiny = Destiny.PASS, category: Category = Category.CLEAN):
    def process(job: Job) -> Result:
        result = Result(log_id=job.log_id, category=category, destiny=destiny, size=15,
                        elapsed_ms=2.0)
        log_result(job, result)
        return result
    return process


def test_delivery_care_of_server_has_one_line_with_queued_as(tempbase, caplog):  # noqa: F811
    with NextHop(data_reply="250 2.0.0 Ok: queued as 4QXam1") as hop, \
            caplog.at_level(logging.INFO):
        replies, _ = run_session(tempbase, care_of_server(tempbase), process=logged(),
                                 settings={"forward_method": hop.spec})
    assert replies[0].get("return_value") == "discard"  # forwarded by us: as it was
    [line] = lines(caplog)
    assert line.getMessage() == ("(7-01) Passed CLEAN {pass}, <a@x.test> -> <b@x.test>, "
                                 "size: 15, queued_as: 4QXam1, 2 ms")
    assert line.summary["forwarded_to"] == hop.spec


def test_delivery_care_of_server_failures_say_so_in_the_one_line(tempbase, caplog):  # noqa: F811
    down = dead_port()
    with caplog.at_level(logging.INFO):
        replies, _ = run_session(tempbase, care_of_server(tempbase), process=logged(),
                                 settings={"forward_method": down})
    assert replies[0].get("return_value") == "tempfail"
    [line] = lines(caplog)
    assert f"size: 15, forwarding failed (temporary): {down}: cannot connect" \
        in line.getMessage()
    assert line.levelno == logging.WARNING
    caplog.clear()
    with NextHop(data_reply="554 5.7.1 no thanks") as hop, caplog.at_level(logging.INFO):
        replies, _ = run_session(tempbase, care_of_server(tempbase), process=logged(),
                                 settings={"forward_method": hop.spec})
    assert replies[0].get("return_value") == "reject"
    [line] = lines(caplog)
    assert f"forwarding failed (permanent): {hop.spec}: " in line.getMessage()
    assert "554 5.7.1 no thanks" in line.getMessage()


def test_delivery_care_of_server_not_passed_has_its_one_line(tempbase, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO):
        run_session(tempbase, care_of_server(tempbase),
                    process=logged(Destiny.DISCARD, Category.INFECTED))
    [line] = lines(caplog)
    assert line.getMessage().startswith("(7-01) Blocked INFECTED")


# -- the held line itself ---------------------------------------------------------------


def job_and_result() -> tuple[Job, Result]:
    job = Job("5-01", "/x", Envelope(sender="a@example.test", recipients=["b@example.test"]))
    return job, Result(log_id="5-01", category=Category.CLEAN, destiny=Destiny.PASS, size=9)


def test_a_worker_aborted_mid_forward_writes_the_held_line(caplog):
    logger = logging.getLogger("amavisd.pipeline")
    with caplog.at_level(logging.INFO), logs.HeldLine():
        logs.log_summary(logger, *job_and_result())
        assert caplog.records == []  # held
        logs.write_held("worker aborted after child_timeout")  # worker.handle_abort
    [line] = caplog.records  # and not again on the way out
    assert line.getMessage().endswith(", interrupted: worker aborted after child_timeout, 0 ms")


def test_facts_for_a_message_not_held_are_said_on_their_own(caplog):
    with caplog.at_level(logging.INFO):
        logs.held().forwarded("5-02", "smtp:[h]:25", "250 2.0.0 Ok: queued as Q", "Q", {})
        logs.held().not_forwarded("5-03", "smtp:[h]:25", "cannot connect", True)
    assert [r.getMessage() for r in caplog.records] == [
        "(5-02) forwarded to smtp:[h]:25: 250 2.0.0 Ok: queued as Q",
        "(5-03) forwarding failed (temporary): smtp:[h]:25: cannot connect"]


def test_the_json_record_carries_the_forward(tmp_path, log_setup):  # noqa: F811
    path = tmp_path / "amavisd.log"
    log_setup(log_file=str(path), log_format="json")
    with logs.HeldLine() as line:
        logs.log_summary(logging.getLogger("amavisd.pipeline"), *job_and_result())
        line.forwarded("5-01", "smtp:[h]:25", "250 2.0.0 Ok: queued as 4QX", "4QX",
                       {"c@example.test": "550 5.1.1 no"})
    [record] = [json.loads(text) for text in path.read_text().splitlines()]
    assert record["event"] == "message" and record["level"] == "warning"
    assert record["queued_as"] == "4QX" and record["forwarded_to"] == "smtp:[h]:25"
    assert record["forward_refused"] == {"c@example.test": "550 5.1.1 no"}


@pytest.mark.parametrize("reply, qid", [
    ("250 2.0.0 Ok: queued as 4QX1abcDEF", "4QX1abcDEF"),       # Postfix
    ("250 OK id=1tAbcD-000Abc-12", "1tAbcD-000Abc-12"),         # Exim
    ("250 2.0.0 4B8LbX9q012345 Message accepted for delivery", "4B8LbX9q012345"),  # Sendmail
    ("250 2.0.0 Ok", ""),
    ("250 2.0.0 Ok: queued as 4QX\r\nevil", "4QX"),
])
def test_the_queue_id_is_read_from_the_reply(reply, qid):
    assert queue_id(reply) == qid
    assert Handed("w", reply).queued_as == qid


def test_a_line_that_cannot_be_made_does_not_change_the_answer(monkeypatch, caplog):
    """Fault injected (a bug in summary_line: nothing real raises there on
    demand): the next hop has the message, so the held line's failure must
    not escape as our tempfail (the MTA would deliver it twice)."""
    def broken(fields):
        raise KeyError("a field nobody set")

    monkeypatch.setattr(logs, "summary_line", broken)
    with caplog.at_level(logging.INFO):
        with logs.HeldLine() as line:  # raised KeyError on the way out before
            logs.log_summary(logging.getLogger("amavisd.pipeline"), *job_and_result())
            line.forwarded("5-01", "smtp:[h]:25", "250 2.0.0 Ok: queued as Q", "Q", {})
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.getMessage() == "(5-01) the message's line could not be made"
