"""Policy banks and per-recipient settings end to end (issue 12, items 5-6).

Real parts: a private clamd that decodes nothing, the pipeline, the real
daemon over AM.PDP on its Unix socket and on a TCP listener, `amavisd
scan`, an SMTP sink standing in for the MTA's re-injection port (notices,
releases), and Debian's C amavisd-milter with `-B` behind a private Postfix.

What is checked: banks chosen by the client's `policy_bank=` (as
amavisd-milter -B sends it), by the listener (interface_policy), by the
client's network (MYNETS) and ORIGINATING, with the notices each implies
(an outbound banned attachment tells our local sender; an inbound one never
tells the stranger); per-recipient bypasses and per-domain destinies with
mixed recipients; the log line naming the banks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Envelope, Job
from amavisd.pipeline import Pipeline
from amavisd.testing import clamd as clamd_testing
from amavisd.testing.messages import clean_message, eicar_message
from amavisd.verdict import Category, Destiny
from amavisd_client.connection import Connection
from tests.rigs.daemon import DaemonInstance
from tests.rigs.postfix import free_port
from tests.rigs.smtpsink import SMTPSink

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
AMAVISD_MILTER = "/usr/sbin/amavisd-milter"
AMAVISD_RELEASE = "/usr/sbin/amavisd-release"


def banks_toml(banks: dict[str, dict]) -> str:
    lines = []
    for name, table in banks.items():
        lines.append(f'[policy_banks."{name}"]')
        lines += [f"{key} = {configuration.toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


class BankedDaemon(DaemonInstance):
    """The real daemon, its config file with [policy_banks.*] tables too
    (the rig renders only the settings table)."""

    def __init__(self, *args, banks: dict[str, dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.banks = banks

    def write_config(self, **changes):
        path = super().write_config(**changes)
        with open(path, "a") as fh:
            fh.write("\n" + banks_toml(self.banks))
        return path


def banned_message(sender: str = "alice@example.org", to: str = "x@remote.example") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, "the tool"
    msg["Message-ID"] = "<banks-test@example.org>"
    msg.set_content("see attached")
    msg.add_attachment(b"not really a program\n", maintype="application",
                       subtype="octet-stream", filename="tool.exe")
    return msg.as_bytes()


# -- per recipient, through the pipeline ------------------------------------------------

RECIPIENT_SETTINGS = {
    "backup_scanners": [], "notify_method": "smtp:127.0.0.1:9", "myhostname": "gw.example.org",
    "recipient_policy": ["strict.example=STRICT", "boss@example.org=STRICT"],
    "bypass_virus_checks": ["lover@example.org", ".lab.example.org"],
    "bypass_banned_checks": ["fan@example.org"],
    "policy_banks": {"STRICT": {"virus_destiny": "reject", "banned_destiny": "reject"}},
}


@pytest.fixture
def pipeline(clamd_nodecomp, short_tmp):
    def make(**values) -> Pipeline:
        values = RECIPIENT_SETTINGS | {"clamd": clamd_nodecomp.address,
                                       "quarantine_dir": str(short_tmp / "q")} | values
        return Pipeline(configuration.load(None, values))
    return make


def process(pipeline: Pipeline, raw: bytes, tmp: Path, recipients: list[str], **envelope):
    path = tmp / "m.eml"
    path.write_bytes(raw)
    return pipeline.process(Job(log_id="t-1", mail_path=str(path), envelope=Envelope(
        sender="mallory@remote.example", recipients=recipients, **envelope)))


def virus() -> bytes:
    """EICAR under a name no banned rule minds: only the virus check sees it."""
    return eicar_message(filename="eicar.txt")


def test_each_recipient_gets_its_own_destiny_and_the_strictest_answers(pipeline, short_tmp):
    result = process(pipeline(), virus(), short_tmp,
                     ["lover@example.org", "bob@example.org", "carol@strict.example"])
    assert result.recipient_destinies == {"lover@example.org": Destiny.PASS,
                                          "bob@example.org": Destiny.DISCARD,
                                          "carol@strict.example": Destiny.REJECT}
    assert result.recipient_categories["lover@example.org"] is Category.CLEAN
    assert (result.category, result.destiny) == (Category.INFECTED, Destiny.REJECT)
    assert result.quarantine_id.startswith("virus-")  # kept, whoever it was blocked for
    assert result.header_edits == []
    # the same mail without the strict domain: discard, as amavisd-new when none pass
    result = process(pipeline(), virus(), short_tmp, ["lover@example.org", "bob@example.org"])
    assert result.destiny is Destiny.DISCARD
    # a per-address bank beats the domain's default
    result = process(pipeline(), virus(), short_tmp, ["Boss@Example.org"])
    assert result.destiny is Destiny.REJECT and result.policy_banks == ()


def test_a_failure_leaves_no_recipient_outcome_standing(pipeline, short_tmp):
    """The quarantine cannot take the mail (its dir is a file): tempfail for the
    message, and no recipient keeps a discard an ingress could answer with."""
    (short_tmp / "not-a-dir").write_text("")
    failing = pipeline(quarantine_dir=str(short_tmp / "not-a-dir"))
    result = process(failing, virus(), short_tmp, ["lover@example.org", "bob@example.org"])
    assert (result.category, result.destiny) == (None, Destiny.TEMPFAIL)
    assert result.recipient_destinies == {} and result.recipient_categories == {}


def test_banned_checks_bypassed_for_one_recipient_only(pipeline, short_tmp):
    result = process(pipeline(), banned_message(), short_tmp,
                     ["fan@example.org", "bob@example.org"])
    assert result.recipient_destinies == {"fan@example.org": Destiny.PASS,
                                          "bob@example.org": Destiny.DISCARD}
    assert result.category is Category.BANNED and result.destiny is Destiny.DISCARD
    result = process(pipeline(), banned_message(), short_tmp, ["fan@example.org"])
    assert (result.category, result.destiny, result.banned) == (Category.CLEAN, Destiny.PASS, [])
    assert [e.name for e in result.header_edits] == ["X-Virus-Scanned"]


def test_mail_every_recipient_exempts_from_virus_checks_is_not_scanned(pipeline, short_tmp):
    """No scanner is asked (one that is down costs nothing) and no header
    claims a scan; banned rules still apply to those who did not opt out."""
    down = pipeline(clamd="unix:/nonexistent/clamd.sock")
    checked = process(down, virus(), short_tmp, ["bob@example.org"])
    assert checked.destiny is Destiny.TEMPFAIL  # proves this pipeline's scanner is down
    result = process(down, virus(), short_tmp,
                     ["lover@example.org", "eve@lab.example.org"])
    assert (result.category, result.destiny) == (Category.CLEAN, Destiny.PASS)
    assert result.bypassed_virus_checks and result.scanned_by == []
    assert result.header_edits == []
    result = process(down, banned_message(), short_tmp, ["lover@example.org"])
    assert (result.category, result.destiny) == (Category.BANNED, Destiny.DISCARD)


def test_amavisd_scan_applies_the_banks_it_is_given(clamd_nodecomp, short_tmp):
    config = short_tmp / "amavisd.toml"
    values = configuration.defaults() | {
        "clamd": clamd_nodecomp.address, "backup_scanners": [], "quarantine_dir": "",
        "notify_method": "smtp:127.0.0.1:9"}
    config.write_text(configuration.render(values, commented=False) + "\n" + banks_toml(
        {"STRICT": {"virus_destiny": "reject"}, "LOUD": {"x_header_tag": "X-Checked"}}))
    message = short_tmp / "eicar.eml"
    message.write_bytes(eicar_message())
    run = [sys.executable, "-m", "amavisd", "scan", "-c", str(config), "--json"]

    def scan(*flags: str) -> tuple[dict, str]:
        proc = subprocess.run(run + ["-v", *flags, str(message)], capture_output=True,
                              text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 1, proc.stderr
        return json.loads(proc.stdout), proc.stderr

    plain, _ = scan()
    assert (plain["destiny"], plain["policy_banks"]) == ("discard", [])
    strict, said = scan("--policy-bank", "LOUD", "--policy-bank", "STRICT")
    assert (strict["destiny"], strict["policy_banks"]) == ("reject", ["LOUD", "STRICT"])
    assert re.search(r"Blocked INFECTED: Eicar-Test-Signature\S* \{reject\}, LOUD/STRICT <", said)
    assert scan("--policy-bank", "STRICT,LOUD")[0]["policy_banks"] == ["STRICT", "LOUD"]
    typo = subprocess.run(run + ["--policy-bank", "STRIKT", str(message)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert typo.returncode == 64 and "no policy bank named 'STRIKT'" in typo.stderr


# -- the daemon over AM.PDP ------------------------------------------------------------------

DAEMON_BANKS = {
    "STRICT": {"virus_destiny": "reject", "banned_destiny": "reject"},
    # Debian's own: the AM.PDP socket may release without the secret_id
    "AM.PDP-SOCK": {"auth_required_release": False},
}


@pytest.fixture(scope="module")
def banked():
    """One daemon for the AM.PDP tests: the Unix socket loads AM.PDP-SOCK, its
    TCP listener STRICT; notices and releases go to one sink."""
    reason = clamd_testing.skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="amb", dir="/tmp"))
    base.chmod(0o755)
    clamd = clamd_testing.ClamdInstance(base / "clamd", mode="nodecomp").start()
    sink = SMTPSink()
    host, port = sink.start()
    tcp = free_port()
    daemon = BankedDaemon(base / "d", clamd.address, workers=2, banks=DAEMON_BANKS,
                          tcp_listen=f"127.0.0.1:{tcp}",
                          interface_policy=["SOCK=AM.PDP-SOCK", f"{tcp}=STRICT"],
                          notify_method=f"smtp:{host}:{port}", release_method=f"smtp:{host}:{port}",
                          local_domains=["example.org"])
    try:
        daemon.start()
        yield daemon, sink, tcp
    finally:
        daemon.stop()
        sink.stop()
        clamd.stop()
        shutil.rmtree(base, ignore_errors=True)


def ask(daemon: DaemonInstance, raw: bytes, via: str | None = None, sender="alice@example.org",
        recipients=("x@remote.example",), notices_sent: bool = False, **attrs):
    """One AM.PDP request for `raw`, spooled in the daemon's temp base, over
    the Unix socket (default) or `via` (tcp:HOST:PORT). `notices_sent`: then
    ask about a clean message on the same connection, which the worker reads
    only once it has sent every notice of the first (after its reply)."""
    spool = Path(tempfile.mkdtemp(prefix="job", dir=daemon.tempbase))
    (spool / "email.txt").write_bytes(raw)
    (spool / "clean.txt").write_bytes(clean_message())
    request = [("request", "AM.PDP"), ("tempdir", str(spool)),
               ("tempdir_removed_by", "client"), ("mail_file", str(spool / "email.txt")),
               ("sender", f"<{sender}>"), *[("recipient", f"<{r}>") for r in recipients],
               *attrs.items()]
    conn = Connection(via or daemon.socket_path, timeout=120)
    try:
        reply = conn.request(request)
        if notices_sent:
            after = conn.request([("request", "AM.PDP"), ("tempdir", str(spool)),
                                  ("tempdir_removed_by", "client"),
                                  ("mail_file", str(spool / "clean.txt")),
                                  ("sender", "<>"), ("recipient", "<postmaster@example.org>")])
            assert after.get("return_value") == "continue", after.attrs
        return reply
    finally:
        conn.close()
        shutil.rmtree(spool, ignore_errors=True)


def log_line(daemon: DaemonInstance, log_id: str) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [line for line in daemon.log_text().splitlines()
                 if f"({log_id}) " in line and (" Blocked " in line or " Passed " in line)]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no log line for {log_id}")


def test_the_clients_policy_bank_attribute_chooses_banks(banked):
    daemon, _, _ = banked
    plain = ask(daemon, eicar_message(), client_address="203.0.113.5")
    assert plain.get("return_value") == "discard"
    strict = ask(daemon, eicar_message(), client_address="203.0.113.5",
                 policy_bank="NO-SUCH-BANK, STRICT")
    assert strict.get("return_value") == "reject" and strict.get("exit_code") == "69"
    assert "AM.PDP-SOCK/STRICT [203.0.113.5] <alice@example.org>" in log_line(
        daemon, strict.get("log_id"))
    assert "policy bank NO-SUCH-BANK does not exist, ignored" in daemon.log_text()


def test_the_listener_chooses_banks_tcp_versus_the_unix_socket(banked):
    daemon, _, tcp = banked
    unix = ask(daemon, eicar_message(), client_address="203.0.113.5")
    over_tcp = ask(daemon, eicar_message(), via=f"tcp:127.0.0.1:{tcp}",
                   client_address="203.0.113.5")
    assert (unix.get("return_value"), over_tcp.get("return_value")) == ("discard", "reject")
    assert "{reject}, STRICT [203.0.113.5]" in log_line(daemon, over_tcp.get("log_id"))
    assert "{discard}, AM.PDP-SOCK [203.0.113.5]" in log_line(daemon, unix.get("log_id"))
    clean = ask(daemon, clean_message(), via=f"tcp:127.0.0.1:{tcp}")
    assert clean.get("return_value") == "continue"


def test_the_listeners_bank_governs_release_as_debians_am_pdp_sock(banked):
    """Debian sets auth_required_release => 0 in the AM.PDP-SOCK bank: over the
    socket a release needs no secret_id; over the TCP listener it still does."""
    daemon, sink, tcp = banked
    reply = ask(daemon, eicar_message(), client_address="203.0.113.5",
                recipients=("bob@example.org",))
    qid = re.search(r"quarantine: (virus-\S{12})", log_line(daemon, reply.get("log_id"))).group(1)
    before = len(sink.wait(0))
    refused = Connection(f"tcp:127.0.0.1:{tcp}", timeout=60).request(
        [("request", "release"), ("mail_id", qid), ("quar_type", "F")])
    assert not refused.get("setreply", "").startswith("250"), refused.attrs
    released = Connection(daemon.socket_path, timeout=60).request(
        [("request", "release"), ("mail_id", qid), ("quar_type", "F")])
    assert released.get("setreply", "").startswith("250"), released.attrs
    arrived = [m for m in sink.wait(before + 1, timeout=30)[before:]
               if m.rcpt_tos == ["bob@example.org"]]
    assert arrived and b"Subject: virus" in arrived[0].data


@pytest.mark.parametrize("client, banks, sender, told", [
    ("10.1.2.3", "", "alice@example.org", True),          # outbound from mynetworks
    ("203.0.113.5", "ORIGINATING", "alice@example.org", True),  # e.g. an authenticated user
    ("203.0.113.5", "", "eve@remote.example", False),     # inbound from a stranger
    ("203.0.113.5", "", "alice@example.org", False),      # a stranger forging our domain
    ("10.1.2.3", "", "eve@remote.example", False),        # a stranger's mail forwarded out
], ids=["mynets", "originating-bank", "inbound", "forged-local", "forwarded"])
def test_originating_banned_mail_tells_the_local_sender_strangers_never(banked, client, banks,
                                                                      sender, told):
    daemon, sink, _ = banked
    before = len(sink.wait(0))
    attrs = {"client_address": client} | ({"policy_bank": banks} if banks else {})
    reply = ask(daemon, banned_message(sender), sender=sender, notices_sent=True, **attrs)
    assert reply.get("return_value") == "discard"
    arrived = sink.wait(0)[before:]  # every notice of that message: see ask()
    notices = [m for m in arrived if m.rcpt_tos == [sender]]
    assert bool(notices) is told, [m.rcpt_tos for m in arrived]
    assert [m for m in arrived if m.rcpt_tos == ["virusalert@example.org"]]  # always told
    line = log_line(daemon, reply.get("log_id"))
    if told:
        assert notices[0].mail_from == ""  # a notice never starts a loop
        assert b"tool.exe" in notices[0].data and b"could NOT be delivered" in notices[0].data
        assert " LOCAL [" in line
    else:
        assert " LOCAL " not in line or client == "10.1.2.3"
    if client == "10.1.2.3":
        assert f"MYNETS LOCAL [{client}]" in line


# -- Debian's C amavisd-milter -B behind a private Postfix ---------------------------------------

def test_amavisd_milter_dash_b_sends_the_daemon_name_as_bank(short_tmp, clamd_nodecomp,
                                                            postfix_factory):
    if not os.access(AMAVISD_MILTER, os.X_OK):
        pytest.skip("Debian's amavisd-milter is not installed")
    daemon = BankedDaemon(short_tmp / "d", clamd_nodecomp.address, workers=2,
                          banks={"STRICT": {"virus_destiny": "reject"}})
    daemon.start()
    milter_sock = short_tmp / "milter.sock"
    milter = None
    try:
        os.makedirs(daemon.tempbase, exist_ok=True)
        milter = subprocess.Popen(
            [AMAVISD_MILTER, "-f", "-B", "-s", f"unix:{milter_sock}", "-S", daemon.socket_path,
             "-w", daemon.tempbase, "-p", str(short_tmp / "milter.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not milter_sock.exists():
            assert milter.poll() is None and time.monotonic() < deadline, milter.stderr.read()
            time.sleep(0.1)
        milter_sock.chmod(0o666)  # Postfix's smtpd runs as postfix
        plain = postfix_factory(milters=[f"unix:{milter_sock}"])
        sent = plain.send("mallory@remote.example", ["bob@example.test"], eicar_message())
        assert sent.code == 250, sent  # discarded after quarantine, the default
        strict = postfix_factory(milters=[f"unix:{milter_sock}"],
                                 main={"milter_macro_daemon_name": "STRICT"})
        sent = strict.send("mallory@remote.example", ["bob@example.test"], eicar_message())
        assert sent.code == 554 and "Eicar" in sent.text, sent
        clean = strict.send("alice@example.test", ["bob@example.test"], clean_message())
        assert clean.code == 250, clean
        [delivered] = strict.sink.wait(1, timeout=60)
        assert b"X-Virus-Scanned: by amavisd" in delivered.data
        lines = [line for line in daemon.log_text().splitlines() if "INFECTED" in line]
        assert any("{reject}, MYNETS/STRICT LOCAL [127.0.0.1]" in line for line in lines), lines
        assert any("{discard}, MYNETS LOCAL [127.0.0.1]" in line for line in lines), lines
    finally:
        if milter is not None:
            milter.terminate()
            milter.wait(10)
        daemon.stop()
