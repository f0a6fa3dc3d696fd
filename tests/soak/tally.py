# SPDX-License-Identifier: MIT
"""Count every soak message: what the client was told, what the sink and the quarantine got.

A reply is filed as one outcome: `delivered` (250 from the next hop's
words), `discarded:CAT` (250 "discarded"), `rejected:CAT` (5xx, CAT the
category our reply names) or `tempfail` (4xx, or the connection dropped:
the MTA keeps the mail and retries, as the sender threads do). The checks
are the invariant of issue 17: every message ends once; what was delivered
is at the sink exactly once and scanned; nothing else is at the sink; what
was rejected as infected or banned is in the quarantine exactly once.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from amavisd.quarantine.file import FileStore
from tests.rigs.smtpsink import SMTPSink, _Server
from tests.soak.mix import EXPECTED, Planned

__all__ = ["Record", "Tally", "Arrival", "SlimSink", "classify", "message_id", "quarantined"]

_MID = re.compile(rb"(?im)^Message-ID:[ \t]*<([^>\r\n]+)>")
_SCANNED = re.compile(rb"(?im)^X-Virus-Scanned:")
_CATEGORY = re.compile(r"\b(INFECTED|BANNED|UNCHECKED|TEMPFAIL)\b")
_VERDICT_LINE = re.compile(r"amavisd\[(\d+)\]: \w+ \(\d+-\d+\) (?:Passed|Blocked) "
                           r".*?Message-ID: <([^>\r\n]+)>")
BLOCKED = ("INFECTED", "BANNED")


def message_id(data: bytes) -> str:
    """The first Message-ID of the header block ("" if none)."""
    found = _MID.search(data.split(b"\r\n\r\n", 1)[0])
    return found.group(1).decode("ascii", "replace") if found else ""


def classify(code: int, text: str) -> str:
    if 400 <= code < 500 or code == 0:
        return "tempfail"
    category = _CATEGORY.search(text)
    cat = category.group(1) if category else "other"
    if 200 <= code < 300:
        return f"discarded:{cat}" if "discarded" in text else "delivered"
    return f"rejected:{cat}"


@dataclass
class Arrival:
    mid: str
    sender: str
    scanned: bool


class _SlimServer(_Server):
    """The test sink, keeping of each message only what the count needs; a
    connection reset (a worker killed while forwarding) is counted, not printed."""

    dropped = 0

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            self.dropped += 1
        else:
            super().handle_error(request, client_address)

    def keep(self, message) -> None:
        head = message.data.split(b"\r\n\r\n", 1)[0]
        super().keep(Arrival(message_id(head), message.mail_from,
                             bool(_SCANNED.search(head))))


class SlimSink(SMTPSink):
    def make_server(self) -> _SlimServer:
        return _SlimServer((self._host, 0), self._refuse)

    @property
    def dropped(self) -> int:
        return getattr(self._server, "dropped", 0)


@dataclass
class Record:
    planned: Planned
    final: str = ""
    text: str = ""
    tempfails: int = 0
    dropped: int = 0  # of the tempfails: the connection went (worker killed)


def quarantined(directory: str) -> tuple[dict[str, list[int]], list[str]]:
    """For each Message-ID in the complete entries of a file quarantine, the pids
    of the workers that stored it (from each entry's log id, "PID-N"); and the
    files no complete entry claims (a worker killed while quarantining)."""
    if not Path(directory).is_dir():
        return {}, []
    store = FileStore(directory)
    entries = store.list()
    claimed = {e.file for e in entries} | {f"{e.kind}-{e.id}.json" for e in entries}
    by_mid: dict[str, list[int]] = {}
    for entry in entries:
        pid = entry.log_id.split("-")[0]
        by_mid.setdefault(message_id(store.message(entry)), []).append(
            int(pid) if pid.isdigit() else 0)
    orphans = sorted(p.name for p in Path(directory).iterdir() if p.name not in claimed)
    return by_mid, orphans


def verdict_pids(log: str) -> dict[str, list[int]]:
    """For each Message-ID in the daemon's log, the pids of the workers that logged
    a verdict for it (each attempt of a message logs one once the next hop has
    answered: one killed while forwarding logs none, and its client saw the
    connection drop, `Record.dropped`)."""
    found: dict[str, list[int]] = {}
    for pid, mid in _VERDICT_LINE.findall(log):
        found.setdefault(mid, []).append(int(pid))
    return found


def in_kill_window(copies: int, pids: list[int], killed: set[int]) -> bool:
    """Each copy beyond the first has a worker SIGKILLed after it had acted
    (handed to the next hop, or quarantined) and before it could answer: the
    client retried, as an MTA would (RFC 1047's duplicate window)."""
    return copies - 1 <= sum(1 for pid in pids if pid in killed)


@dataclass
class Tally:
    records: dict[str, Record] = field(default_factory=dict)
    expected_real: dict[str, str] = field(default_factory=dict)  # corpus file -> outcome

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def told(self, planned: Planned, code: int, text: str) -> str:
        outcome = classify(code, text)
        with self._lock:
            record = self.records.setdefault(planned.mid, Record(planned))
            if outcome == "tempfail":
                record.tempfails += 1
                record.dropped += code == 0
            else:
                record.final, record.text = outcome, text
        return outcome

    def expected(self, planned: Planned) -> str | None:
        if planned.kind == "real":
            return self.expected_real.get(planned.source)
        return EXPECTED[planned.kind]

    def outcomes(self) -> Counter:
        return Counter(r.final or "gave up" for r in self.records.values())

    def counts(self) -> Counter:
        counts = Counter(r.final.split(":")[0] or "gave up" for r in self.records.values())
        counts["sent"] = len(self.records)
        counts["tempfails retried"] = sum(r.tempfails for r in self.records.values())
        counts["of them connection dropped"] = sum(r.dropped for r in self.records.values())
        counts["messages tempfailed at least once"] = sum(
            1 for r in self.records.values() if r.tempfails)
        return counts

    def check(self, arrivals: list[Arrival], quarantine_dir: str, killed: set[int],
              log: str, strict: bool = False) -> tuple[Counter, list]:
        """The counts and the checks: (name, passed, detail) each. A copy made
        in the kill window (`in_kill_window`) fails a check only if `strict`."""
        counts = self.counts()
        counts.update({name: n for name, n in self.outcomes().items()
                       if ":" in name})
        at_sink = Counter(a.mid for a in arrivals if a.mid in self.records)
        strangers = [a for a in arrivals if a.mid not in self.records and a.sender]
        unscanned = [a.mid for a in arrivals if a.mid in self.records and not a.scanned]
        kept_by, orphans = quarantined(quarantine_dir)
        kept = Counter({m: len(p) for m, p in kept_by.items() if not m.startswith("cal-")})
        logged = verdict_pids(log)
        delivered = [m for m, r in self.records.items() if r.final == "delivered"]
        blocked = {m for m, r in self.records.items()
                   if r.final.split(":")[-1] in BLOCKED}
        lost = [m for m in delivered if not at_sink[m]]
        duplicated = [m for m, n in at_sink.items() if n > 1]
        dup_window = [m for m in duplicated
                      if in_kill_window(at_sink[m], logged.get(m, []), killed)
                      or (killed and at_sink[m] - 1 <= self.records[m].dropped)]
        wrongly_at_sink = [m for m in at_sink if self.records[m].final != "delivered"]
        unanswered = [m for m, r in self.records.items() if not r.final]
        mismatched = [f"{m} ({r.planned.source}): {r.final}, expected {want}"
                      for m, r in self.records.items()
                      if (want := self.expected(r.planned)) and r.final != want]
        q_missing = [m for m in blocked if not kept[m]]
        q_twice = [m for m in blocked if kept[m] > 1]
        q_window = [m for m in q_twice if in_kill_window(kept[m], kept_by[m], killed)]
        q_strange = [m for m in kept if m not in blocked]
        counts.update({"delivered at the sink": sum(at_sink.values()),
                       "quarantined (complete entries)": sum(kept.values()),
                       "lost": len(lost), "duplicated": len(duplicated),
                       "duplicated, a worker killed before its reply": len(dup_window),
                       "quarantined twice, a worker killed before its reply": len(q_window),
                       "notices": sum(1 for a in arrivals if not a.sender)})
        checks = [
            ("every message answered, no retry exhausted", not unanswered, unanswered),
            ("outcome as expected (real mail: as in calibration)", not mismatched, mismatched),
            ("lost = 0 (delivered yet not at the sink)", not lost, lost),
            ("duplicated = 0 (at the sink more than once)" + _unless(strict),
             _none_but(duplicated, dup_window, strict), _explained(duplicated, dup_window)),
            ("nothing at the sink that was not answered delivered", not wrongly_at_sink,
             wrongly_at_sink),
            ("nothing at the sink we did not send", not strangers, [a.mid for a in strangers]),
            ("every delivered message carries X-Virus-Scanned", not unscanned, unscanned),
            ("every infected/banned message quarantined", not q_missing, q_missing),
            ("none quarantined twice" + _unless(strict), _none_but(q_twice, q_window, strict),
             _explained(q_twice, q_window)),
            ("nothing else quarantined", not q_strange, q_strange),
            ("no incomplete quarantine files", not orphans, orphans),
        ]
        return counts, checks


def _unless(strict: bool) -> str:
    return "" if strict else ", but for a worker killed between acting and answering"


def _none_but(found: list[str], in_window: list[str], strict: bool) -> bool:
    return not found if strict else set(found) <= set(in_window)


def _explained(found: list[str], in_window: list[str]) -> list[str]:
    return [m + (" (its first worker was SIGKILLed before answering)" if m in in_window
                 else " (NOT explained by a kill)") for m in found]
