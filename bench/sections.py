"""The measurements `bench/run.py` strings together, one function an ingress or aspect.

Each takes the session (clamds, messages, settings) and returns plain data;
none starts its own clamd or writes its own copy of a server: the rows come
from ampdp_throughput (AM.PDP), smtp_throughput (content filter),
milter_throughput (milters), client_startup (the client) and memory.
A part that is absent (no amavisd-new, no Postfix, not root) is a `Skip`
with the reason, never a silent hole.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import client_startup
import memory
import milter_throughput
import smtp_throughput
from ampdp_throughput import (
    AmavisdNew,
    Message,
    Ours,
    RawClamd,
    RowError,
    RunResult,
    drive,
    run_concurrency,
)

from amavisd.testing.clamd import ClamdInstance
from tests.rigs import amavisd_new
from tests.rigs.daemon import DaemonInstance
from tests.rigs.mailboxes import ensure_user
from tests.rigs.postfix import PostfixError
from tests.rigs.postfix import skip_reason as postfix_skip_reason


class Skip(Exception):
    """A row or section that cannot run here; the message says why."""


@dataclass
class Session:
    base: Path
    clamd: ClamdInstance  # nodecomp: the one every daemon row uses
    clamd_whole: ClamdInstance  # full: ScanMail + ScanArchive, the C-unpacker yardstick
    mix: list[Message]  # synthetic kinds + the real sample
    real: list[Message]
    conc: list[int]
    runs: int
    n: int  # AM.PDP messages a run
    mta_n: int  # messages a run through Postfix
    sizes: list[int]
    parts: list[int]
    notes: list[str] = field(default_factory=list)


@dataclass
class Cell:
    """One row at one concurrency: medians over the runs and the spread of msgs/s."""

    rates: list[float]
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    cpu_ms: float | None = None
    clamd_ms: float | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


Table = dict[str, dict[int, "Cell | str"]]  # row -> concurrency -> cell or why not


def _cell(r: RunResult) -> Cell:
    return Cell(r.rates, r.p50, r.p95, r.p99, r.server_ms, r.clamd_ms)


# -- AM.PDP ----------------------------------------------------------------------------


def ampdp(s: Session) -> Table:
    rows = [Ours(s.base, s.clamd)]
    table: Table = collections.defaultdict(dict)
    if reason := amavisd_new.skip_reason():
        table["amavisd-new"] = {c: f"skipped: {reason}" for c in s.conc}
    else:
        rows.append(AmavisdNew(s.base, s.clamd, "CONTSCAN"))
    rows += [RawClamd(s.clamd_whole, "clamd-whole"), RawClamd(s.clamd)]
    args = argparse.Namespace(n=s.n, warmup=20, runs=s.runs)
    messages = s.mix
    for n, c in enumerate(s.conc):
        outcome, messages = run_concurrency(rows, c, args, messages, s.clamd, first=n == 0)
        for name, r in outcome.items():
            table[name][c] = r if isinstance(r, str) else _cell(r)
    return dict(table)


# -- SMTP content filter ----------------------------------------------------------------


def _mta_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root (a private Postfix and the daemon's user need it)"
    if reason := postfix_skip_reason():
        return reason
    if shutil.which("smtp-source") is None:
        return "smtp-source missing (Debian package postfix)"
    return None


def smtp(s: Session) -> Table:
    if reason := _mta_reason():
        raise Skip(reason)
    names = ["ours", "postfix-only"] + ([] if amavisd_new.skip_reason() else ["amavisd-new"])
    table: Table = {name: {} for name in names}
    if "amavisd-new" not in names:
        table["amavisd-new"] = {c: f"skipped: {amavisd_new.skip_reason()}" for c in s.conc}
    for c in s.conc:
        rates, failed = collections.defaultdict(list), {}
        for run in range(s.runs):
            for name in names:
                if name in failed:
                    continue
                work = s.base / f"smtp-{name}-{c}-{run}"
                try:
                    r = smtp_throughput.run_row(name, work, s.clamd, s.mta_n, c, 4096)
                except PostfixError as err:
                    if "did not start" not in str(err):
                        failed[name] = f"failed: {err}"[:300]
                        continue
                    # the rig's Postfix, before any message: once more, said so
                    print(f"- smtp c={c} run {run + 1}, {name}: Postfix did not start, "
                          "run again", flush=True)
                    try:
                        r = smtp_throughput.run_row(name, s.base / f"smtp-{name}-{c}-{run}-again",
                                                    s.clamd, s.mta_n, c, 4096)
                    except Exception as again:  # noqa: BLE001 -- the row fails, the run goes on
                        failed[name] = f"failed: {again}"[:300]
                        continue
                except Exception as err:  # noqa: BLE001 -- the row fails, the run goes on
                    failed[name] = f"failed: {err}"[:300]
                    continue
                if not r["ok"]:
                    failed[name] = (f"failed: {r['arrived']} of {s.mta_n} arrived, "
                                    f"{r['duplicates']} duplicates")
                    continue
                rates[name].append(r["rate"])
                print(f"- smtp c={c} run {run + 1}, {name}: {r['rate']:.1f} msgs/s", flush=True)
        for name in names:
            table[name][c] = failed.get(name) or Cell(rates[name])
    return table


# -- milter -----------------------------------------------------------------------------------


def milter(s: Session) -> Table:
    if reason := _mta_reason():
        raise Skip(reason)
    ensure_user(milter_throughput.DAEMON_USER, milter_throughput.DAEMON_USER)
    have_c = os.access(milter_throughput.C_MILTER, os.X_OK)
    why_not = (None if have_c else f"no {milter_throughput.C_MILTER}") or amavisd_new.skip_reason()
    table: Table = {"ours": {}, "postfix-only": {}, "c-milter+amavisd-new": {}}
    for c in s.conc:
        args = argparse.Namespace(sessions=c, n=s.mta_n, length=4096)
        rates = collections.defaultdict(list)
        daemons = {"ours": DaemonInstance(
            s.base / f"milter-d{c}", s.clamd.address, workers=c, admin_notify=[], log_to=[],
            user=milter_throughput.DAEMON_USER, group=milter_throughput.DAEMON_USER)}
        if why_not:
            table["c-milter+amavisd-new"][c] = f"skipped: {why_not}"
        else:
            daemons["c-milter+amavisd-new"] = amavisd_new.AmavisdNewInstance(
                s.base / f"milter-new{c}", s.clamd.socket_path, virus_destiny="D_DISCARD",
                max_servers=c)
        try:
            for daemon in daemons.values():
                daemon.start()
            for run in range(s.runs):
                for name, daemon in [*daemons.items(), ("postfix-only", daemons["ours"])]:
                    if isinstance(table[name].get(c), str):
                        continue
                    work = s.base / f"milter-{name}-{c}-{run}"
                    work.mkdir(parents=True)
                    try:
                        row = "postfix" if name == "postfix-only" else name  # no milter at all
                        seconds = milter_throughput.run_row(row, work, daemon, args)
                    except Exception as err:  # noqa: BLE001
                        table[name][c] = f"failed: {err}"[:300]
                        continue
                    rates[name].append(s.mta_n / seconds)
                    print(f"- milter c={c} run {run + 1}, {name}: {s.mta_n / seconds:.1f} "
                          "msgs/s", flush=True)
        finally:
            for daemon in daemons.values():
                daemon.stop()
        for name in [*daemons, "postfix-only"]:
            if not isinstance(table[name].get(c), str):
                table[name][c] = Cell(rates[name])
    return table


# -- one worker: latency on real mail, the client, the memory ladder ---------------------------


def single_worker(s: Session) -> dict:
    """Latency at c=1 on the real corpus, the client's round trip, and the ladder."""
    out: dict = {}
    # the private clamd takes 100M streams (ClamdInstance): tell the daemon, or the
    # 50 MB rows are (rightly) UNCHECKED over its default 25 MiB
    row = Ours(s.base / "single", s.clamd, clamd_max_stream=100 * 1024 * 1024)
    (s.base / "single").mkdir()
    row.start(1)
    try:
        if s.real:
            r = drive(row, s.real, 1, s.clamd, "lat")
            out["latency"] = {"messages": len(s.real), "p50": r.p50, "p95": r.p95,
                              "p99": r.p99, "rate": r.rate}
        else:
            out["latency"] = "skipped: no real-mail corpus (AMAVISD_CORPUS)"
        out["client"] = _client(s, row)
        out["ladder"] = memory.ladder(row, s.sizes, s.parts)
    finally:
        row.stop()
    return out


def _client(s: Session, row: Ours) -> dict:
    plain = next(m for m in s.mix if m.name == "gen/plain-2k")
    path = s.base / "plain.eml"
    path.write_bytes(plain.data)
    scan = drive(row, [plain] * 50, 1, s.clamd, "client")
    args = argparse.Namespace(
        socket=row.socket_path, tempbase=row.tempbase, message=str(path),
        python=client_startup.real_interpreter(sys.executable), client=None, client_given=False)
    cases = client_startup.request_cases(args)
    client_startup.check_runs(cases, request=True)
    client_startup.time_with_loop(cases, runs=max(20, 10 * s.runs), warmup=5)
    by = {c.label: statistics.median(c.times) * 1e3 for c in cases}
    base = next(v for k, v in by.items() if k.startswith("`python3 -I -S -c pass"))
    trip = next(v for k, v in by.items() if "round trip" in k)
    return {"interpreter": base, "scan_p50": scan.p50, "round_trip": trip,
            "bound": 2 * (base + scan.p50)}


def footprint(s: Session) -> list[dict]:
    row = Ours(s.base / "four", s.clamd)
    (s.base / "four").mkdir()
    row.start(4)
    try:
        return memory.footprint(row, (s.mix * 10)[:200])
    except RowError as err:
        raise Skip(f"warm-up failed: {err}") from err
    finally:
        row.stop()
