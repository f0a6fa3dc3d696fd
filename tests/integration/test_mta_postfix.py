"""A private, real Postfix (tests/rigs/postfix.py) in front of the daemon.

- The rig itself: mail reaches the sink once; a dead next hop keeps it
  deferred in the queue.
- amavisd-client as the local delivery agent through pipe(8), from
  etc/postfix/master.cf.pipe as shipped (paths swapped): clean mail once in
  each maildir, a rejected virus bounced with the daemon's 5.7.0, a daemon
  that is down leaves the mail deferred, and a full maildir never gives
  another one a second copy (nor does the recipient limit a new user tried).
- The milter: smtpd_milters (etc/postfix/main.cf.milter) -> our
  amavisd-milter -> our daemon -> the real clamd: clean mail once with
  X-Virus-Scanned, EICAR (also zipped) and a banned name rejected 5xx and
  quarantined, or discarded, or held; 4xx when the daemon or the milter is
  down; a scan slower than milter_content_timeout still answered thanks to
  progress packets (the slow scan is tests/rigs/faults.py's named fault).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs.daemon import ROOT
from tests.rigs.mailboxes import ensure_user, full_dir, maildir_count, maildir_messages
from tests.rigs.mta_cases import (
    BLOCKED,
    DAEMON_USER,
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
    zipped_eicar,
)

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.test\nTo: b@example.test\nSubject: rig\n\nhello\n"


def test_the_rig_relays_once_and_keeps_what_it_cannot_deliver(postfix):
    sent = postfix.send("a@example.test", ["b@example.test", "c@example.test"], MESSAGE)
    assert sent.code == 250 and sent.queue_id, sent
    [message] = postfix.sink.wait(1, timeout=60)
    assert message.rcpt_tos == ["b@example.test", "c@example.test"]
    assert message.data.endswith(b"\r\nhello\r\n")
    postfix.wait_queue_empty()
    postfix.sink.stop()
    sent = postfix.send("a@example.test", ["b@example.test"], MESSAGE)
    assert sent.code == 250, sent
    [entry] = postfix.wait_queued(1, "deferred", timeout=60)
    assert entry.queue_id == sent.queue_id and entry.recipients == ["b@example.test"]
    postfix.delete(entry.queue_id)
    assert postfix.queue() == []
    assert len(postfix.sink.messages) == 1


# -- amavisd-client as Postfix's local delivery agent (pipe) --------------------------------

PIPE_RECIPE = Path(ROOT) / "etc" / "postfix" / "master.cf.pipe"
VMAIL_USER = "amavisd-vmail"  # owns the maildirs; a member of the daemon's group
DOMAIN = "mail.example.test"
RCPTS = [f"mb1@{DOMAIN}", f"mb2@{DOMAIN}"]


def pipe_recipe(client: Path, socket_path: str, vmail: Path) -> tuple[dict[str, str], list[str]]:
    """etc/postfix/master.cf.pipe with this machine's paths: (main.cf, master.cf lines)."""
    text = PIPE_RECIPE.read_text()
    for shipped, here in {"/usr/local/bin/amavisd-client": str(client),
                          "/var/lib/amavis/amavisd.sock": socket_path,
                          "/var/vmail": str(vmail),
                          "user=vmail:amavis": f"user={VMAIL_USER}:{DAEMON_USER}"}.items():
        assert text.count(shipped) == 1, f"{shipped} not once in {PIPE_RECIPE}"
        text = text.replace(shipped, here)
    main = dict(line.removeprefix("#main.cf:").strip().split(" = ", 1)
                for line in text.splitlines() if line.startswith("#main.cf:"))
    master = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return main, master


@pytest.fixture
def scanner(short_tmp, clamd_nodecomp, request):
    with own_user_daemon(short_tmp / "d", clamd_nodecomp.address,
                         getattr(request, "param", {})) as daemon:
        yield daemon


@pytest.fixture
def vmail(short_tmp):
    """The maildirs' root, with one maildir a recipient, owned by the pipe's user."""
    user = ensure_user(VMAIL_USER, DAEMON_USER)
    root = short_tmp / "vmail"
    root.mkdir()
    for rcpt in RCPTS:
        (root / rcpt).mkdir()
    for path in [root, *root.iterdir()]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return root


@pytest.fixture
def piped(postfix_factory, scanner, short_tmp, vmail):
    """make(**main) -> a Postfix delivering DOMAIN through etc/postfix/master.cf.pipe."""
    client = write_launcher(short_tmp)
    main, master = pipe_recipe(client, scanner.socket_path, vmail)

    def make(**changes: str):
        return postfix_factory(main={"mydestination": DOMAIN, **main, **changes}, master=master)

    return make


def copies(vmail: Path) -> dict[str, int]:
    return {rcpt: maildir_count(vmail / rcpt) for rcpt in RCPTS}


@contextlib.contextmanager
def full_maildir(vmail: Path, rcpt: str):
    """While inside, `rcpt`'s maildir is on a full disk (a real ENOSPC)."""
    user = pwd.getpwnam(VMAIL_USER)
    with full_dir("64k") as disk:
        box = Path(disk) / "box"
        box.mkdir()
        os.chown(box, user.pw_uid, user.pw_gid)
        fill = Path(disk) / "filler"
        with contextlib.suppress(OSError), open(fill, "wb", buffering=0) as out:
            while out.write(b"\0" * 4096):
                pass
        (vmail / rcpt).rmdir()
        (vmail / rcpt).symlink_to(box)
        try:
            yield
        finally:
            fill.unlink()
            moved = maildir_messages(box)
            (vmail / rcpt).unlink()
            (vmail / rcpt).mkdir()
            os.chown(vmail / rcpt, user.pw_uid, user.pw_gid)
            assert moved == [], "delivered to a full disk?"


def test_clean_mail_is_piped_to_each_maildir_once(piped, vmail):
    pfx = piped()
    sent = pfx.send(SENDER, RCPTS, clean_message("piped clean"))
    assert sent.code == 250, sent
    wait_for(lambda: copies(vmail) == dict.fromkeys(RCPTS, 1), what="one copy each")
    pfx.wait_queue_empty()
    for rcpt in RCPTS:
        [message] = maildir_messages(vmail / rcpt)
        assert message.startswith(b"Return-Path: <alice@example.test>\n")
        assert b"\nX-Virus-Scanned: by amavisd" in message
    assert [m for m in pfx.sink.messages if m.mail_from == ""] == []


@pytest.mark.parametrize("scanner", [{"virus_destiny": "reject"}], indirect=True)
def test_a_rejected_virus_bounces_with_the_daemon_s_status_code(piped, vmail, scanner):
    pfx = piped()
    sent = pfx.send(SENDER, RCPTS[:1], zipped_eicar())
    assert sent.code == 250, sent
    [bounce] = wait_for(lambda: [m for m in pfx.sink.messages if m.mail_from == ""],
                        what="a bounce")
    assert bounce.rcpt_tos == [SENDER]
    assert b"Status: 5.7." in bounce.data, bounce.data[:3000]  # pipe took our code
    assert len(quarantined(scanner)) == 1
    assert copies(vmail) == dict.fromkeys(RCPTS, 0)


def test_the_daemon_down_leaves_the_mail_deferred(piped, vmail, scanner):
    pfx = piped()
    scanner.stop()
    sent = pfx.send(SENDER, RCPTS[:1], clean_message("deferred"))
    assert sent.code == 250, sent
    [entry] = pfx.wait_queued(1, "deferred", timeout=90)
    assert "4.5.0" in entry.reasons[RCPTS[0]] or "amavisd" in entry.reasons[RCPTS[0]], entry
    scanner.start()
    pfx.flush()
    wait_for(lambda: copies(vmail)[RCPTS[0]] == 1, what="the retried delivery")
    pfx.wait_queue_empty()


def test_one_full_maildir_defers_only_its_recipient(piped, vmail):
    pfx = piped()
    with full_maildir(vmail, RCPTS[1]):
        sent = pfx.send(SENDER, RCPTS, clean_message("one full"))
        assert sent.code == 250, sent
        [entry] = pfx.wait_queued(1, "deferred", timeout=90)
        assert entry.recipients == [RCPTS[1]], entry
        assert copies(vmail)[RCPTS[0]] == 1
    pfx.flush()
    wait_for(lambda: copies(vmail) == dict.fromkeys(RCPTS, 1), what="one copy each")
    pfx.wait_queue_empty()


def test_a_recipient_limit_above_one_is_refused_rather_than_deliver_twice(piped, vmail):
    """How a new user tried it first: the pipe without the recipient limit.
    Postfix called the client once for both; the full maildir made it exit
    75 after the first maildir had its copy, and the retry wrote a second.
    The client now refuses such a call (75) before delivering anything."""
    pfx = piped(amavis_destination_recipient_limit="50")
    with full_maildir(vmail, RCPTS[1]):
        sent = pfx.send(SENDER, RCPTS, clean_message("limit 50"))
        assert sent.code == 250, sent
        [entry] = pfx.wait_queued(1, "deferred", timeout=90)
    pfx.flush()
    time.sleep(3)
    counts = copies(vmail)
    assert max(counts.values()) <= 1, f"a maildir got two copies: {counts}"
    assert counts == dict.fromkeys(RCPTS, 0)
    [entry] = pfx.queue()
    assert sorted(entry.recipients) == sorted(RCPTS)
    assert "one recipient a call" in entry.reasons[RCPTS[0]], entry


# -- Postfix smtpd_milters -> our amavisd-milter -> our daemon -> clamd ------------------

MILTER_CF = Path(ROOT) / "etc" / "postfix" / "main.cf.milter"


def milter_main(socket_path: str, **changes: str) -> dict[str, str]:
    """etc/postfix/main.cf.milter with our socket (it must be there once)."""
    text = MILTER_CF.read_text()
    shipped = "unix:/var/lib/amavis/amavisd-milter.sock"
    assert text.count(shipped) == 1, f"{shipped} not once in {MILTER_CF}"
    text = text.replace(shipped, f"unix:{socket_path}")
    main = dict(line.split(" = ", 1) for line in text.splitlines()
                if line.strip() and not line.startswith("#"))
    return main | changes


@contextlib.contextmanager
def milter_stack(short_tmp, postfix_factory, clamd_address: str, daemon_settings=None,
                 milter_options=None, **main_changes: str) -> Iterator[MilterStack]:
    """Postfix -> amavisd-milter -> amavisd -> clamd."""
    with milter_pair(short_tmp, clamd_address, daemon_settings, milter_options,
                     "--socket-group", "postfix") as (socket_path, daemon, milter):
        pfx = postfix_factory(main=milter_main(socket_path, **main_changes))
        yield MilterStack(pfx, milter, daemon, pfx.queue)


def test_clean_mail_through_the_milter_arrives_once_with_x_virus_scanned(
        short_tmp, postfix_factory, clamd_nodecomp):
    with milter_stack(short_tmp, postfix_factory, clamd_nodecomp.address) as stack:
        milter_clean_mail_arrives_once(stack)


@pytest.mark.parametrize("message, kind", BLOCKED)
def test_blocked_mail_is_rejected_with_5xx_and_quarantined(
        short_tmp, postfix_factory, clamd_nodecomp, message, kind):
    with milter_stack(short_tmp, postfix_factory, clamd_nodecomp.address, REJECTING) as stack:
        milter_blocked_is_rejected(stack, message, kind)


def test_a_discarded_virus_is_accepted_dropped_and_quarantined(
        short_tmp, postfix_factory, clamd_nodecomp):
    with milter_stack(short_tmp, postfix_factory, clamd_nodecomp.address,
                      {"virus_destiny": "discard"}) as stack:
        milter_discarded_virus(stack)


def test_a_milter_quarantine_puts_the_mail_in_postfix_s_hold_queue(
        short_tmp, postfix_factory, clamd_nodecomp):
    with milter_stack(short_tmp, postfix_factory, clamd_nodecomp.address,
                      {"virus_destiny": "discard"}, {"quarantine": "discard"}) as stack:
        pfx = stack.mta
        sent = pfx.send(SENDER, ["bob@example.test"], eicar_message())
        assert sent.code == 250, sent
        [held] = pfx.wait_queued(1, "hold")
        assert held.queue_id == sent.queue_id and held.recipients == ["bob@example.test"]
        assert pfx.sink.messages == []
        assert len(quarantined(stack.daemon)) == 1
        pfx.release(held.queue_id)  # the postmaster's call: out of the hold queue, once
        assert len(pfx.sink.wait(1, timeout=60)) == 1
        pfx.wait_queue_empty(include_hold=True)


@pytest.mark.parametrize("what", ["daemon", "milter"])
def test_the_daemon_or_the_milter_down_gives_the_smtp_client_4xx_and_keeps_nothing(
        short_tmp, postfix_factory, clamd_nodecomp, what):
    with milter_stack(short_tmp, postfix_factory, clamd_nodecomp.address) as stack:
        milter_down_is_4xx(stack, getattr(stack, what).stop, what)


@pytest.fixture
def slow_clamd(short_tmp, clamd_nodecomp):
    with stalled_clamd(short_tmp, clamd_nodecomp.socket_path) as proxy:
        yield proxy


@pytest.mark.parametrize("interval, passes", [(0.5, True), (60.0, False)],
                         ids=["progress", "no-progress"])
def test_a_scan_slower_than_milter_content_timeout_completes_thanks_to_progress(
        short_tmp, postfix_factory, slow_clamd, interval, passes):
    with milter_stack(short_tmp, postfix_factory, slow_clamd.address,
                      {"virus_destiny": "reject"}, {"progress_interval": interval},
                      milter_content_timeout="2s") as stack:
        milter_slow_scan(stack, passes)
        if not passes:  # Postfix gave up: milter_default_action
            stack.mta.wait_log("milter.*timeout|read timeout|timed out")


def test_the_readme_shows_the_recipes_these_tests_run():
    mailer = {line.strip() for line in readme_section("With Sendmail (mailer)").splitlines()}
    for line in PIPE_RECIPE.read_text().splitlines():
        line = line.removeprefix("#main.cf: ").strip()
        if line and not line.startswith("#"):
            assert line in mailer, line
    milter = readme_section("With Postfix (milter)")
    shown = [line.strip() for line in milter.splitlines()
             if line.startswith("    ") and " = " in line and not line.strip().startswith(
                 ("milter_listen", "milter_socket_group", "["))]
    assert len(shown) >= 4, shown
    shipped = MILTER_CF.read_text().splitlines()
    for line in shown:
        assert line in shipped, line
