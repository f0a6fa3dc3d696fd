"""The line per message and log_format = "json": the amavisd-new line is
unchanged; the JSON record carries the same fields, one object a line,
ASCII only, and never a body or a header the line does not show."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from amavisd import config as configuration
from amavisd import logs
from amavisd.config import ConfigError
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.testing.messages import eicar_message
from amavisd.verdict import Category, Destiny, Finding, Result

BODY_MARK = "BODY-MUST-NOT-BE-LOGGED"
SUBJECT_MARK = "SUBJECT-MUST-NOT-BE-LOGGED"


@pytest.fixture
def log_setup():
    root = logging.getLogger()
    level = root.level

    def setup(**values) -> None:
        logs.setup(configuration.load(None, {"log_to": []} | values), stderr=False)

    yield setup
    for handler in list(root.handlers):
        if getattr(handler, logs._OURS, False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def infected() -> tuple[Job, Result]:
    job = Job(log_id="4242-07", mail_path="/nonexistent",
              envelope=Envelope(sender="a@example.org", recipients=["b@example.net",
                                                                    "c@example.net"],
                                queue_id="4XyZ1", client_address="192.0.2.1"))
    result = Result(log_id="4242-07", category=Category.INFECTED, destiny=Destiny.DISCARD,
                    findings=[Finding("p002", "Eicar-Test-Signature", "clamd")],
                    headers={"Message-ID": "<m1@example.org>", "Subject": SUBJECT_MARK},
                    quarantine_id="virus-SoNjnqTRIqwI", size=461, elapsed_ms=3.6,
                    policy_banks=("MYNETS",), originating=True)
    return job, result


def test_the_line_is_amavisd_news():
    job, result = infected()
    assert logs.summary_line(logs.summary_fields(job, result)) == (
        "(4242-07) Blocked INFECTED: Eicar-Test-Signature {discard}, MYNETS LOCAL "
        "[192.0.2.1] <a@example.org> -> <b@example.net>,<c@example.net>, Queue-ID: 4XyZ1, "
        "Message-ID: <m1@example.org>, quarantine: virus-SoNjnqTRIqwI, size: 461, 4 ms")
    bare = Result(log_id="1-01", category=None, destiny=Destiny.TEMPFAIL,
                  public_reason="virus scanner unavailable", elapsed_ms=12.4)
    assert logs.summary_line(logs.summary_fields(Job("1-01", "/x"), bare)) == (
        "(1-01) Tempfailed TEMPFAIL: virus scanner unavailable {tempfail}, <> -> -, "
        "size: 0, 12 ms")


def test_json_records_carry_the_lines_fields_and_nothing_of_the_body(tmp_path, log_setup):
    path = tmp_path / "amavisd.log"
    log_setup(log_file=str(path), log_format="json")
    job, result = infected()
    job.envelope.sender = "evil\n(1-99) Passed CLEAN {pass}@example.org"  # a forged line?
    logs.log_summary(logging.getLogger("amavisd.pipeline"), job, result)
    logging.getLogger("amavisd.master").warning("worker %d exited with status %d", 77, 1)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    record, other = (json.loads(line) for line in lines)
    assert record["event"] == "message" and record["level"] == "info"
    assert record["log_id"] == "4242-07" and record["verdict"] == "INFECTED"
    assert record["viruses"] == ["Eicar-Test-Signature"]
    assert record["recipients"] == ["b@example.net", "c@example.net"]
    assert record["quarantine_id"] == "virus-SoNjnqTRIqwI" and record["size"] == 461
    assert record["message_id"] == "<m1@example.org>" and record["pid"] == os.getpid()
    assert record["sender"].startswith("evil\n(1-99)")  # escaped in the line, not a new line
    assert set(record) >= set(logs.summary_fields(*infected()))
    assert SUBJECT_MARK not in path.read_text()
    assert other["message"] == "worker 77 exited with status 1" and other["level"] == "warning"
    assert path.read_text().isascii()


def test_json_through_the_pipeline_on_a_real_message(tmp_path, log_setup, clamd_nodecomp):
    """The pipeline's own record for a real message scanned by a real clamd
    (the pipeline's line goes through logs.log_summary)."""
    path = tmp_path / "amavisd.log"
    log_setup(log_file=str(path), log_format="json")
    message = eicar_message(subject=SUBJECT_MARK).replace(
        b"\n\n", f"\n\n{BODY_MARK}\n".encode(), 1)
    mail = tmp_path / "mail.eml"
    mail.write_bytes(message)
    cfg = configuration.load(None, {"clamd": clamd_nodecomp.address, "quarantine_dir": "",
                                    "backup_scanners": [], "log_format": "json"})
    Pipeline(cfg).process(Job(log_id="9-01", mail_path=str(mail),
                              envelope=Envelope(sender="a@example.org",
                                                recipients=["b@example.net"])))
    [record] = [json.loads(line) for line in path.read_text().splitlines()
                if json.loads(line).get("event") == "message"]
    assert record["verdict"] == "INFECTED" and record["destiny"] == "discard"
    assert record["viruses"] and record["size"] == len(message)
    assert BODY_MARK not in path.read_text() and SUBJECT_MARK not in path.read_text()


def test_json_to_syslog_keeps_the_ident_prefix(tmp_path, log_setup):
    address = str(tmp_path / "log.sock")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(address)
    syslog.settimeout(10)
    try:
        log_setup(log_to=["syslog"], syslog_socket=address, log_format="json")
        logs.log_summary(logging.getLogger("amavisd.pipeline"), *infected())
        datagram = syslog.recv(65536).decode()
    finally:
        syslog.close()
    prefix, _, text = datagram.partition(": ")
    assert prefix.endswith(f"amavisd[{os.getpid()}]") and prefix.startswith("<")
    assert json.loads(text.rstrip("\x00"))["quarantine_id"] == "virus-SoNjnqTRIqwI"


def test_text_stays_the_default_and_a_bad_format_is_a_config_error(tmp_path, log_setup):
    path = tmp_path / "amavisd.log"
    log_setup(log_file=str(path))
    logs.log_summary(logging.getLogger("amavisd.pipeline"), *infected())
    assert "Blocked INFECTED: Eicar-Test-Signature {discard}" in path.read_text()
    with pytest.raises(ConfigError, match="log_format"):
        configuration.load(None, {"log_format": "xml"})
