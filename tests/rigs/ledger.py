# SPDX-License-Identifier: MIT
"""Count every message through a fault: what the client was told, what the
sink got, what the quarantine kept (issue 17, the invariant).

A batch is clean, EICAR and banned mail, each with its own Message-ID. It is
sent with some concurrency; a fault is injected once a given number of
replies have come back, while the rest are in flight. Each reply is filed
under one outcome:

    passed     2xx / AM.PDP `continue`: our verdict went on (sink or MTA)
    discarded  AM.PDP `discard` (after quarantine): must be in the quarantine
    rejected   5xx / AM.PDP `reject`
    tempfail   4xx, a dropped connection, AM.PDP `tempfail` or no reply:
               the MTA keeps the mail and tries again

`Ledger.check()` then asserts the invariant: every message has exactly one
final outcome and any earlier one was a tempfail; nothing infected or banned
reached the sink or was passed; every Message-ID at the sink is one we sent,
arrived once, carries our X-Virus-Scanned header, and was answered 2xx; a
2xx that is not at the sink (SMTP) is a discard that the quarantine kept;
a tempfail never reached the sink. `resend()` replays the tempfailed ones
once the fault is gone; they must then end like any other.

    mails = batch(30, "kill")
    ledger = Ledger(mails)
    ledger.send_all(smtp_sender(port), fault=kill_a_worker, fault_after=5)
    ledger.resend(smtp_sender(port))
    counts = ledger.check(sink=hop.messages, quarantine=qdir)
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from amavisd.quarantine import QuarantineError
from amavisd.quarantine.file import FileStore
from tests.rigs.daemon import DaemonInstance
from tests.rigs.nexthop import NextHop, _Server
from tests.rigs.postfix import smtp_send
from tests.rigs.smtpsink import SMTPSink
from tests.rigs.smtptalk import banned, clean, eicar

__all__ = ["Counts", "Gateway", "PortHop", "Ledger", "Mail", "ampdp_sender", "batch", "message_ids",
           "open_gateway", "outcome_of_code", "smtp_sender"]

MAKERS: dict[str, Callable[[str], bytes]] = {"clean": clean, "eicar": eicar, "banned": banned}
BLOCKED = frozenset({"eicar", "banned"})
OUTCOMES = ("passed", "discarded", "rejected", "tempfail")
_MID = re.compile(rb"(?im)^Message-ID:[ \t]*<([^>\r\n]+)>")
_MID_LINE = re.compile(rb"(?im)^Message-ID:[^\n]*\n")
_SCANNED = re.compile(rb"(?im)^X-Virus-Scanned:")


@dataclass
class Mail:
    mid: str  # the Message-ID, without <>
    kind: str  # clean, eicar, banned
    data: bytes  # CRLF lines, Message-ID first

    @property
    def blocked(self) -> bool:
        return self.kind in BLOCKED


def batch(count: int, tag: str, kinds: Sequence[str] = ("clean", "clean", "eicar", "banned")
          ) -> list[Mail]:
    """`count` messages cycling through `kinds`, Message-IDs `<kind-N.tag@ledger.test>`."""
    mails = []
    for n in range(count):
        kind = kinds[n % len(kinds)]
        mid = f"{kind}-{n}.{tag}@ledger.test"
        body = _MID_LINE.sub(b"", MAKERS[kind](f"{kind} {n}"))  # ours is the only one
        mails.append(Mail(mid, kind, f"Message-ID: <{mid}>\r\n".encode() + body))
    return mails


def message_ids(data: bytes) -> list[str]:
    """The Message-IDs in the header block of one message."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return [m.decode("ascii", "replace") for m in _MID.findall(head)]


def outcome_of_code(code: int) -> str:
    """An SMTP reply code (0: no reply) as an outcome."""
    if 200 <= code < 300:
        return "passed"
    if 500 <= code < 600:
        return "rejected"
    return "tempfail"


_AMPDP = {"continue": "passed", "discard": "discarded", "reject": "rejected",
          "tempfail": "tempfail", None: "tempfail"}

Sender = Callable[[Mail], tuple[str, str]]  # mail -> (outcome, what was said)


def smtp_sender(port: int, rcpt: str = "bob@example.test", timeout: float = 120.0) -> Sender:
    """Send through an SMTP listener (our filter or Postfix) with smtplib."""
    def send(mail: Mail) -> tuple[str, str]:
        sent = smtp_send(port, "alice@example.test", [rcpt], mail.data, timeout)
        return outcome_of_code(sent.code), str(sent)
    return send


def ampdp_sender(socket_path: str, tempbase: str, timeout: float = 120.0) -> Sender:
    """One raw AM.PDP request per mail, the file spooled in the daemon's temp base
    as an MTA's helper would (readable by the daemon's user)."""
    from tests.integration.test_daemon import ampdp

    counter = iter(range(1 << 30))
    lock = threading.Lock()

    def send(mail: Mail) -> tuple[str, str]:
        with lock:
            job = Path(tempbase) / f"ledger-{next(counter)}"
        job.mkdir(mode=0o755)
        job.chmod(0o755)
        path = job / "email.txt"
        path.write_bytes(mail.data)
        path.chmod(0o644)
        try:
            reply = ampdp(socket_path, [("request", "AM.PDP"), ("mail_file", str(path)),
                                        ("tempdir", str(job)), ("sender", "<alice@example.test>"),
                                        ("recipient", "<bob@example.test>")], timeout=timeout)
        except OSError as err:  # refused, reset, timed out: the client tempfails (75)
            return "tempfail", f"error: {err}"
        value = None if reply is None else reply.get("return_value")
        return _AMPDP.get(value, "tempfail"), f"{value}"
    return send


@dataclass
class Counts:
    sent: int = 0
    passed: int = 0
    discarded: int = 0
    rejected: int = 0
    tempfail: int = 0  # final outcome after any resends
    tempfailed_once: int = 0  # messages that saw at least one tempfail
    resent: int = 0
    at_sink: int = 0
    quarantined: int = 0
    kept_twice: int = 0  # quarantined again on a resend: a copy, not a delivery

    def row(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in vars(self).items())


@dataclass
class Ledger:
    mails: list[Mail]
    told: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.by_mid = {m.mid: m for m in self.mails}
        assert len(self.by_mid) == len(self.mails), "Message-IDs must be unique"

    def record(self, mail: Mail, outcome: str, said: str) -> None:
        assert outcome in OUTCOMES, outcome
        with self._lock:
            self.told.setdefault(mail.mid, []).append((outcome, said))

    def final(self, mid: str) -> str | None:
        said = self.told.get(mid)
        return said[-1][0] if said else None

    def send_all(self, send: Sender, *, mails: Iterable[Mail] | None = None,
                 concurrency: int = 4, fault: Callable[[], None] | None = None,
                 fault_after: int = 0) -> None:
        """Send (all, or `mails`) with `concurrency` in flight; call `fault()` in
        this thread once `fault_after` replies are in, while the rest are pending."""
        todo = list(self.mails if mails is None else mails)
        done = 0
        faulted = fault is None
        with ThreadPoolExecutor(concurrency) as pool:
            futures = {pool.submit(send, m): m for m in todo}
            if not faulted and fault_after == 0:
                fault()
                faulted = True
            for future in as_completed(futures):
                outcome, said = future.result()
                self.record(futures[future], outcome, said)
                done += 1
                if not faulted and done >= fault_after:
                    fault()
                    faulted = True
        if not faulted:
            fault()

    def tempfailed(self) -> list[Mail]:
        return [m for m in self.mails if self.final(m.mid) == "tempfail"]

    def resend(self, send: Sender, concurrency: int = 4) -> int:
        """Resend what was tempfailed, as the MTA would once the fault is gone."""
        again = self.tempfailed()
        self.send_all(send, mails=again, concurrency=concurrency)
        return len(again)

    # -- the count ------------------------------------------------------------

    def check(self, *, sink: Iterable[bytes] | None, quarantine: str | Path | None,
              allow_tempfail: bool = True) -> Counts:
        """Assert the invariant; the counts. `sink`: the DATA of every message
        the next hop got (None: no sink, the MTA delivers on `continue`)."""
        counts = Counts(sent=len(self.mails))
        problems: list[str] = []
        sink_ids = Counter(mid for data in (sink or []) for mid in message_ids(data))
        if sink is not None:
            for data in sink:
                if not _SCANNED.search(data.split(b"\r\n\r\n", 1)[0]):
                    problems.append(f"at the sink without X-Virus-Scanned: {message_ids(data)}")
        quarantined = Counter(quarantined_ids(quarantine))
        counts.at_sink = sum(sink_ids.values())
        counts.quarantined = sum(quarantined[m.mid] for m in self.mails)
        counts.kept_twice = sum(quarantined[m.mid] > 1 for m in self.mails)
        for mid, n in sink_ids.items():
            if mid not in self.by_mid:
                problems.append(f"{mid}: at the sink but never sent")
            elif n > 1:
                problems.append(f"{mid}: delivered {n} times")
        for mail in self.mails:
            said = self.told.get(mail.mid, [])
            if not said:
                problems.append(f"{mail.mid}: never answered")
                continue
            if any(o != "tempfail" for o, _ in said[:-1]):
                problems.append(f"{mail.mid}: sent again after a final answer: {said}")
            counts.tempfailed_once += any(o == "tempfail" for o, _ in said)
            counts.resent += len(said) - 1
            final, text = said[-1]
            setattr(counts, final, getattr(counts, final) + 1)
            at_sink, kept = sink_ids[mail.mid], quarantined[mail.mid]
            if mail.blocked and (at_sink or final == "passed" and sink is None):
                problems.append(f"{mail.mid} ({mail.kind}): passed unblocked: {text}")
            if final == "passed" and sink is not None and not at_sink and not kept:
                problems.append(f"{mail.mid}: 2xx, yet neither at the sink nor kept: lost")
            if final == "passed" and sink is not None and not mail.blocked and not at_sink:
                problems.append(f"{mail.mid}: clean, 2xx, not at the sink: {text}")
            if final == "discarded" and not kept:
                problems.append(f"{mail.mid}: discarded but not in the quarantine")
            if final in ("rejected", "tempfail") and at_sink:
                problems.append(f"{mail.mid}: told {final} yet at the sink (a duplicate "
                                f"once the MTA retries): {text}")
            if final == "tempfail" and not allow_tempfail:
                problems.append(f"{mail.mid}: still tempfailed after the fault: {text}")
            if not mail.blocked and final in ("rejected", "discarded"):
                problems.append(f"{mail.mid}: clean mail {final}: {text}")
        assert not problems, "\n".join(problems + [counts.row()])
        return counts


def quarantined_ids(directory: str | Path | None) -> list[str]:
    """Message-IDs of the mail kept in a file quarantine, counted as a release
    finds it (`amavisd quarantine release`, AM.PDP `request=release`): an
    entry the store lists whose message reads back with the digest taken
    when it was kept. A message file without its sidecar (a store that
    failed), a damaged sidecar or a message that no longer matches it is
    not kept: nobody could release it."""
    if directory is None or not Path(directory).is_dir():
        return []
    store = FileStore(str(directory))
    found = []
    for entry in store.list():
        try:
            found += message_ids(store.message(entry))
        except QuarantineError:
            continue
    return found


def sink_data(messages: Iterable[object]) -> list[bytes]:
    """The DATA of what a sink or next hop kept, notices (null sender) left out."""
    return [m.data for m in messages if m.mail_from]  # type: ignore[attr-defined]


@dataclass
class Gateway:
    """A started daemon behind one ingress, and where its mail ends up."""

    ingress: str  # "ampdp" or "smtp"
    daemon: DaemonInstance
    send: Sender
    hop: NextHop | None = None  # the SMTP filter's next hop: the sink

    @property
    def quarantine(self) -> str:
        return self.daemon.settings["quarantine_dir"]

    def check(self, ledger: Ledger, **options: bool) -> Counts:
        sink = None if self.hop is None else sink_data(self.hop.messages)
        return ledger.check(sink=sink, quarantine=self.quarantine, **options)


def open_gateway(ingress: str, workdir: Path, clamd_address: str, stack: ExitStack,
                 **settings: object) -> Gateway:
    """The real daemon with 2 workers behind `ingress`, stopped by `stack`:
    AM.PDP on its Unix socket, or the SMTP filter forwarding to a NextHop."""
    if ingress == "ampdp":
        daemon = DaemonInstance(workdir / "d", clamd_address, workers=2, **settings)
        stack.enter_context(daemon)
        return Gateway(ingress, daemon, ampdp_sender(daemon.socket_path, daemon.tempbase))
    from tests.integration.test_smtp_filter import start_filter

    hop = stack.enter_context(NextHop())
    notices = stack.enter_context(SMTPSink())
    flt = start_filter(workdir, clamd_address, hop, notices, **settings)
    stack.callback(flt.daemon.stop)
    return Gateway(ingress, flt.daemon, smtp_sender(flt.smtp_port), hop)


class PortHop(NextHop):
    """A NextHop on a port fixed in advance: it can go down and come back
    where the filter forwards (`forward_method` names it before it listens)."""

    def __init__(self, port: int, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.port = port

    def make_server(self) -> _Server:
        return _Server(("127.0.0.1", self.port), self)
