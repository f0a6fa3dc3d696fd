"""Postfix with amavisd as its content filter, end to end, from the shipped snippets.

A private Postfix (tests/rigs/postfix.py) runs etc/postfix/main.cf.content_filter
and master.cf.content_filter as they are (only the ports moved off 10024 and
10025), our daemon on the filter port with a real clamd, and Postfix's
re-injection port delivering to an SMTP sink. Each message is counted where
it ends: the sink, the quarantine, Postfix's queue. Nothing lost, nothing
delivered twice. The same with the before-queue smtpd_proxy_filter snippet,
where the sending client hears our reject itself.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.rigs.daemon import DaemonInstance
from tests.rigs.postfix import free_port
from tests.rigs.smtptalk import banned, clean, eicar, eicar_zipped

pytestmark = pytest.mark.integration

ETC = Path(__file__).resolve().parents[2] / "etc" / "postfix"
SENDER = "alice@example.test"


def snippet_main(name: str, ports: dict[int, int]) -> dict[str, str]:
    """`key = value` lines of a main.cf snippet, ports moved."""
    settings = {}
    for line in (ETC / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = moved(value.strip(), ports)
    return settings


def snippet_master(name: str, ports: dict[int, int]) -> list[str]:
    return [moved(line, ports) for line in (ETC / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def moved(text: str, ports: dict[int, int]) -> str:
    return re.sub(r"\b(1002[45])\b", lambda m: str(ports[int(m.group(1))]), text)


class Setup:
    def __init__(self, short_tmp: Path, clamd_address: str, **settings):
        self.filter_port, self.reinject_port = free_port(), free_port()
        self.ports = {10024: self.filter_port, 10025: self.reinject_port}
        forward = f"smtp:[127.0.0.1]:{self.reinject_port}"
        self.settings = dict(smtp_listen=[f"127.0.0.1:{self.filter_port}"],
                             forward_method=forward, notify_method=forward, workers=2,
                             local_domains=["example.test"]) | settings
        self.daemon = DaemonInstance(short_tmp / "d", clamd_address, **self.settings)

    def quarantined(self) -> list[Path]:
        path = Path(self.daemon.settings["quarantine_dir"])
        return sorted(p for p in path.iterdir() if not p.name.endswith(".json")) \
            if path.is_dir() else []


@pytest.fixture
def content_filter(short_tmp, clamd_nodecomp, postfix_factory):
    setup = Setup(short_tmp, clamd_nodecomp.address)
    setup.daemon.start()
    setup.pfx = postfix_factory(main=snippet_main("main.cf.content_filter", setup.ports),
                                master=snippet_master("master.cf.content_filter", setup.ports))
    yield setup
    setup.daemon.stop()


def delivered(sink):
    """The mail itself: notices and bounces come from the null sender."""
    return [m for m in sink.messages if m.mail_from]


def bounces(sink):
    return [m for m in sink.messages if not m.mail_from and m.rcpt_tos != ["virusalert@example.test"]]


def test_every_message_ends_where_it_should_and_only_once(content_filter):
    pfx = content_filter.pfx
    sent = {
        "clean": pfx.send(SENDER, ["bob@example.test", "carol@example.test"], clean("one")),
        "clean2": pfx.send(SENDER, ["bob@example.test"], clean("two")),
        "virus": pfx.send("mallory@evil.test", ["bob@example.test"], eicar()),
        "zipped": pfx.send("mallory@evil.test", ["bob@example.test"], eicar_zipped()),
        "banned": pfx.send("mallory@evil.test", ["bob@example.test"], banned()),
    }
    assert all(s.code == 250 for s in sent.values()), sent  # after the queue: all taken
    pfx.wait_queue_empty(120)
    pfx.sink.wait(2 + 3, timeout=60)  # two clean, three admin alerts
    time.sleep(1.0)  # anything more (a duplicate) would arrive now
    mail = delivered(pfx.sink)
    assert sorted(",".join(sorted(m.rcpt_tos)) for m in mail) == [
        "bob@example.test", "bob@example.test,carol@example.test"]
    for message in mail:
        # our header right above the Received: of the first pass through Postfix
        assert message.data.count(b"X-Virus-Scanned: by amavisd") == 1
        assert re.search(rb"\r\nX-Virus-Scanned: by amavisd [^\r]*\r\nReceived: from "
                         rb"client\.example\.test ", message.data), message.data[:400]
        assert b"Subject: one" in message.data or b"Subject: two" in message.data
    alerts = [m for m in pfx.sink.messages if m.rcpt_tos == ["virusalert@example.test"]]
    assert len(alerts) == 3
    assert len(content_filter.quarantined()) == 3
    assert not bounces(pfx.sink)  # discarded: nothing goes back to a forged sender
    log = pfx.log_text()
    sent_on = (rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{content_filter.filter_port}.*status=sent "
               rf"\(250 2\.0\.0 from MTA\(smtp:\[127\.0\.0\.1\]:{content_filter.reinject_port}\)")
    assert len(re.findall(sent_on, log)) == 3  # clean: 2 recipients + 1
    assert len(re.findall(r"status=sent \(250 2\.7\.0 Ok, discarded", log)) == 3
    # XFORWARD both ways: our log has Postfix's queue id, the re-injection the original's
    ours = re.findall(r"Passed CLEAN .*Queue-ID: ([0-9A-F]+)", content_filter.daemon.log_text())
    assert len(ours) == 2
    for queue_id in ours:
        assert re.search(rf"client=localhost\[127\.0\.0\.1\], orig_queue_id={queue_id}, "
                         r"orig_client=localhost\[127\.0\.0\.1\]", log)


def test_tempfail_keeps_the_mail_in_postfix_until_it_can_be_checked(short_tmp, clamd_nodecomp,
                                                                    postfix_factory):
    setup = Setup(short_tmp, f"unix:{short_tmp}/no-clamd.sock")
    setup.daemon.start()
    pfx = postfix_factory(main=snippet_main("main.cf.content_filter", setup.ports),
                          master=snippet_master("master.cf.content_filter", setup.ports))
    try:
        assert pfx.send(SENDER, ["bob@example.test"], clean("kept")).code == 250
        pfx.wait_log(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451 4\.5\.0",
                     timeout=60)
        [entry] = pfx.queue()
        assert entry.queue_name == "deferred" and not delivered(pfx.sink)
        setup.daemon.stop()  # the scanner comes back: the same mail goes through, once
        setup.daemon.settings["clamd"] = clamd_nodecomp.address
        setup.daemon.start()
        pfx.flush()
        pfx.wait_queue_empty(120)
        time.sleep(1.0)
        [message] = delivered(pfx.sink)
        assert b"Subject: kept" in message.data
    finally:
        setup.daemon.stop()


def test_reject_after_the_queue_is_a_bounce_from_postfix(short_tmp, clamd_nodecomp,
                                                         postfix_factory):
    setup = Setup(short_tmp, clamd_nodecomp.address, virus_destiny="reject")
    setup.daemon.start()
    pfx = postfix_factory(main=snippet_main("main.cf.content_filter", setup.ports),
                          master=snippet_master("master.cf.content_filter", setup.ports))
    try:
        assert pfx.send(SENDER, ["bob@example.test"], eicar()).code == 250
        pfx.wait_queue_empty(120)
        pfx.sink.wait(2, timeout=60)  # the bounce, and the admin's alert
        [bounce] = bounces(pfx.sink)
        assert bounce.mail_from == "" and bounce.rcpt_tos == [SENDER]
        assert b"554 5.7.0 Reject" in bounce.data and b"Eicar-Test-Signature" in bounce.data
        assert not delivered(pfx.sink)
    finally:
        setup.daemon.stop()


def test_lmtp_feed_delivers_each_recipient_once(short_tmp, clamd_nodecomp, postfix_factory):
    setup = Setup(short_tmp, clamd_nodecomp.address)
    setup.daemon.settings["smtp_listen"] = [f"lmtp:127.0.0.1:{setup.filter_port}"]
    setup.daemon.start()
    master = [re.sub(r"^(amavisfeed .*)smtp$", r"\1lmtp", line).replace("-o smtp_", "-o lmtp_")
              for line in snippet_master("master.cf.content_filter", setup.ports)]
    pfx = postfix_factory(main=snippet_main("main.cf.content_filter", setup.ports),
                          master=master)
    try:
        assert pfx.send(SENDER, ["bob@example.test", "carol@example.test"], clean()).code == 250
        pfx.wait_queue_empty(120)
        pfx.sink.wait(1, timeout=60)
        time.sleep(1.0)
        [message] = delivered(pfx.sink)
        assert sorted(message.rcpt_tos) == ["bob@example.test", "carol@example.test"]
        assert len(re.findall(r"status=sent \(250 2\.0\.0 from MTA", pfx.log_text())) == 2
    finally:
        setup.daemon.stop()


def test_before_queue_proxy_filter_the_client_hears_our_reject(short_tmp, clamd_nodecomp,
                                                              postfix_factory):
    setup = Setup(short_tmp, clamd_nodecomp.address, virus_destiny="reject")
    setup.daemon.start()
    proxy_port = free_port()
    proxy = [line.replace("smtp      inet", f"127.0.0.1:{proxy_port} inet")
             for line in snippet_master("master.cf.proxy_filter", setup.ports)]
    reinject = snippet_master("master.cf.content_filter", setup.ports)
    reinject = reinject[reinject.index(next(r for r in reinject if r.startswith("127.0.0.1:"))):]
    pfx = postfix_factory(master=proxy + reinject)
    try:
        virus = pfx.send("mallory@example.test", ["bob@example.test"], eicar(), port=proxy_port)
        assert virus.code == 554 and virus.stage == "data", virus
        assert virus.text.startswith("5.7.0 Reject, id=") and "Eicar-Test-Signature" in virus.text
        ok = pfx.send(SENDER, ["bob@example.test"], clean("proxied"), port=proxy_port)
        assert ok.code == 250, ok
        pfx.wait_queue_empty(120)
        pfx.sink.wait(2, timeout=60)  # the clean one, and the admin's alert
        time.sleep(1.0)
        [message] = delivered(pfx.sink)
        assert b"Subject: proxied" in message.data
        assert b"\r\nX-Virus-Scanned: by amavisd" in message.data
        assert len(setup.quarantined()) == 1
    finally:
        setup.daemon.stop()
