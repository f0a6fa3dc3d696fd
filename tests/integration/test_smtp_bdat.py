"""BDAT (RFC 3030 CHUNKING) into the real daemon's SMTP/LMTP filter, a real
clamd behind it, the scriptable next hop after it (tests/rigs/nexthop.py).

The chunks are sent raw (`Talk.send`), the way a client that chunks does:
the count, then exactly that many octets, no dot-stuffing. Perl's Net::SMTP
(libnet 3.x: `bdat`/`bdatlast`, one reply awaited a chunk) is a client not
written here that frames BDAT too. Forwarding out stays DATA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration import test_smtp_filter
from tests.integration.test_smtp_filter import start_filter
from tests.rigs.smtptalk import Talk, clean, eicar

pytestmark = pytest.mark.integration

# the filter's fixtures, defined once beside start_filter
hop, notices, flt = test_smtp_filter.hop, test_smtp_filter.notices, test_smtp_filter.flt


def bdat(octets: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(octets), b" LAST" if last else b"") + octets


def in_chunks(message: bytes, count: int) -> list[bytes]:
    step = -(-len(message) // count)
    return [message[i:i + step] for i in range(0, len(message), step)]


def envelope(talk: Talk, rcpts: list[str], hello: str = "EHLO mta.test") -> list[int]:
    """EHLO (or LHLO), MAIL and RCPTs pipelined; their codes."""
    talk.send(f"{hello}\r\nMAIL FROM:<alice@example.test>\r\n".encode()
              + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts))
    return [code for code, _ in talk.replies(2 + len(rcpts))]


def spools(flt) -> list[str]:
    """The workers' open files in the work base: the anonymous spool shows only there."""
    base = str(Path(flt.daemon.settings["workdir"]) / "work")
    found = []
    for pid in flt.daemon.worker_pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(base):
                found.append(target)
    return found


def test_a_clean_message_in_three_chunks_goes_on_byte_for_byte_with_our_header(flt):
    message = clean("in chunks") + b".a dot line\r\n\r\n.\r\nstill the body\r\n"
    with flt.talk() as talk:
        assert envelope(talk, ["bob@example.test"]) == [250, 250, 250]
        first, second, third = in_chunks(message, 3)
        talk.send(bdat(first) + bdat(second))  # pipelined, the last after their replies
        assert talk.replies(2) == [(250, f"2.0.0 {len(first)} octets received"),
                                   (250, f"2.0.0 {len(second)} octets received")]
        talk.send(bdat(third, last=True))
        code, text = talk.reply()
        assert (code, text) == (250, f"2.0.0 from MTA({flt.hop.spec}): 250 2.0.0 Ok: queued "
                                     "as HOP1")
        assert talk.command("QUIT")[0] == 221
    [forwarded] = flt.hop.wait(1)
    head, body = forwarded.data.split(b"\r\n", 1)
    assert head == b"X-Virus-Scanned: by amavisd 0.1.0 at scanner.example.test"
    assert body == message
    assert forwarded.mail_line == f"MAIL FROM:<alice@example.test> SIZE={len(forwarded.data)}"
    log = flt.daemon.log_text()
    assert f"SMTP message of {len(message)} octets in 3 BDAT chunk(s)" in log
    assert "Passed CLEAN" in log and not spools(flt)


def test_eicar_by_bdat_is_rejected_with_its_name(short_tmp, clamd_nodecomp, hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, virus_destiny="reject")
    try:
        with flt.talk() as talk:
            envelope(talk, ["bob@example.test"])
            talk.send(b"".join(bdat(c, last=i == 1) for i, c in enumerate(in_chunks(eicar(), 2))))
            assert talk.reply()[0] == 250
            code, text = talk.reply()
            assert code == 554 and text.startswith("5.7.0 Reject, id=")
            assert "INFECTED: Eicar-Test-Signature" in text
            # the session goes on, in step: a clean one by BDAT 0 LAST after a chunk
            envelope(talk, ["bob@example.test"], hello="RSET")
            talk.send(bdat(clean()) + b"BDAT 0 LAST\r\n")
            assert [c for c, _ in talk.replies(2)] == [250, 250]
    finally:
        flt.daemon.stop()
    [passed] = hop.messages
    assert passed.data.endswith(clean())


def test_lmtp_by_bdat_answers_each_recipient(flt):
    flt.hop.rcpt_replies = {"carol@example.test": "550 5.1.1 unknown user"}
    rcpts = ["bob@example.test", "carol@example.test", "dave@example.test"]
    with flt.talk(lmtp=True) as talk:
        assert envelope(talk, rcpts, hello="LHLO mta.test") == [250] * 5
        talk.send(bdat(clean("lmtp")) + bdat(b"", last=True))
        assert talk.reply() == (250, f"2.0.0 {len(clean('lmtp'))} octets received")
        replies = talk.replies(3)
        envelope(talk, rcpts, hello="RSET")
        talk.send(bdat(eicar(), last=True))
        infected = talk.replies(3)
    assert [c for c, _ in replies] == [250, 550, 250] and "unknown user" in replies[1][1]
    assert [c for c, _ in infected] == [250] * 3 and all("discarded" in t for _, t in infected)
    [forwarded] = flt.hop.wait(1)
    assert forwarded.rcpt_tos == ["bob@example.test", "dave@example.test"]


def test_a_client_that_drops_mid_bdat_leaves_nothing_and_sends_nothing(flt):
    for _ in range(3):  # more connections than workers: each is freed
        with flt.talk() as talk:
            envelope(talk, ["b@example.test"])
            talk.send(bdat(clean()) + b"BDAT 1000 LAST\r\nhalf of it")
            assert talk.reply()[0] == 250
            time.sleep(0.3)
            assert len(spools(flt)) == 1  # mid-message: the spool is open, and anonymous
    time.sleep(1.0)
    assert not flt.hop.messages and not spools(flt) and not flt.work_files()
    with flt.talk() as talk:
        envelope(talk, ["b@example.test"])
        talk.send(bdat(clean(), last=True))
        assert talk.reply()[0] == 250
    assert len(flt.hop.wait(1)) == 1


def test_past_max_message_size_is_552_and_the_connection_serves_on(short_tmp, clamd_nodecomp,
                                                                   hop, notices):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, max_message_size=4096)
    try:
        with flt.talk() as talk:
            envelope(talk, ["b@example.test"])
            talk.send(bdat(b"x" * 3000) + bdat(b"y" * 3000) + bdat(b"z" * 10, last=True))
            assert [c for c, _ in talk.replies(3)] == [250, 552, 503]
            envelope(talk, ["b@example.test"], hello="RSET")
            talk.send(bdat(clean(), last=True))
            assert talk.reply()[0] == 250
    finally:
        flt.daemon.stop()
    assert len(hop.messages) == 1


def test_a_full_work_disk_mid_bdat_is_451(short_tmp, clamd_nodecomp, hop, notices, small_tmpfs):
    flt = start_filter(short_tmp, clamd_nodecomp.address, hop, notices, work_base=small_tmpfs)
    try:
        with flt.talk() as talk:
            envelope(talk, ["b@example.test"])
            block = (b"y" * 998 + b"\r\n") * 512  # 0.5 MiB a chunk, 1 MiB of disk
            talk.send(bdat(clean()) + bdat(block) * 3 + bdat(block, last=True))
            said = talk.replies(5)
            codes = [c for c, _ in said]
            # the chunk that does not fit is refused, not read on to the end; the rest: 503
            full = codes.index(451)
            assert 1 <= full <= 3 and codes == [250] * full + [451] + [503] * (4 - full), said
            assert said[full][1] == "4.3.0 Error: temporary local problem, try again later"
            envelope(talk, ["b@example.test"], hello="RSET")
            talk.send(bdat(clean(), last=True))
            assert talk.reply()[0] == 250  # a small one still fits
    finally:
        flt.daemon.stop()
    assert len(hop.messages) == 1


NET_SMTP = """
use strict; use Net::SMTP;
my ($port, $file) = @ARGV;
open(my $fh, '<:raw', $file) or die; local $/; my $mail = <$fh>;
my $smtp = Net::SMTP->new('127.0.0.1', Port => $port, Hello => 'perl.test', Timeout => 60)
    or die "connect";
die "no CHUNKING" unless defined $smtp->supports('CHUNKING');
# libnet turns BDAT on only with BODY=BINARYMIME, which we do not offer: on by hand
${*$smtp}{'net_smtp_chunking'} = 1;
$smtp->mail('alice@example.test') or die "MAIL";
$smtp->to('bob@example.test') or die "RCPT";
my $half = int(length($mail) / 2);
$smtp->bdat(substr($mail, 0, $half)) or die "BDAT: " . $smtp->message;
$smtp->bdatlast(substr($mail, $half)) or die "BDAT LAST: " . $smtp->message;
print $smtp->code, " ", $smtp->message;
$smtp->quit;
"""


def net_smtp_bdat() -> bool:
    return shutil.which("perl") is not None and subprocess.run(
        ["perl", "-MNet::SMTP", "-e", "exit(Net::SMTP->can('bdatlast') ? 0 : 1)"],
        capture_output=True).returncode == 0


@pytest.mark.skipif(not net_smtp_bdat(), reason="perl's Net::SMTP without bdat")
def test_perl_net_smtp_sends_by_bdat_through_the_filter(flt, short_tmp):
    message = clean("from Net::SMTP")
    eml = short_tmp / "perl.eml"
    eml.write_bytes(message)
    run = subprocess.run(["perl", "-e", NET_SMTP, str(flt.smtp_port), str(eml)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("250 2.0.0 from MTA("), run
    [forwarded] = flt.hop.wait(1)
    assert forwarded.data.split(b"\r\n", 1)[1] == message
    assert "in 2 BDAT chunk(s)" in flt.daemon.log_text()



def postfix_client_sends_bdat() -> bool:
    """Whether this Postfix's smtp(8) client (amavisfeed, and lmtp(8), the
    same program) has BDAT in it at all: 3.7 has not (its smtpd has)."""
    directory = subprocess.run(["postconf", "-dh", "daemon_directory"], capture_output=True,
                               text=True).stdout.strip()
    return b"BDAT" in Path(directory, "smtp").read_bytes()


def test_postfix_takes_bdat_from_a_client_and_hands_it_to_us(short_tmp, clamd_nodecomp,
                                                            postfix_factory):
    """The shipped content_filter and smtpd_proxy_filter snippets, a client
    sending BDAT to Postfix's smtpd (which offers CHUNKING): both messages
    pass our filter once. How Postfix hands them to us is what its client
    can: BDAT if its smtp(8) has BDAT in it, else DATA (Debian's 3.7)."""
    from tests.integration.test_postfix_content_filter import (
        Setup,
        delivered,
        snippet_main,
        snippet_master,
    )
    from tests.rigs.postfix import free_port

    setup = Setup(short_tmp, clamd_nodecomp.address)
    setup.daemon.start()
    proxy_port = free_port()
    proxy = [line.replace("smtp      inet", f"127.0.0.1:{proxy_port} inet")
             for line in snippet_master("master.cf.proxy_filter", setup.ports)]
    pfx = postfix_factory(main=snippet_main("main.cf.content_filter", setup.ports),
                          master=snippet_master("master.cf.content_filter", setup.ports) + proxy)
    try:
        for subject, port in (("after the queue", pfx.smtp_port), ("before it", proxy_port)):
            with Talk("127.0.0.1", port) as talk:
                assert "CHUNKING" in talk.command("EHLO client.example.test")[1].split("\n")
                envelope(talk, ["bob@example.test"], hello="RSET")
                message = clean(subject)
                talk.send(bdat(message[:100]) + bdat(message[100:], last=True))
                assert [c for c, _ in talk.replies(2)] == [250, 250]
        pfx.wait_queue_empty(60)
        pfx.sink.wait(2, timeout=30)
        time.sleep(1.0)
        log = setup.daemon.log_text()
    finally:
        setup.daemon.stop()
    mail = delivered(pfx.sink)
    assert sorted(b"Subject: after the queue" in m.data for m in mail) == [False, True]
    assert all(m.data.count(b"X-Virus-Scanned: by amavisd") == 1 for m in mail)
    assert len(re.findall(r"smtpd\[\d+\]: disconnect from .* bdat=2 ", pfx.log_text())) == 2
    assert log.count("Passed CLEAN") == 2
    assert ("BDAT chunk(s)" in log) is postfix_client_sends_bdat()
