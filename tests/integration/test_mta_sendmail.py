"""A real Sendmail (unpacked, tests/rigs/sendmail.py) in front of the daemon.

The mailer mode: etc/sendmail/mailer.mc, as shipped (only its paths swapped
for this checkout's), makes amavisd-client Sendmail's local delivery agent,
handing clean mail to the real mail.local; the daemon runs as its own user
with a real clamd. What is checked is what ends in each /var/mail mailbox,
in the daemon's quarantine and in Sendmail's queue: clean mail once with
X-Virus-Scanned, infected and banned mail quarantined and discarded or
bounced per destiny, every doubt kept in the queue, and no mailbox ever
given a second copy when another recipient's delivery fails.

The milter: INPUT_MAIL_FILTER (etc/sendmail/milter.mc) -> our amavisd-milter
-> our daemon -> clamd, the same cases as under Postfix (tests/integration/
test_mta_postfix.py), with Sendmail's own quarantine (-qQ) and its milter
read timeout (R:) outlasted by progress packets.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs.daemon import ROOT
from tests.rigs.mailboxes import LocalUsers
from tests.rigs.mta_cases import (
    BLOCKED,
    REJECTING,
    SENDER,
    MilterStack,
    milter_blocked_is_rejected,
    milter_clean_mail_arrives_once,
    milter_discarded_virus,
    milter_down_is_4xx,
    milter_pair,
    milter_slow_scan,
    own_user_daemon,
    quarantined,
    readme_section,
    stalled_clamd,
    wait_for,
    write_launcher,
)
from tests.rigs.sendmail import SENDMAIL_ROOT

pytestmark = pytest.mark.integration

MAILER_MC = Path(ROOT) / "etc" / "sendmail" / "mailer.mc"
MAIL_LOCAL = SENDMAIL_ROOT / "usr/libexec/sendmail/mail.local"
USERS = ["amavisd-mb1", "amavisd-mb2"]
DOMAIN = "smtest.localdomain"


def mailer_mc(client: Path, socket_path: str, flags: str | None = None) -> list[str]:
    """etc/sendmail/mailer.mc with this machine's paths (each must be there once)."""
    text = MAILER_MC.read_text()
    for shipped, here in {"/usr/local/bin/amavisd-client": str(client),
                          "/var/lib/amavis/amavisd.sock": socket_path,
                          "/usr/lib/sm.bin/mail.local": str(MAIL_LOCAL)}.items():
        assert text.count(shipped) == 1, f"{shipped} not once in {MAILER_MC}"
        text = text.replace(shipped, here)
    if flags is not None:
        shipped = "define(`LOCAL_MAILER_FLAGS', `SPhn9')dnl"
        assert shipped in text
        text = text.replace(shipped, f"define(`LOCAL_MAILER_FLAGS', `{flags}')dnl")
    return text.splitlines()


@pytest.fixture
def mailboxes():
    if os.geteuid() != 0:
        pytest.skip("needs root: local users, /var/mail, mounts")
    with LocalUsers(USERS) as boxes:
        yield boxes


@pytest.fixture
def scanner(short_tmp, clamd_nodecomp, request):
    """The daemon as its own user (the client, run as root by Sendmail, must
    still leave it a spool it can read). Settings by indirect parametrization."""
    with own_user_daemon(short_tmp / "d", clamd_nodecomp.address,
                         getattr(request, "param", {})) as daemon:
        yield daemon


@pytest.fixture
def mailer(sendmail_factory, scanner, short_tmp, mailboxes):
    """make(flags=None) -> a Sendmail whose local mailer is etc/sendmail/mailer.mc."""
    client = write_launcher(short_tmp)

    def make(flags: str | None = None):
        return sendmail_factory(mc=mailer_mc(client, scanner.socket_path, flags))

    return make


def local(user: str) -> str:
    return f"{user}@{DOMAIN}"


# -- mailer mode ----------------------------------------------------------------------------


def test_clean_mail_reaches_each_mailbox_once_with_x_virus_scanned(mailer, mailboxes):
    sm = mailer()
    sent = sm.send(SENDER, [local(u) for u in USERS], clean_message("mailer clean"))
    assert sent.code == 250, sent
    wait_for(lambda: mailboxes.count() == dict.fromkeys(USERS, 1), what="a copy in each mailbox")
    sm.wait_queue_empty()
    for user in USERS:
        [message] = mailboxes.messages(user)
        assert b"\nX-Virus-Scanned: by amavisd" in message, message[:400]
        assert message.rstrip(b"\n").endswith(b"Just text, nothing to see.")
    sm.run_queue()
    assert mailboxes.count() == dict.fromkeys(USERS, 1)
    assert [m for m in sm.sink.messages if m.mail_from == ""] == []  # no bounce


@pytest.mark.parametrize("message, kind", BLOCKED)
def test_blocked_mail_is_quarantined_and_discarded(mailer, mailboxes, scanner, message, kind):
    sm = mailer()
    sent = sm.send(SENDER, [local(USERS[0])], message)
    assert sent.code == 250, sent  # mailer mode decides after the SMTP dialogue
    wait_for(lambda: quarantined(scanner), what="a quarantine entry")
    sm.wait_queue_empty()
    assert all(name.startswith(f"{kind}-") for name in quarantined(scanner)), quarantined(scanner)
    assert mailboxes.count() == dict.fromkeys(USERS, 0)
    time.sleep(1)
    assert [m for m in sm.sink.messages if m.mail_from == ""] == []  # discarded: no bounce


@pytest.mark.parametrize("scanner", [{"virus_destiny": "reject"}], indirect=True)
def test_a_virus_with_destiny_reject_bounces_to_the_sender(mailer, mailboxes, scanner):
    sm = mailer()
    sent = sm.send(SENDER, [local(USERS[0])], eicar_message())
    assert sent.code == 250, sent
    [bounce] = wait_for(lambda: [m for m in sm.sink.messages if m.mail_from == ""],
                        what="a bounce to the sender")
    assert bounce.rcpt_tos == [SENDER]
    assert b"5.7.0" in bounce.data or b"5.7.1" in bounce.data, bounce.data[:2000]
    assert len(quarantined(scanner)) == 1
    assert mailboxes.count() == dict.fromkeys(USERS, 0)
    sm.wait_queue_empty()


def test_every_doubt_keeps_the_mail_in_sendmails_queue(mailer, mailboxes, scanner):
    sm = mailer()
    scanner.stop()
    sent = sm.send(SENDER, [local(USERS[0])], clean_message("while down"))
    assert sent.code == 250, sent
    [queued] = sm.wait_queued(1)
    assert queued.attempts >= 1 and "EX_TEMPFAIL" in queued.status, queued
    assert mailboxes.count()[USERS[0]] == 0
    scanner.start()
    sm.run_queue()
    wait_for(lambda: mailboxes.count()[USERS[0]] == 1, what="the retried delivery")
    sm.wait_queue_empty()


def test_a_full_mailbox_defers_only_its_recipient_and_no_one_gets_two_copies(mailer,
                                                                            mailboxes):
    sm = mailer()
    with mailboxes.full(USERS[1]):
        sent = sm.send(SENDER, [local(u) for u in USERS], clean_message("one full"))
        assert sent.code == 250, sent
        [queued] = sm.wait_queued(1)
        assert queued.recipients == [local(USERS[1])], queued
        assert mailboxes.count()[USERS[0]] == 1
    sm.run_queue()  # the disk has room again
    wait_for(lambda: mailboxes.count() == dict.fromkeys(USERS, 1), what="one copy each")
    sm.wait_queue_empty()
    sm.run_queue()
    assert mailboxes.count() == dict.fromkeys(USERS, 1)


def test_a_multi_recipient_mailer_is_refused_rather_than_deliver_twice(mailer, mailboxes):
    """The README's old recipe had F=m: Sendmail called the client once for
    both recipients, one exit code answered for both, and after the second
    mailbox's failure the retry gave the first mailbox a second copy. The
    client now refuses such a call before delivering anything (75: the mail
    waits in the queue for a fixed mailer definition)."""
    sm = mailer(flags="SPhmn9")
    with mailboxes.full(USERS[1]):
        sent = sm.send(SENDER, [local(u) for u in USERS], clean_message("old recipe"))
        assert sent.code == 250, sent
        [queued] = sm.wait_queued(1)
    sm.run_queue()
    time.sleep(1)
    counts = mailboxes.count()
    assert max(counts.values()) <= 1, f"a mailbox got two copies: {counts}"
    assert counts == dict.fromkeys(USERS, 0), counts
    [queued] = sm.queue()
    assert sorted(queued.recipients) == sorted(local(u) for u in USERS), queued


# -- Sendmail INPUT_MAIL_FILTER -> our amavisd-milter -> our daemon -> clamd ------------

MILTER_MC = Path(ROOT) / "etc" / "sendmail" / "milter.mc"


def milter_mc(socket_path: str, read_timeout: str | None = None) -> list[str]:
    """etc/sendmail/milter.mc with our socket (and a shorter R: timeout)."""
    text = MILTER_MC.read_text()
    shipped = "S=unix:/var/lib/amavis/amavisd-milter.sock"
    assert text.count(shipped) == 1, f"{shipped} not once in {MILTER_MC}"
    text = text.replace(shipped, f"S=unix:{socket_path}")
    if read_timeout:
        assert text.count(";R:60s;") == 1
        text = text.replace(";R:60s;", f";R:{read_timeout};")
    return text.splitlines()


@contextlib.contextmanager
def milter_stack(short_tmp, sendmail_factory, clamd_address: str, daemon_settings=None,
                 milter_options=None, read_timeout: str | None = None) -> Iterator[MilterStack]:
    """Sendmail -> amavisd-milter -> amavisd -> clamd."""
    with milter_pair(short_tmp, clamd_address, daemon_settings,
                     milter_options) as (socket_path, daemon, milter):
        sm = sendmail_factory(mc=milter_mc(socket_path, read_timeout))
        yield MilterStack(sm, milter, daemon, lambda: sm.queue(None))


def test_clean_mail_through_the_milter_arrives_once_with_x_virus_scanned(
        short_tmp, sendmail_factory, clamd_nodecomp):
    with milter_stack(short_tmp, sendmail_factory, clamd_nodecomp.address) as stack:
        milter_clean_mail_arrives_once(stack)


@pytest.mark.parametrize("message, kind", BLOCKED)
def test_blocked_mail_is_rejected_with_5xx_and_quarantined(
        short_tmp, sendmail_factory, clamd_nodecomp, message, kind):
    with milter_stack(short_tmp, sendmail_factory, clamd_nodecomp.address, REJECTING) as stack:
        milter_blocked_is_rejected(stack, message, kind)


def test_a_discarded_virus_is_accepted_dropped_and_quarantined(
        short_tmp, sendmail_factory, clamd_nodecomp):
    with milter_stack(short_tmp, sendmail_factory, clamd_nodecomp.address,
                      {"virus_destiny": "discard"}) as stack:
        milter_discarded_virus(stack)


def test_a_milter_quarantine_puts_the_mail_in_sendmail_s_quarantine(
        short_tmp, sendmail_factory, clamd_nodecomp):
    with milter_stack(short_tmp, sendmail_factory, clamd_nodecomp.address,
                      {"virus_destiny": "discard"}, {"quarantine": "discard"}) as stack:
        sm = stack.mta
        sent = sm.send(SENDER, ["bob@example.test"], eicar_message())
        assert sent.code == 250, sent
        [held] = sm.wait_queued(1, quarantined=True)
        assert held.recipients == ["bob@example.test"] and held.quarantine, held
        assert held.queue_id in sm.mailq(quarantined=True)
        time.sleep(1)
        assert sm.sink.messages == [] and len(quarantined(stack.daemon)) == 1
        sm.release(held.queue_id)  # the postmaster's call: out of the quarantine, once
        sm.run_queue()
        assert len(sm.sink.wait(1, timeout=60)) == 1
        sm.wait_queue_empty()
        assert sm.queue(None) == [] and len(sm.sink.messages) == 1


@pytest.mark.parametrize("what", ["daemon", "milter"])
def test_the_daemon_or_the_milter_down_gives_the_smtp_client_4xx_and_keeps_nothing(
        short_tmp, sendmail_factory, clamd_nodecomp, what):
    with milter_stack(short_tmp, sendmail_factory, clamd_nodecomp.address) as stack:
        milter_down_is_4xx(stack, getattr(stack, what).stop, what)  # F=T: tempfail


@pytest.fixture
def slow_clamd(short_tmp, clamd_nodecomp):
    with stalled_clamd(short_tmp, clamd_nodecomp.socket_path) as proxy:
        yield proxy


@pytest.mark.parametrize("interval, passes", [(0.5, True), (60.0, False)],
                         ids=["progress", "no-progress"])
def test_a_scan_slower_than_the_milter_read_timeout_completes_thanks_to_progress(
        short_tmp, sendmail_factory, slow_clamd, interval, passes):
    with milter_stack(short_tmp, sendmail_factory, slow_clamd.address,
                      {"virus_destiny": "reject"}, {"progress_interval": interval},
                      read_timeout="2s") as stack:
        milter_slow_scan(stack, passes)  # no progress: Sendmail gives up (F=T: tempfail)


def test_the_readme_shows_the_recipes_these_tests_run():
    mailer = readme_section("With Sendmail (mailer)")
    for line in MAILER_MC.read_text().splitlines():
        if not line.startswith("dnl"):
            assert f"    {line}\n" in mailer, line
    milter = readme_section("With Sendmail (milter)")
    [line] = [x for x in MILTER_MC.read_text().splitlines() if x.startswith("INPUT_MAIL_FILTER")]
    assert f"    {line}\n" in milter
