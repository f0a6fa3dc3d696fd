"""The quarantine store seam: `quarantine_store` picks the store, a new store
is one class and one `STORES` row (served by release and the CLI with no edit
of theirs), and a release tells the store what went out."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest

from amavisd import cli
from amavisd import config as configuration
from amavisd.config import ConfigError
from amavisd.envelope import Envelope
from amavisd.quarantine import STORES, open_store
from amavisd.quarantine.entry import (
    KINDS,
    QuarantineEntry,
    QuarantineError,
    UnknownEntry,
    new_id,
    new_secret,
    parse_id,
)
from amavisd.quarantine.file import FileStore
from amavisd.quarantine.release import release
from amavisd.quarantine.store import check_store_url
from amavisd.verdict import Category, Destiny, Finding, Result

RAW = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: kept\r\n\r\nbody\r\n"


class MemoryStore:
    """A second store, in memory, for tests: what a PostgreSQL store would
    keep in rows. Stores of the same name are one store (as a database is)."""

    named: dict[str, MemoryStore] = {}

    def __init__(self, name: str):
        self.name = name
        self.entries: dict[str, QuarantineEntry] = {}
        self.messages: dict[str, bytes] = {}
        self.released: list[tuple[str, list[str]]] = []

    @classmethod
    def from_url(cls, rest: str, config) -> MemoryStore:
        return cls.named.setdefault(rest, cls(rest))

    @property
    def location(self) -> str:
        return f"memory:{self.name}"

    def store(self, message, envelope: Envelope, result: Result) -> str:
        data = bytes(message) if isinstance(message, bytes) else Path(message).read_bytes()
        qid = new_id()
        self.entries[qid] = QuarantineEntry(
            id=qid, kind=KINDS[result.category], file=qid, gzip=False, size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), log_id=result.log_id,
            category=result.verdict, sender=envelope.sender,
            recipients=list(envelope.recipients), viruses=result.viruses, secret_id=new_secret())
        self.messages[qid] = data
        return qid

    def get(self, qid: str) -> QuarantineEntry:
        try:
            return self.entries[parse_id(qid)]
        except KeyError:
            raise UnknownEntry(f"no quarantined message with id {qid}") from None

    def message(self, entry: QuarantineEntry) -> bytes:
        return self.messages[entry.id]

    def list(self) -> list[QuarantineEntry]:
        return sorted(self.entries.values(), key=lambda e: (e.date, e.id))

    def mark_released(self, entry: QuarantineEntry, recipients) -> None:
        self.released.append((entry.id, list(recipients)))


@pytest.fixture
def memory(monkeypatch):
    """`memory:NAME` registered as a store kind for this test only."""
    monkeypatch.setitem(STORES, "memory", MemoryStore.from_url)
    monkeypatch.setattr(MemoryStore, "named", {})
    return MemoryStore


def infected() -> Result:
    return Result(log_id="7-1", category=Category.INFECTED, destiny=Destiny.DISCARD,
                  findings=[Finding("p001", "Eicar-Test-Signature", "clamd")])


def envelope() -> Envelope:
    return Envelope(sender="<alice@example.org>", recipients=["<bob@example.org>"])


def config(**values):
    return configuration.load(None, values)


# -- the setting ------------------------------------------------------------------------


def test_empty_means_a_file_store_in_quarantine_dir(tmp_path: Path):
    store = open_store(config(quarantine_dir=str(tmp_path / "q"), quarantine_gzip=True))
    assert isinstance(store, FileStore)
    assert (store.location, store.gzip) == (str(tmp_path / "q"), True)
    assert open_store(config(quarantine_dir="")) is None


@pytest.mark.parametrize("url", ["file:{}", "file://{}"])
def test_quarantine_store_wins_over_quarantine_dir(tmp_path: Path, url: str):
    elsewhere = tmp_path / "elsewhere"
    store = open_store(config(quarantine_dir=str(tmp_path / "q"),
                              quarantine_store=url.format(elsewhere)))
    assert isinstance(store, FileStore) and store.location == str(elsewhere)
    qid = store.store(RAW, envelope(), infected())
    assert sorted(os.listdir(elsewhere)) == [f"virus-{qid}", f"virus-{qid}.json"]
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("url", ["ftp:/var/virusmails", "file:relative/dir", "file:",
                                 "file://host/var/virusmails", "/var/virusmails", "memory:x"])
def test_a_mistaken_url_is_a_config_error_naming_the_setting(url: str):
    with pytest.raises(ConfigError, match="quarantine_store: must be"):
        open_store(config(quarantine_store=url))
    with pytest.raises(ValueError):
        check_store_url(url)


def test_the_validator_takes_what_open_store_takes(tmp_path: Path):
    assert check_store_url("") == ""
    assert check_store_url(f"file:{tmp_path}") == f"file:{tmp_path}"


# -- a second store: one registry row, no edit of release or the CLI --------------------


def test_release_and_the_cli_serve_a_store_registered_under_a_new_kind(memory, sink, capsys,
                                                                         tmp_path: Path):
    host, port = sink.address
    settings = {"quarantine_store": "memory:t", "release_method": f"smtp:[{host}]:{port}"}
    store = open_store(config(**settings))
    assert isinstance(store, MemoryStore)
    qid = store.store(RAW, envelope(), infected())

    outcome = release(config(**settings), f"virus-{qid}", [], "r-1",
                      secret=store.get(qid).secret_id)
    assert outcome.ok, outcome
    [got] = sink.wait(1)
    assert (got.mail_from, got.rcpt_tos) == ("alice@example.org", ["bob@example.org"])
    # the stored bytes, under amavisd-new's Resent-* block and our Received: line
    assert got.data.startswith(b"Resent-From: ") and got.data.endswith(RAW)
    assert b"\r\nReceived: from unknown by localhost (amavisd, unix socket) id " in got.data
    assert store.released == [(qid, ["<bob@example.org>"])]  # as the entry names them

    toml = tmp_path / "amavisd.toml"
    toml.write_text('[policy]\nquarantine_store = "memory:t"\n')
    assert cli.main(["quarantine", "-c", str(toml), "list"]) == 0
    assert f"virus-{qid}  " in capsys.readouterr().out
    assert cli.main(["quarantine", "-c", str(toml), "show", "--headers-only", qid]) == 0
    assert f"# secret_id: {store.get(qid).secret_id}" in capsys.readouterr().out


def test_a_release_that_sent_nothing_is_not_marked(memory):
    settings = {"quarantine_store": "memory:t", "release_method": "smtp:127.0.0.1:9"}
    store = open_store(config(**settings))
    qid = store.store(RAW, envelope(), infected())
    outcome = release(config(**settings), qid, [], "cli", local=True)
    assert not outcome.ok and outcome.temporary
    assert store.released == []


class StoreThatCannotRecord(MemoryStore):
    """Fault double: a store whose bookkeeping fails after the mail went out
    (a database gone away between the send and the update)."""

    def mark_released(self, entry, recipients):
        raise QuarantineError("the database went away")


def test_a_store_that_cannot_record_a_release_does_not_undo_it(monkeypatch, sink, caplog):
    monkeypatch.setitem(STORES, "broken", lambda rest, cfg: StoreThatCannotRecord.named
                        .setdefault(rest, StoreThatCannotRecord(rest)))
    monkeypatch.setattr(MemoryStore, "named", {})
    host, port = sink.address
    settings = {"quarantine_store": "broken:t", "release_method": f"smtp:[{host}]:{port}"}
    store = open_store(config(**settings))
    qid = store.store(RAW, envelope(), infected())
    caplog.set_level("INFO", logger="amavisd.release")
    outcome = release(config(**settings), qid, [], "cli", local=True)
    assert outcome.ok, outcome  # a 4xx would make the releaser send it a second time
    assert len(sink.wait(1)) == 1
    assert "did not record it: the database went away" in caplog.text


# -- the CLI -----------------------------------------------------------------------------


def test_the_cli_lists_the_store_quarantine_store_names(tmp_path: Path, capsys):
    elsewhere = tmp_path / "elsewhere"
    qid = FileStore(str(elsewhere)).store(RAW, envelope(), infected())
    toml = tmp_path / "amavisd.toml"
    toml.write_text(f'[policy]\nquarantine_dir = "{tmp_path / "q"}"\n'
                    f'quarantine_store = "file:{elsewhere}"\n')
    assert cli.main(["quarantine", "-c", str(toml), "list"]) == 0
    assert f"virus-{qid}  " in capsys.readouterr().out


def test_the_cli_says_when_no_quarantine_is_configured(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # once, the current directory was listed as the quarantine
    FileStore(str(tmp_path)).store(RAW, envelope(), infected())
    toml = tmp_path / "amavisd.toml"
    toml.write_text('[policy]\nquarantine_dir = ""\n')
    assert cli.main(["quarantine", "-c", str(toml), "list"]) == 1
    captured = capsys.readouterr()
    assert "no quarantine is configured" in captured.err and captured.out == ""
