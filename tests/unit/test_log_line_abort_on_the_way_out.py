"""A worker aborted (SIGABRT, child_timeout) while its held line is on its
way out still writes that line, once: the abort's handler runs between two
bytecodes of the interrupted code, which never resumes (os._exit), so at no
moment may the line be neither findable by the handler nor written."""

from __future__ import annotations

import logging

import pytest

from amavisd import logs
from amavisd.envelope import Envelope, Job
from amavisd.verdict import Category, Destiny, Result


class Died(BaseException):
    """os._exit in the handler: nothing after it runs."""


def job_and_result() -> tuple[Job, Result]:
    job = Job("6-01", "/x", Envelope(sender="a@example.test", recipients=["b@example.test"]))
    return job, Result(log_id="6-01", category=Category.CLEAN, destiny=Destiny.PASS, size=9)


@pytest.mark.parametrize("raised", [None, RuntimeError])
def test_an_abort_as_the_held_line_is_written_writes_it_once(caplog, monkeypatch, raised):
    original = logs.HeldLine.write
    aborted = []

    def abort_at_entry(self: logs.HeldLine) -> None:
        if not aborted:  # the signal is handled as write() starts (its RESUME)
            aborted.append(True)
            logs.write_held("worker aborted after child_timeout")  # worker.handle_abort
            raise Died
        original(self)

    monkeypatch.setattr(logs.HeldLine, "write", abort_at_entry)
    logger = logging.getLogger("amavisd.pipeline")
    with caplog.at_level(logging.INFO), pytest.raises(Died):
        with logs.HeldLine():
            logs.log_summary(logger, *job_and_result())
            if raised is not None:
                raise raised("on the way")
    [line] = caplog.records
    assert line.getMessage().startswith("(6-01) Passed CLEAN")
    assert "interrupted: worker aborted after child_timeout" in line.getMessage()
    assert getattr(logs._holding, "line", None) is None  # nothing left held in this thread
