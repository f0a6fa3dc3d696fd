"""`make soak` in small: 300 messages through the SMTP filter, a worker SIGKILLed
every 0.5 s (an idle machine sends them all in 2 s) and workers recycling every
40 requests; every message counted
(tests/soak/soak.py does the sending, killing and counting)."""

from __future__ import annotations

import time

import pytest

from tests.soak.mix import Planned
from tests.soak.report import summary
from tests.soak.soak import CORPUS, Options, run
from tests.soak.tally import Arrival, Tally

pytestmark = pytest.mark.integration


def test_short_soak_loses_nothing_while_workers_die_and_recycle(clamd_nodecomp, short_tmp):
    opts = Options(messages=300, concurrency=8, kill_every=0.5, max_requests=40, workers=4,
                   corpus=CORPUS if CORPUS.is_dir() else None)
    started = time.monotonic()
    outcome = run(opts, clamd_address=clamd_nodecomp.address, base=short_tmp)
    took = time.monotonic() - started
    text = summary(outcome)
    failed = [name for name, passed, _ in outcome.all_checks() if not passed]
    assert not failed, text
    counts = outcome.counts
    assert counts["sent"] == 300 and counts["lost"] == 0, text
    # duplicated only where explained (below): a worker SIGKILLed after the
    # next hop took the message, before its 250 reached Postfix, which retries
    assert counts["duplicated"] == counts["duplicated, a worker killed before its reply"], text
    # every one of the 300 ended once: delivered or rejected, none given up
    assert counts["delivered"] + counts["rejected"] == 300, text
    # a second copy only where a worker was SIGKILLed after acting, before answering
    # (the checks above name each one); never more copies than kills
    extra = counts["delivered at the sink"] - counts["delivered"]
    assert 0 <= extra == counts["duplicated, a worker killed before its reply"], text
    blocked = counts["rejected:INFECTED"] + counts["rejected:BANNED"]
    kept = counts["quarantined (complete entries)"]
    assert blocked == 90 and blocked <= kept <= blocked + outcome.killed, text
    assert outcome.killed >= 2 and outcome.workers_spawned > outcome.killed, text
    assert took < 60, f"took {took:.0f}s\n{text}"


def test_the_count_sees_a_loss_a_duplicate_and_a_kill_window(tmp_path):
    """The soak's own arithmetic, on a made-up run: a check that could not fail
    would let a soak pass that lost mail."""
    tally = Tally()
    plans = [Planned(f"soak-{n}@soak.test", "clean", "clean") for n in range(4)]
    for planned in plans:
        tally.told(planned, 250, "2.0.0 from MTA(smtp:[127.0.0.1]:1): 250 ok")
    tally.told(plans[3], 0, "disconnected")  # retried: its first worker died
    arrivals = [Arrival(p.mid, "alice@example.test", True) for p in plans[:3]]
    arrivals += [Arrival(plans[2].mid, "alice@example.test", True),  # twice, unexplained
                 Arrival(plans[0].mid, "alice@example.test", True)]  # twice, in the window
    log = "".join(f"x amavisd[{pid}]: INFO ({pid}-1) Passed CLEAN {{pass}}, "
                  f"Message-ID: <{mid}>, size: 1\n"
                  for pid, mid in ((11, plans[0].mid), (12, plans[0].mid), (13, plans[2].mid)))
    counts, checks = tally.check(arrivals, str(tmp_path), killed={11}, log=log)
    failed = {name.split(" ")[0]: detail for name, passed, detail in checks if not passed}
    assert counts["lost"] == 1 and failed["lost"] == [plans[3].mid]
    assert counts["duplicated"] == 2
    assert counts["duplicated, a worker killed before its reply"] == 1
    assert failed["duplicated"] == [f"{plans[0].mid} (its first worker was SIGKILLed before "
                                    "answering)", f"{plans[2].mid} (NOT explained by a kill)"]
    window_only = arrivals[:3] + arrivals[4:]
    for strict in (False, True):  # --strict: a copy made in the window fails too
        _, checks = tally.check(window_only, str(tmp_path), killed={11}, log=log, strict=strict)
        assert dict((n.split(" ")[0], p) for n, p, _ in checks)["duplicated"] is not strict
