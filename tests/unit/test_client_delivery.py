"""The client's delivery step: the maildir writer, the one-recipient-a-call
rule, and a spool the daemon can read whoever runs the client."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from amavisd_client.delivery import deliver, per_recipient, write_maildir
from amavisd_client.sysexits import EX_NOUSER, EX_OK, EX_TEMPFAIL
from tests.rigs.daemon import client_argv
from tests.rigs.mailboxes import full_dir, maildir_messages

MESSAGE = b"Subject: t\n\nbody\n"
OWNER = "amavisd-test"  # the maildirs' owner when the suite runs as root


def as_owner(function, *args) -> int:
    """`function(*args)` (an exit code), as the maildirs' owner: in a child
    that drops root to OWNER, as pipe(8)'s user= or a mailer's U= would."""
    if os.geteuid() != 0:
        return function(*args)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            user = pwd.getpwnam(OWNER)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            code = function(*args)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def owned(*paths: Path) -> None:
    """Make `paths` (dirs) the maildirs' owner's."""
    if os.geteuid() == 0:
        user = pwd.getpwnam(OWNER)
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)


def test_maildir_delivery_writes_one_file_a_message_into_new(short_tmp):
    box = short_tmp / "bob"
    box.mkdir()
    owned(box)
    assert as_owner(deliver, f"maildir:{box}", "a@x", ["bob"], MESSAGE) == EX_OK
    assert as_owner(deliver, f"maildir:{box}", "a@x", ["bob"], MESSAGE) == EX_OK
    assert maildir_messages(box) == [MESSAGE, MESSAGE]
    assert os.listdir(box / "tmp") == []
    [name, _] = os.listdir(box / "new")
    assert oct(os.stat(box / "new" / name).st_mode & 0o777) == "0o600"


def test_a_maildir_per_recipient_takes_plain_names_only(short_tmp):
    (short_tmp / "bob").mkdir()
    owned(short_tmp / "bob")
    assert as_owner(deliver, f"maildir:{short_tmp}/{{recipient}}", "a@x", ["bob"],
                    MESSAGE) == EX_OK
    for hostile in ("../bob", "..", ".hidden", "a/b", ""):
        assert as_owner(deliver, f"maildir:{short_tmp}/{{recipient}}", "a@x", [hostile],
                        MESSAGE) == EX_NOUSER, hostile
    assert len(maildir_messages(short_tmp / "bob")) == 1
    assert sorted(os.listdir(short_tmp)) == ["bob"]


def test_a_missing_maildir_or_a_full_disk_is_a_tempfail(short_tmp):
    assert as_owner(write_maildir, str(short_tmp / "nobody"), MESSAGE) == EX_TEMPFAIL
    assert not (short_tmp / "nobody").exists()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with full_dir("16k") as disk:
        box = Path(disk) / "box"
        box.mkdir()
        owned(box)
        assert as_owner(write_maildir, str(box), b"x" * 65536) == EX_TEMPFAIL
        assert maildir_messages(box) == [] and os.listdir(box / "tmp") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the attack is on a client run as root")
@pytest.mark.parametrize("link", ["new", "tmp", "maildir"])
def test_maildir_delivery_as_root_never_follows_the_mailbox_owner_s_links(short_tmp, link):
    """Sendmail's F=S mailer runs the client as root, and the README offers
    maildir:/home/{recipient}/Maildir there. The maildir's owner (amavisd-evil)
    made its new/ (or tmp/, or the maildir itself) a link to a dir of root's:
    the sender's bytes must not land there as a root-owned file."""
    evil = pwd.getpwnam("amavisd-evil")
    target = short_tmp / "etc-cron.d"  # root's
    target.mkdir(mode=0o700)
    home = short_tmp / "home"
    home.mkdir()
    os.chown(home, evil.pw_uid, evil.pw_gid)
    box = home / "Maildir"
    if link == "maildir":
        for sub in ("tmp", "new", "cur"):
            (target / sub).mkdir()
        box.symlink_to(target)
    else:
        box.mkdir()
        for sub in ("tmp", "new", "cur"):
            if sub == link:
                (box / sub).symlink_to(target)
            else:
                (box / sub).mkdir()
    for path in (box, *box.iterdir()):
        os.lchown(path, evil.pw_uid, evil.pw_gid)
    code = deliver(f"maildir:{home}/Maildir", "a@x", ["evil"], b"* * * * * root id\n")
    planted = [p for p in target.rglob("*") if p.is_file()]
    assert planted == [], f"root wrote {planted} through {link}"
    assert code == EX_TEMPFAIL


def test_which_templates_deliver_recipient_by_recipient():
    assert per_recipient("mail.local -f {sender} -- {recipient}")
    assert per_recipient("/usr/lib/sm.bin/mail.local,-f,{sender},--,{recipient}")
    assert per_recipient("maildir:/var/vmail/{recipient}/")
    assert not per_recipient("/usr/sbin/sendmail -oi -f {sender} -- {recipients}")
    assert not per_recipient("maildir:/var/vmail/all/")


def test_several_recipients_for_a_per_recipient_agent_are_refused_before_anything(tmp_path):
    """One exit code cannot answer for two deliveries: nothing is delivered,
    nothing is even spooled (the socket does not exist), and the reason says
    what to change."""
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(client_argv() + [
        "-s", str(tmp_path / "no.sock"), "-d", f"maildir:{out}/{{recipient}}", "-f", "a@x",
        "--", "b", "c"], input=MESSAGE, capture_output=True, timeout=60)
    assert done.returncode == EX_TEMPFAIL
    assert b"one recipient a call" in done.stdout, done.stdout
    assert os.listdir(out) == [] and not (tmp_path / "tmp").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group needs root")
def test_the_spool_gets_the_temp_base_s_group(tmp_path):
    """A client run as root (Sendmail's local mailer, for mail.local) spooled
    into a dir of group root: the daemon, its own user, could not read it."""
    from amavisd_client.spool import Spool

    group = grp.getgrnam("mail").gr_gid
    os.chown(tmp_path, -1, group)
    tmp_path.chmod(0o1770)
    spool = Spool(str(tmp_path))
    try:
        assert (os.stat(spool.dir).st_gid, os.stat(spool.path).st_gid) == (group, group)
    finally:
        spool.remove()


def test_a_leading_return_path_stays_on_top_of_the_daemon_s_headers():
    """Sendmail's F=P and Postfix pipe's flags=R add Return-Path as they
    deliver: a header inserted at index 0 (milter semantics) goes below it."""
    from amavisd_client.edits import apply_edits

    edits = [("insheader", ["0", "X-Virus-Scanned", "by us"])]
    assert apply_edits(b"From a@x  Thu\nReturn-Path: <a@x>\nSubject: s\n", edits) == (
        b"From a@x  Thu\nReturn-Path: <a@x>\nX-Virus-Scanned: by us\nSubject: s\n")
    assert apply_edits(b"Subject: s\nReturn-Path: <a@x>\n", edits) == (
        b"X-Virus-Scanned: by us\nSubject: s\nReturn-Path: <a@x>\n")


def test_an_address_is_never_read_as_a_template():
    """Envelope addresses are the sender's text: a recipient `{sender}@x`
    (or a sender holding `{recipient}`) stays what it is, whole."""
    from amavisd_client.delivery import delivery_argvs

    assert delivery_argvs("agent -f {sender} -- {recipient}", "root@evil",
                          ["{sender}@x"]) == [["agent", "-f", "root@evil", "--", "{sender}@x"]]
    assert delivery_argvs("agent,--from={sender},{recipient}", "{recipient}@e",
                          ["bob"]) == [["agent", "--from={recipient}@e", "bob"]]
    assert delivery_argvs("agent -f {sender} -- {recipients}", "{recipients}",
                          ["{sender}", "b"]) == [["agent", "-f", "{recipients}", "--",
                                                  "{sender}", "b"]]


def test_our_headers_go_above_the_first_empty_line_whatever_the_body_holds():
    """A LF message (as pipe and Sendmail's local mailer hand it) whose body
    holds CR CR LF CR CR LF (a bare CR before each LF: Postfix keeps them)
    got its header end put at the CRLFCRLF in the body, and the daemon's
    X-Amavis-Alert written there, out of sight of the filters that read
    headers. Also: a header line of the sender's with a CR of its own does
    not make our lines CRLF in a LF header."""
    from amavisd_client.edits import edit_message

    edits = [("insheader", ["0", "X-Amavis-Alert", "UNCHECKED: encrypted"])]
    assert edit_message(b"Return-Path: <a@x>\nSubject: s\n\nbody\r\n\r\nmore\n", edits) == (
        b"Return-Path: <a@x>\nX-Amavis-Alert: UNCHECKED: encrypted\nSubject: s\n\n"
        b"body\r\n\r\nmore\n")
    assert edit_message(b"Received: x\nSubject: s\r\n\nbody\n", edits) == (
        b"X-Amavis-Alert: UNCHECKED: encrypted\nReceived: x\nSubject: s\r\n\nbody\n")
    assert edit_message(b"Subject: s\r\n\r\nbody\n\nmore\r\n", edits) == (
        b"X-Amavis-Alert: UNCHECKED: encrypted\r\nSubject: s\r\n\r\nbody\n\nmore\r\n")
