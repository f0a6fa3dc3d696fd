"""The pipeline keeps mail in the store it is given, or in the one
`quarantine_store` names: it builds no store of its own. Real clamd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.quarantine import QuarantineError
from amavisd.testing.eicar import EICAR
from amavisd.verdict import Destiny
from tests.unit.test_quarantine_store import MemoryStore

pytestmark = pytest.mark.integration

MESSAGE = (b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: eicar\r\n"
           b"Message-ID: <store-test@example.test>\r\n\r\n" + EICAR + b"\r\n")


@pytest.fixture
def settings(clamd_nodecomp, tmp_path: Path):
    return {"clamd": clamd_nodecomp.address, "backup_scanners": [],
            "quarantine_dir": str(tmp_path / "q"), "notify_method": "smtp:127.0.0.1:9"}


def process(pipeline: Pipeline, tmp_path: Path):
    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE)
    return pipeline.process(Job(log_id="s-1", mail_path=str(path), envelope=Envelope(
        sender="alice@example.test", recipients=["bob@example.test"])))


def test_mail_is_kept_where_quarantine_store_says(settings, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    pipeline = Pipeline(configuration.load(None, settings
                                           | {"quarantine_store": f"file:{elsewhere}"}))
    result = process(pipeline, tmp_path)
    assert result.verdict == "INFECTED" and result.destiny is Destiny.DISCARD
    assert sorted(os.listdir(elsewhere)) == [result.quarantine_id, f"{result.quarantine_id}.json"]
    assert (elsewhere / result.quarantine_id).read_bytes() == MESSAGE
    assert not (tmp_path / "q").exists()


def test_a_store_handed_in_is_the_one_used(settings, tmp_path: Path):
    store = MemoryStore("handed-in")
    result = process(Pipeline(configuration.load(None, settings), quarantine=store), tmp_path)
    [entry] = store.list()
    assert result.quarantine_id == f"virus-{entry.id}"
    assert store.message(entry) == MESSAGE and entry.viruses == result.viruses
    assert not (tmp_path / "q").exists()


class StoreThatFails(MemoryStore):
    """Fault double: a store that cannot take the message (a database down)."""

    def store(self, message, envelope, result):
        raise QuarantineError("connection refused")


def test_mail_no_store_could_take_is_tempfailed(settings, tmp_path: Path):
    pipeline = Pipeline(configuration.load(None, settings), quarantine=StoreThatFails("down"))
    result = process(pipeline, tmp_path)
    assert result.destiny is Destiny.TEMPFAIL and result.category is None
    assert result.tempfail_reason == "quarantine memory:down: connection refused"
