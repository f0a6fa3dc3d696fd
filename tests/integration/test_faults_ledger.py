"""The ledger's own check (tests/rigs/ledger.py): each way of breaking the
invariant is caught, so a fault test that passes means what it says.
No daemon: outcomes, a sink and a quarantine dir written by hand."""

from __future__ import annotations

import pytest

from amavisd.envelope import Envelope
from amavisd.quarantine.file import FileStore
from amavisd.verdict import Category, Destiny, Result
from tests.rigs.ledger import Ledger, batch, outcome_of_code

SCANNED = b"X-Virus-Scanned: by amavisd\r\n"


def ledger_of(*outcomes: str) -> Ledger:
    ledger = Ledger(batch(len(outcomes), "self", kinds=("clean", "eicar")))
    for mail, outcome in zip(ledger.mails, outcomes, strict=True):
        if outcome:
            ledger.record(mail, outcome, outcome)
    return ledger


def keep(tmp_path, mail) -> None:
    """A complete entry, as the daemon's store makes it (the ledger counts
    what a release could send)."""
    FileStore(str(tmp_path)).store(mail.data, Envelope("<a@ledger.test>", ["<b@ledger.test>"]),
                                   Result(log_id="l-1", category=Category.INFECTED,
                                          destiny=Destiny.DISCARD))


def test_a_sound_run_passes_with_its_counts(tmp_path):
    ledger = ledger_of("tempfail", "passed")
    clean, virus = ledger.mails
    ledger.record(clean, "passed", "250 on resend")
    keep(tmp_path, virus)
    counts = ledger.check(sink=[SCANNED + clean.data], quarantine=tmp_path)
    assert (counts.passed, counts.at_sink, counts.quarantined, counts.resent) == (2, 1, 1, 1)


@pytest.mark.parametrize("breach, expected", [
    ("virus at the sink", "passed unblocked"),
    ("twice at the sink", "delivered 2 times"),
    ("tempfail yet delivered", "told tempfail yet at the sink"),
    ("2xx and lost", "neither at the sink nor kept"),
    ("never answered", "never answered"),
    ("unscanned at the sink", "without X-Virus-Scanned"),
    ("resent after a final answer", "sent again after a final answer"),
    ("still tempfailed", "still tempfailed"),
])
def test_each_breach_is_caught(tmp_path, breach, expected):
    ledger = ledger_of("passed", "passed")
    clean, virus = ledger.mails
    sink, kept = [SCANNED + clean.data], [virus]
    strict = False
    if breach == "virus at the sink":
        sink.append(SCANNED + virus.data)
    elif breach == "twice at the sink":
        sink.append(SCANNED + clean.data)
    elif breach == "tempfail yet delivered":
        ledger.record(clean, "tempfail", "451")
    elif breach == "2xx and lost":
        kept = []
    elif breach == "never answered":
        ledger.told.pop(virus.mid)
    elif breach == "unscanned at the sink":
        sink = [clean.data]
    elif breach == "resent after a final answer":
        ledger.told[clean.mid].append(("passed", "250 again"))
    elif breach == "still tempfailed":
        ledger.record(virus, "tempfail", "451")
        strict = True
    for mail in kept:
        keep(tmp_path, mail)
    with pytest.raises(AssertionError, match=expected):
        ledger.check(sink=sink, quarantine=tmp_path, allow_tempfail=not strict)


def test_ampdp_discard_must_be_kept_and_continue_is_never_for_a_virus(tmp_path):
    ledger = ledger_of("passed", "discarded")
    with pytest.raises(AssertionError, match="discarded but not in the quarantine"):
        ledger.check(sink=None, quarantine=tmp_path)
    ledger = ledger_of("passed", "passed")
    with pytest.raises(AssertionError, match="passed unblocked"):
        ledger.check(sink=None, quarantine=tmp_path)


def test_a_message_file_without_its_sidecar_is_not_kept(tmp_path):
    """What a failed store leaves when its cleanup cannot unlink either."""
    ledger = ledger_of("passed", "discarded")
    (tmp_path / f"virus-{ledger.mails[1].mid[:8]}").write_bytes(ledger.mails[1].data)
    with pytest.raises(AssertionError, match="discarded but not in the quarantine"):
        ledger.check(sink=None, quarantine=tmp_path)
    keep(tmp_path, ledger.mails[1])
    assert ledger.check(sink=None, quarantine=tmp_path).quarantined == 1


def test_reply_codes():
    assert [outcome_of_code(c) for c in (250, 451, 554, 0, 421)] == [
        "passed", "tempfail", "rejected", "tempfail", "tempfail"]
