"""The SMTP/LMTP content filter of the real daemon, with a real clamd, talked
to with raw SMTP, smtplib and swaks, forwarding to a scriptable next hop.

The next hop (tests/rigs/nexthop.py) stands in for Postfix's re-injection
port where the test needs it to refuse, tempfail or vanish; the Postfix
tests (test_postfix_content_filter.py) run the same paths through Postfix.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.rigs.daemon import DaemonInstance
from tests.rigs.nexthop import NextHop
from tests.rigs.postfix import free_port
from tests.rigs.smtpsink import SMTPSink
from tests.rigs.smtptalk import Talk, banned, clean, eicar, eicar_zipped

pytestmark = pytest.mark.integration


class Filter:
    """A started daemon with an SMTP and an LMTP listener, its next hop and sink."""

    def __init__(self, daemon: DaemonInstance, hop: NextHop, smtp_port: int, lmtp_port: int):
        self.daemon, self.hop = daemon, hop
        self.smtp_port, self.lmtp_port = smtp_port, lmtp_port

    def talk(self, lmtp: bool = False) -> Talk:
        return Talk("127.0.0.1", self.lmtp_port if lmtp else self.smtp_port)

    def quarantined(self) -> list[str]:
        path = Path(self.daemon.settings["quarantine_dir"])
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def work_files(self) -> list[str]:
        base = Path(self.daemon.settings["workdir"]) / "work"
        return sorted(str(p) for p in base.rglob("*")) if base.is_dir() else []


@pytest.fixture
def notices():
    with SMTPSink() as sink:
        yield sink


def start_filter(short_tmp: Path, clamd_address: str, hop: NextHop, notices: SMTPSink,
                 **settings) -> Filter:
    host, port = notices.address
    settings = {"workers": 2, "forward_timeout": 5.0, **settings}
    for attempt in range(3):  # a free port may be taken by another test before we bind it
        smtp_port, lmtp_port = free_port(), free_port()
        daemon = DaemonInstance(short_tmp / f"d{attempt or ''}", clamd_address,
                                smtp_listen=[f"127.0.0.1:{smtp_port}",
                                             f"lmtp:127.0.0.1:{lmtp_port}"],
                                forward_method=hop.spec, notify_method=f"smtp:[{host}]:{port}",
                                **settings)
        try:
            daemon.start()
        except RuntimeError:
            if "cannot bind" not in daemon.log_text() + daemon.stderr_text() or attempt == 2:
                raise
            continue
        return Filter(daemon, hop, smtp_port, lmtp_port)
    raise AssertionError("unreachable")


@pytest.fixture
def hop():
    with NextHop() as server:
        yield server


@pytest.fixture
def flt(short_tmp, clamd_nodecomp, hop, notices):
    instance = start_filter(short_tmp, clamd_nodecomp.address, hop, notices)
    yield instance
    instance.daemon.stop()


def transaction(talk: Talk, sender: str, rcpts: list[str], message: bytes | None,
                helo: str = "EHLO mta.test") -> list[tuple[int, str]]:
    """A whole transaction, pipelined as Postfix does (MAIL, RCPTs, DATA in one
    write); `message` None stops after the 354."""
    replies = [talk.command(helo)]
    group = [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA"]
    talk.send("".join(line + "\r\n" for line in group).encode())
    replies += talk.replies(len(group))
    if replies[-1][0] == 354 and message is not None:
        talk.message(message)
    return replies


def test_clean_mail_goes_on_once_with_our_header_envelope_and_xforward(flt):
    with flt.talk() as talk:
        assert talk.greeting[0] == 220 and "ESMTP" in talk.greeting[1]
        code, ehlo = talk.command("EHLO mta.test")
        assert code == 250
        for keyword in ("PIPELINING", "SIZE 104857600", "8BITMIME", "SMTPUTF8", "DSN",
                        "ENHANCEDSTATUSCODES", "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"):
            assert keyword in ehlo.split("\n")
        assert talk.command("XFORWARD NAME=client.example ADDR=192.0.2.7 PORT=4711 "
                            "HELO=client.helo")[0] == 250
        assert talk.command("XFORWARD PROTO=ESMTP IDENT=4QXABC SOURCE=REMOTE")[0] == 250
        talk.send(b"MAIL FROM:<alice@example.test> BODY=8BITMIME RET=HDRS ENVID=e+2B1\r\n"
                  b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE "
                  b"ORCPT=rfc822;bob@example.test\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n")
        assert [c for c, _ in talk.replies(4)] == [250, 250, 250, 354]
        message = clean("to two") + b".leading dot\r\n"
        talk.message(message)
        code, text = talk.reply()
    assert code == 250
    assert text == f"2.0.0 from MTA({flt.hop.spec}): 250 2.0.0 Ok: queued as HOP1"
    [forwarded] = flt.hop.wait(1)
    assert forwarded.mail_line == (f"MAIL FROM:<alice@example.test> BODY=8BITMIME "
                                   f"SIZE={len(forwarded.data)} RET=HDRS ENVID=e+2B1")
    assert forwarded.rcpt_lines == ["RCPT TO:<bob@example.test> NOTIFY=SUCCESS,FAILURE "
                                    "ORCPT=rfc822;bob@example.test",
                                    "RCPT TO:<carol@example.test>"]
    assert forwarded.xforward == {"NAME": "client.example", "ADDR": "192.0.2.7", "PORT": "4711",
                                  "HELO": "client.helo", "PROTO": "ESMTP", "IDENT": "4QXABC",
                                  "SOURCE": "REMOTE"}
    head, body = forwarded.data.split(b"\r\n", 1)
    assert head == b"X-Virus-Scanned: by amavisd 0.1.0 at scanner.example.test"
    assert body == message  # byte for byte, dot line included
    log = flt.daemon.log_text()
    assert "Passed CLEAN" in log and "[192.0.2.7]" in log and "Queue-ID: 4QXABC" in log
    assert not flt.work_files()  # the spool was an anonymous file


@pytest.mark.parametrize("make, what", [(eicar, "INFECTED: Eicar-Test-Signature"),
                                        (eicar_zipped, "INFECTED: Eicar-Test-Signature"),
                                        (banned, "BANNED")])
def test_blocked_mail_is_discarded_after_quarantine_by_default(flt, make, what):
    with flt.talk() as talk:
        replies = transaction(talk, "mallory@example.test", ["bob@example.test"], make())
        code, text = talk.reply()
    assert [c for c, _ in replies] == [250, 250, 250, 354]
    assert code == 250 and text.startswith("2.7.0 Ok, discarded, id=") and what in text
    time.sleep(0.5)
    assert not flt.hop.messages and len(flt.quarantined()) == 2  # the mail and its sidecar


def test_reject_destiny_is_554_with_the_virus_name(short_tmp, clamd_nodecomp, hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, virus_destiny="reject")
    try:
        with flt.talk() as talk:
            transaction(talk, "mallory@example.test", ["bob@example.test"], eicar())
            code, text = talk.reply()
            assert code == 554 and text.startswith("5.7.0 Reject, id=")
            assert "INFECTED: Eicar-Test-Signature" in text
            # the session goes on: a clean one after it on the same connection
            transaction(talk, "alice@example.test", ["bob@example.test"], clean(), helo="RSET")
            assert talk.reply()[0] == 250
    finally:
        flt.daemon.stop()
    assert len(hop.messages) == 1


def test_scanner_down_is_451_and_nothing_goes_on(short_tmp, hop, notices):
    flt = start_filter(short_tmp, f"unix:{short_tmp}/no-clamd.sock", hop, notices)
    try:
        with flt.talk() as talk:
            transaction(talk, "alice@example.test", ["bob@example.test"], clean())
            code, text = talk.reply()
        assert code == 451 and text.startswith("4.5.0 Temporary failure, id=")
        assert "virus scanner unavailable" in text and "no-clamd" not in text
    finally:
        flt.daemon.stop()
    assert not hop.messages


@pytest.mark.parametrize("setup, code, enhanced", [
    ({"data_reply": "451 4.3.0 queue file write error"}, 451, "4.3.0"),
    ({"data_reply": "554 5.7.1 refused by policy"}, 554, "5.7.1"),
    ({"greeting": "421 4.3.2 shutting down"}, 451, "4.3.2"),
    ({"drop_after": "DOT"}, 451, "4.5.0"),
])
def test_what_the_next_hop_says_decides_our_answer(flt, setup, code, enhanced):
    for name, value in setup.items():
        setattr(flt.hop, name, value)
    with flt.talk() as talk:
        transaction(talk, "alice@example.test", ["bob@example.test"], clean())
        got, text = talk.reply()
    assert (got, text.split(" ", 1)[0]) == (code, enhanced), text
    if setup.get("data_reply"):
        assert f"from MTA({flt.hop.spec}): {setup['data_reply']}" in text


def test_next_hop_down_is_451_without_the_detail(flt):
    flt.hop.stop()
    with flt.talk() as talk:
        transaction(talk, "alice@example.test", ["bob@example.test"], clean())
        code, text = talk.reply()
    assert code == 451 and "Temporary MTA failure on relaying" in text
    assert "refused" not in text.lower()  # errno texts stay in the log
    assert "cannot connect" in flt.daemon.log_text()


def test_a_recipient_the_next_hop_refuses(flt, notices):
    flt.hop.rcpt_replies = {"carol@example.test": "550 5.1.1 <carol@example.test>: unknown"}
    with flt.talk() as talk:
        transaction(talk, "alice@example.test", ["bob@example.test", "carol@example.test"],
                    clean())
        code, text = talk.reply()
    assert code == 250 and text.endswith("but 1 refused by the next hop")
    assert flt.hop.wait(1)[0].rcpt_tos == ["bob@example.test"]
    # our 250 makes the MTA forget carol: we bounce her ourselves, as amavisd-new does
    [dsn] = notices.wait(1, timeout=30)
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["alice@example.test"]
    assert b"Final-Recipient: rfc822; carol@example.test" in dsn.data
    assert b"550 5.1.1 <carol@example.test>: unknown" in dsn.data
    # one tempfailed recipient over SMTP: nothing goes out, all retried later
    flt.hop.rcpt_replies = {"carol@example.test": "452 4.2.2 mailbox full"}
    with flt.talk() as talk:
        transaction(talk, "alice@example.test", ["bob@example.test", "carol@example.test"],
                    clean())
        code, text = talk.reply()
    assert code == 451 and len(flt.hop.messages) == 1


def test_lmtp_answers_each_recipient(flt):
    flt.hop.rcpt_replies = {"carol@example.test": "550 5.1.1 unknown user"}
    flt.hop.data_reply = "250 2.0.0 Ok: queued as LMTP1"
    rcpts = ["bob@example.test", "carol@example.test", "dave@example.test"]
    with flt.talk(lmtp=True) as talk:
        assert "LMTP" in talk.greeting[1]
        assert talk.command("EHLO x")[0] == 500  # LMTP speaks LHLO
        replies = transaction(talk, "alice@example.test", rcpts, clean(), helo="LHLO mta.test")
        assert [c for c, _ in replies] == [250, 250, 250, 250, 250, 354]
        after = talk.replies(3)
        flt.hop.rcpt_replies = {"dave@example.test": "452 4.2.2 mailbox full"}
        transaction(talk, "alice@example.test", rcpts, eicar(), helo="RSET")
        infected = talk.replies(3)
        transaction(talk, "alice@example.test", rcpts, clean(), helo="RSET")
        tempfailed = talk.replies(3)
    assert [c for c, _ in after] == [250, 550, 250]
    assert after[0][1].endswith("Ok: queued as LMTP1") and "unknown user" in after[1][1]
    assert [c for c, _ in infected] == [250, 250, 250]
    assert all("discarded" in t for _, t in infected)
    assert [c for c, _ in tempfailed] == [250, 250, 452]  # only dave is retried
    assert "mailbox full" in tempfailed[2][1]
    assert [m.rcpt_tos for m in flt.hop.messages] == [
        ["bob@example.test", "dave@example.test"], ["bob@example.test", "carol@example.test"]]


def test_size_limits(short_tmp, clamd_nodecomp, hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, max_message_size=4096)
    try:
        with flt.talk() as talk:
            talk.command("EHLO mta.test")
            code, text = talk.command("MAIL FROM:<a@example.test> SIZE=5000")
            assert (code, text) == (552, "5.3.4 Message size exceeds fixed limit")
            # a client that says nothing, then sends too much: read to the end, 552
            transaction(talk, "a@example.test", ["b@example.test"],
                        clean() + (b"x" * 80 + b"\r\n") * 100, helo="RSET")
            code, text = talk.reply()
            assert code == 552 and text.startswith("5.3.4")
            transaction(talk, "a@example.test", ["b@example.test"], clean(), helo="RSET")
            assert talk.reply()[0] == 250  # the connection still serves
    finally:
        flt.daemon.stop()
    assert len(hop.messages) == 1


def test_bad_commands_are_answered_and_bounded(flt):
    with flt.talk() as talk:
        assert talk.command("MAIL FROM:<a@b>")[0] == 503  # no EHLO yet
        assert talk.command("FROB")[0] == 500
        assert talk.command("EHLO")[0] == 501
        assert talk.command("EHLO mta.test")[0] == 250
        assert talk.command("RCPT TO:<b@example.test>")[0] == 503
        assert talk.command("VRFY root")[0] == 502
        assert talk.command("MAIL FROM:<a@example.test> FOO=1")[0] == 555
        assert talk.command("MAIL FROM:<ü@example.test>")[0] == 553
        assert talk.command("MAIL FROM:<a@example.test>")[0] == 250
        assert talk.command("MAIL FROM:<a@example.test>")[0] == 503
        assert talk.command("DATA")[0] == 554  # no recipient
        assert talk.command("XFORWARD ADDR=1.2.3.4")[0] == 503  # within a transaction
        assert talk.command("RSET")[0] == 250
        assert talk.command("NOOP")[0] == 250
        assert talk.command("HELP")[0] == 214
        talk.send(b"NOOP " + b"x" * 5000 + b"\r\n")
        assert talk.reply()[0] == 500
        assert talk.reply() == (0, "")  # and the connection is closed
    with flt.talk() as talk:
        codes = [talk.command("FROB")[0] for _ in range(25)]
    assert codes[:19] == [500] * 19 and codes[19] == 421 and set(codes[20:]) == {0}
    with flt.talk() as talk:  # the worker serves on
        assert talk.command("QUIT") == (221, "2.0.0 Bye")


def test_a_client_that_drops_mid_data_leaves_nothing_and_sends_nothing(flt):
    for _ in range(3):  # more connections than workers: each is freed
        with flt.talk() as talk:
            assert transaction(talk, "a@example.test", ["b@example.test"], None)[-1][0] == 354
            talk.send(clean() + b"half a message")
    time.sleep(1.0)
    assert not flt.hop.messages and not flt.work_files()
    with flt.talk() as talk:
        transaction(talk, "a@example.test", ["b@example.test"], clean())
        assert talk.reply()[0] == 250
    assert len(flt.hop.wait(1)) == 1


def test_clients_outside_smtp_allow_are_refused(short_tmp, clamd_nodecomp, hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices,
                       smtp_allow=["192.0.2.0/24"])
    try:
        with flt.talk() as talk:
            assert talk.greeting[0] == 554
            assert talk.reply() == (0, "")
    finally:
        flt.daemon.stop()
    assert "not in smtp_allow" in flt.daemon.log_text()


def test_smtplib_and_unix_socket_listeners(short_tmp, clamd_nodecomp, hop, notices):
    path = short_tmp / "smtp.sock"
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices)
    flt.daemon.stop()
    flt.daemon.settings["smtp_listen"] = [f"unix:{path}"]
    flt.daemon.start()
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o660"
        with Talk(str(path)) as talk:
            transaction(talk, "a@example.test", ["b@example.test"], clean())
            assert talk.reply()[0] == 250
    finally:
        flt.daemon.stop()
    assert len(hop.messages) == 1


def test_smtplib_sends_through_the_filter(flt):
    with smtplib.SMTP("127.0.0.1", flt.smtp_port, timeout=60) as client:
        refused = client.sendmail("alice@example.test", ["bob@example.test"], clean(),
                                  mail_options=["BODY=8BITMIME"], rcpt_options=["NOTIFY=NEVER"])
        assert refused == {}
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("a@example.test", ["b@example.test"], clean(),
                            mail_options=["SIZE=999999999"])
    assert flt.hop.wait(1)[0].rcpt_lines == ["RCPT TO:<bob@example.test> NOTIFY=NEVER"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_with_pipelining_and_an_infected_mail(short_tmp, clamd_nodecomp, hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, virus_destiny="reject")
    try:
        eml = short_tmp / "virus.eml"
        eml.write_bytes(eicar())
        run = subprocess.run(["swaks", "--server", f"127.0.0.1:{flt.smtp_port}", "--pipeline",
                              "--from", "mallory@example.test", "--to", "bob@example.test",
                              "--data", str(eml)], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "554 5.7.0 Reject" in run.stdout, run.stdout
        run = subprocess.run(["swaks", "--server", f"127.0.0.1:{flt.smtp_port}", "--pipeline",
                              "--from", "alice@example.test", "--to", "bob@example.test",
                              "--header", "Subject: via swaks"], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stdout
        assert "from MTA(" in run.stdout
    finally:
        flt.daemon.stop()
    [message] = hop.messages
    assert b"Subject: via swaks" in message.data and b"X-Virus-Scanned:" in message.data


def worker_peak_rss_kib(pids: set[int]) -> dict[int, int]:
    peaks = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1])
    return peaks


def test_a_50_mb_message_passes_and_the_smtp_side_holds_no_copy(short_tmp, clamd_nodecomp,
                                                              hop, notices, capsys):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, workers=1,
                       max_message_size=64 * 1024 * 1024, clamd_max_stream=64 * 1024 * 1024,
                       forward_timeout=120.0)  # the DATA has smtp_data_timeout
    try:
        line = b"0123456789" * 7 + b"abcdef\r\n"
        body = line * (50 * 1024 * 1024 // len(line))
        message = clean("big") + body
        [pid] = flt.daemon.wait_for_workers(1)
        before = worker_peak_rss_kib({pid})[pid]
        with flt.talk() as talk:
            transaction(talk, "a@example.test", ["b@example.test"], message)
            code, text = talk.reply()
        after = worker_peak_rss_kib({pid})[pid]
    finally:
        flt.daemon.stop()
    assert code == 250, text
    [forwarded] = hop.messages
    assert forwarded.data.endswith(body) and len(forwarded.data) > len(message)
    growth_mib = (after - before) / 1024
    with capsys.disabled():
        print(f"\n50 MiB message through the SMTP filter: worker peak RSS {before / 1024:.0f} "
              f"-> {after / 1024:.0f} MiB (+{growth_mib:.0f} MiB; the spool is mapped and "
              "read a window at a time, big parts decoded straight to their files)")
    # The SMTP side streams to the spool and from it; the pipeline maps the
    # spool and every stage reads it a window at a time (decode.window).
    assert growth_mib < 16, f"worker peak RSS grew by {growth_mib:.0f} MiB"


def test_the_spool_is_private_and_anonymous(flt):
    """Mid-DATA the message is in a file of the worker's 0700 work base that
    has no name: nothing to find, nothing left behind if the worker dies."""
    base = Path(flt.daemon.settings["workdir"]) / "work"
    with flt.talk() as talk:
        assert transaction(talk, "a@example.test", ["b@example.test"], None)[-1][0] == 354
        talk.send(clean())
        time.sleep(1.0)
        spools = []
        for pid in flt.daemon.worker_pids():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(str(base)):
                    spools.append(target)
        assert oct(base.stat().st_mode & 0o777) == "0o700" and os.listdir(base) == []
        assert len(spools) == 1 and spools[0].endswith("(deleted)"), spools
        talk.send(b".\r\n")
        assert talk.reply()[0] == 250
    assert len(flt.hop.wait(1)) == 1


def test_a_full_work_disk_is_451_and_nothing_goes_on(short_tmp, clamd_nodecomp, hop, notices,
                                                    small_tmpfs):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, work_base=small_tmpfs)
    try:
        with flt.talk() as talk:
            transaction(talk, "a@example.test", ["b@example.test"],
                        clean() + (b"y" * 998 + b"\r\n") * 2048)  # 2 MiB on a 1 MiB disk
            code, text = talk.reply()
            assert code == 451 and "temporary local problem" in text
            transaction(talk, "a@example.test", ["b@example.test"], clean(), helo="RSET")
            assert talk.reply()[0] == 250  # a small one still fits
    finally:
        flt.daemon.stop()
    assert len(hop.messages) == 1


def test_a_worker_stuck_on_the_next_hop_answers_451_before_it_dies(short_tmp, clamd_nodecomp,
                                                                   hop, notices):
    hop.data_delay = 30.0  # the next hop takes the data and says nothing
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, child_timeout=3.0,
                       forward_timeout=60.0)
    try:
        with flt.talk(lmtp=True) as talk:
            transaction(talk, "a@example.test", ["b@example.test", "c@example.test"], clean(),
                        helo="LHLO mta.test")
            replies = talk.replies(2)
        assert [c for c, _ in replies] == [451, 451], replies
        assert "stuck for more than child_timeout" in flt.daemon.log_text()
    finally:
        flt.daemon.stop()


def test_lmtp_gives_each_recipient_its_own_destiny(short_tmp, clamd_nodecomp, hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices,
                       bypass_virus_checks=["carol@example.test"],  # eicar.com is banned too
                       bypass_banned_checks=["carol@example.test"], virus_destiny="reject")
    try:
        with flt.talk(lmtp=True) as talk:
            transaction(talk, "m@evil.test", ["bob@example.test", "carol@example.test"],
                        eicar(), helo="LHLO mta.test")
            bob, carol = talk.replies(2)
        with flt.talk() as talk:  # one reply for all over SMTP: the pass ones get it
            transaction(talk, "m@evil.test", ["bob@example.test", "carol@example.test"], eicar())
            code, text = talk.reply()
    finally:
        flt.daemon.stop()
    assert bob[0] == 554 and "INFECTED" in bob[1]
    assert carol[0] == 250 and carol[1].startswith("2.0.0 from MTA(")
    assert code == 250 and text.endswith("but 1 REJECT")
    assert [m.rcpt_tos for m in hop.messages] == [["carol@example.test"]] * 2


def test_bytes_sent_before_the_354_are_the_message_never_later_commands(flt):
    with flt.talk() as talk:
        talk.command("EHLO mta.test")
        talk.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
                  b"Subject: eager\r\n\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<x@y.test>\r\n"
                  b".\r\n")
        assert [c for c, _ in talk.replies(3)] == [250, 250, 354]
        code, text = talk.reply()
        assert code == 250 and "from MTA(" in text
        assert talk.command("NOOP")[0] == 250  # and nothing else was answered
    [message] = flt.hop.wait(1)
    assert message.rcpt_tos == ["b@example.test"]
    assert message.data.endswith(b"\r\nMAIL FROM:<evil@example.test>\r\nRCPT TO:<x@y.test>\r\n")


def test_a_work_base_removed_while_the_worker_waits_is_made_again_for_data(
        short_tmp, clamd_nodecomp, hop, notices):
    """The worker checks its dirs before it waits for a connection; one removed
    in between is made again when DATA needs it, not answered 451."""
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, workers=1)
    try:
        with flt.talk() as talk:  # the worker is up and waiting
            transaction(talk, "a@example.test", ["b@example.test"], clean("warm"))
            assert talk.reply()[0] == 250
        time.sleep(0.3)  # the worker is back waiting, its dirs checked (next look: 1 s on)
        work = Path(flt.daemon.settings["workdir"]) / "work"
        shutil.rmtree(work)
        with flt.talk() as talk:
            replies = transaction(talk, "a@example.test", ["b@example.test"], clean("after"))
            code, text = talk.reply()
        assert [c for c, _ in replies] == [250, 250, 250, 354] and code == 250, text
        assert work.is_dir() and len(hop.wait(2)) == 2
    finally:
        flt.daemon.stop()
