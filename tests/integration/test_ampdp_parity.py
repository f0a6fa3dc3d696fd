"""AM.PDP parity with amavisd-new (issue 12, items 1-4), with Debian's own clients.

The same mails go through our daemon and through Debian's amavisd-new 2.13
(tests/rigs/amavisd_new.py), asked by Debian's `amavisd-submit` and
`amavisd-release`, each daemon forwarding to its own SMTP sink:

- delivery_care_of=server: clean mail is forwarded with X-Virus-Scanned and
  answered `250 2.0.0 from MTA(smtp:[...]:PORT): 250 ...`, discard, exit 99;
  the next hop refusing everyone is a reject with its reply, refusing some
  a 250 "..., but 1 REJECT" and a bounce; the next hop down is a tempfail
  (where amavisd-new 2.13 answers discard: see protocol.server_delivery);
- and end to end: Postfix -> Debian's C amavisd-milter -D server -> us ->
  Postfix's re-injection port: the mail arrives once, the milter's copy is
  dropped; with the re-injection port down the SMTP client hears 4xx;
- release: the next hop's reply for each recipient, and the Resent-* block
  and a Received: line on top of the released mail, in amavisd-new's order;
  every refusal is `450 4.5.0 Failure: ...` with exit_code 75;
- request=report is refused the way amavisd-new refuses what is not enabled;
- a dead clamd is answered "virus scanner unavailable", the socket path
  and errno only in our log.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from amavisd_client.wire.ampdp import Decoder, encode_block
from tests.rigs import amavisd_new
from tests.rigs.daemon import DaemonInstance
from tests.rigs.smtpsink import SMTPSink

pytestmark = pytest.mark.integration

AMAVISD_SUBMIT = "/usr/sbin/amavisd-submit"
AMAVISD_RELEASE = "/usr/sbin/amavisd-release"
AMAVISD_MILTER = "/usr/sbin/amavisd-milter"
SENDER, RCPTS = "alice@example.test", ("bob@example.test", "carol@example.test")
RELAYED = re.compile(r"250 2\.0\.0 from MTA\(smtp:\[127\.0\.0\.1\]:\d+\): 250 2\.0\.0 ok: kept")
INTERNALS = ("/tmp", "Errno", "No such file", "nonexistent", ".sock")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def need(path: str, package: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} not installed (Debian package {package})")


# -- the two daemons -------------------------------------------------------------------


class AmavisdNew(amavisd_new.AmavisdNewInstance):
    """The rig's amavisd-new, forwarding, notifying and releasing to `next_hop`."""

    def __init__(self, *args, next_hop: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.next_hop = next_hop

    def _config(self) -> str:
        text = super()._config()
        for name in ("forward_method", "notify_method"):
            line = f"${name} = 'smtp:[127.0.0.1]:9';"
            assert line in text, "the amavisd-new rig's config changed"
            text = text.replace(line, f"${name} = '{self.next_hop}';")
        return text


@pytest.fixture
def sinks():
    made: list[SMTPSink] = []

    def make(**options) -> SMTPSink:
        made.append(SMTPSink(**options))
        made[-1].start()
        return made[-1]

    yield make
    for sink in made:
        sink.stop()


def method(sink: SMTPSink) -> str:
    host, port = sink.address
    return f"smtp:[{host}]:{port}"


@pytest.fixture
def ours(short_tmp, clamd_nodecomp):
    """make(next_hop, **settings) -> our started daemon sending everything to next_hop."""
    made: list[DaemonInstance] = []

    def make(next_hop: str, **settings) -> DaemonInstance:
        values = {"forward_method": next_hop, "notify_method": next_hop,
                  "virus_destiny": "reject", "auth_required_release": False,
                  "admin_notify": []} | settings  # the sink sees only what is tested
        made.append(DaemonInstance(short_tmp / f"ours{len(made)}", clamd_nodecomp.address,
                                   workers=1, **values).start())
        return made[-1]

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture
def theirs(short_tmp, clamd_nodecomp):
    """make(next_hop) -> Debian's amavisd-new, started, sending everything to next_hop."""
    reason = amavisd_new.skip_reason()
    if reason:
        pytest.skip(reason)
    made: list[AmavisdNew] = []

    def make(next_hop: str) -> AmavisdNew:
        made.append(AmavisdNew(short_tmp / f"an{len(made)}", clamd_nodecomp.socket_path,
                               next_hop=next_hop, max_servers=1).start())
        return made[-1]

    yield make
    for instance in made:
        instance.stop()


# -- Debian's clients ------------------------------------------------------------------


def submit(short_tmp: Path, socket_path, tempbase, message: bytes, *recipients: str,
           server: bool = True, as_amavis: bool = False) -> tuple[int, dict[str, list[str]]]:
    """Debian's amavisd-submit (delivery_care_of=server: its own commented-out
    line, put back): (exit status, reply attributes)."""
    need(AMAVISD_SUBMIT, "amavisd-new")
    text = Path(AMAVISD_SUBMIT).read_text()
    for name, value in (("socketname", socket_path), ("tempbase", tempbase)):
        text, n = re.subn(rf"^\s*\${name} = '[^']*';", f"  ${name} = '{value}';", text,
                          count=1, flags=re.M)
        assert n == 1, "amavisd-submit's layout changed"
    text = re.sub(r"^\s*\$log_level = \d+;", "  $log_level = 2;", text, count=1, flags=re.M)
    if server:
        text, n = re.subn(r"^#(\s*'delivery_care_of=server',)", r"\1", text, flags=re.M)
        assert n == 1, "amavisd-submit's layout changed"
    script = short_tmp / f"submit-{time.monotonic_ns()}"
    script.write_text(text)
    script.chmod(0o755)
    argv = ["perl", "-T", str(script), SENDER, *(recipients or RCPTS)]
    if as_amavis:  # amavisd-new must read what the client spools (notes: amavisd-new-ampdp)
        argv = ["runuser", "-u", "amavis", "--", *argv]
    proc = subprocess.run(argv, input=message, capture_output=True, timeout=120)
    attrs: dict[str, list[str]] = {}
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("< ") and "=" in line:
            name, _, value = line[2:].partition("=")
            attrs.setdefault(name, []).append(value)
    return proc.returncode, attrs


def release(short_tmp: Path, socket_path, *args: str) -> list[str]:
    """Debian's amavisd-release: the setreply lines it prints."""
    need(AMAVISD_RELEASE, "amavisd-new")
    text, n = re.subn(r"^\s*\$socketname = '[^']*';", f"  $socketname = '{socket_path}';",
                      Path(AMAVISD_RELEASE).read_text(), count=1, flags=re.M)
    assert n == 1, "amavisd-release's layout changed"
    script = short_tmp / "amavisd-release"
    script.write_text(text)
    proc = subprocess.run(["perl", "-T", str(script), *args], capture_output=True, text=True,
                          timeout=120)
    return (proc.stdout + proc.stderr).strip().splitlines()


def ask(socket_path, attrs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """One raw AM.PDP request with our codec."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(str(socket_path))
        sock.sendall(encode_block(attrs))
        decoder = Decoder()
        while not (blocks := decoder.feed(sock.recv(65536))):
            pass
    return blocks[0].as_dict()


def one(attrs: dict[str, list[str]], name: str) -> str:
    [value] = attrs[name]
    return urllib.parse.unquote(value)


def shape(text: str) -> str:
    """A reply with what differs between two runs (ids, ports) blanked."""
    text = re.sub(r"id=[^ ,]+", "id=ID", text)
    return re.sub(r"127\.0\.0\.1\]:\d+", "127.0.0.1]:PORT", text)


# -- delivery_care_of=server -----------------------------------------------------------


def test_clean_mail_is_forwarded_once_and_answered_as_amavisd_new_does(short_tmp, sinks, ours,
                                                                       theirs):
    our_sink, their_sink = sinks(), sinks()
    daemon, instance = ours(method(our_sink)), theirs(method(their_sink))
    answers = [submit(short_tmp, daemon.socket_path, daemon.tempbase, clean_message()),
               submit(short_tmp, instance.socket_path, instance.tempbase, clean_message(),
                      as_amavis=True)]
    for status, attrs in answers:
        assert status == 0, attrs  # amavisd-submit exits 0 for 99 (discard)
        assert RELAYED.fullmatch(one(attrs, "setreply")), attrs
        assert (one(attrs, "return_value"), one(attrs, "exit_code")) == ("discard", "99")
        assert not {"insheader", "addheader", "chgheader", "delheader"} & set(attrs)
    for sink in (our_sink, their_sink):
        [got] = sink.wait(1, timeout=30)
        assert (got.mail_from, got.rcpt_tos) == (SENDER, list(RCPTS))
        head, _, body = got.data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"X-Virus-Scanned: ")
        assert lines[1].startswith(b"Received: from unknown by localhost (amavis")
        assert body.replace(b"\r\n", b"\n") == clean_message().partition(b"\n\n")[2]
        assert sink.wait(2, timeout=1) == [got]  # once
    assert os.listdir(daemon.tempbase) == []  # tempdir_removed_by=server


def test_infected_mail_is_not_forwarded(short_tmp, sinks, ours):
    sink = sinks()
    daemon = ours(method(sink))
    status, attrs = submit(short_tmp, daemon.socket_path, daemon.tempbase, eicar_message())
    assert status == 69 and one(attrs, "return_value") == "reject"
    assert sink.wait(1, timeout=1) == []


def test_a_next_hop_refusing_everyone_is_a_reject_with_its_reply(short_tmp, sinks, ours, theirs):
    our_sink, their_sink = sinks(refuse=RCPTS), sinks(refuse=RCPTS)
    daemon, instance = ours(method(our_sink)), theirs(method(their_sink))
    replies = []
    for status, attrs in (
            submit(short_tmp, daemon.socket_path, daemon.tempbase, clean_message()),
            submit(short_tmp, instance.socket_path, instance.tempbase, clean_message(),
                   as_amavis=True)):
        assert status == 69, attrs
        assert (one(attrs, "return_value"), one(attrs, "exit_code")) == ("reject", "69")
        replies.append(shape(one(attrs, "setreply")))
    assert replies[0] == replies[1] == (
        "550 5.1.1 id=ID - Rejected by next-hop MTA on relaying, from MTA(smtp:[127.0.0.1]:PORT):"
        " 550 5.1.1 recipient refused by the test sink")
    assert our_sink.messages == their_sink.messages == []


def test_a_next_hop_refusing_some_takes_a_bounce_for_them(short_tmp, sinks, ours, theirs):
    our_sink, their_sink = sinks(refuse=["carol@example.test"]), sinks(refuse=["carol@example.test"])
    daemon, instance = ours(method(our_sink)), theirs(method(their_sink))
    for status, attrs in (
            submit(short_tmp, daemon.socket_path, daemon.tempbase, clean_message()),
            submit(short_tmp, instance.socket_path, instance.tempbase, clean_message(),
                   as_amavis=True)):
        assert status == 0, attrs
        assert re.fullmatch(RELAYED.pattern + ", but 1 REJECT", one(attrs, "setreply")), attrs
        assert (one(attrs, "return_value"), one(attrs, "exit_code")) == ("discard", "99")
    mail, dsn = our_sink.wait(2, timeout=30)
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, ["bob@example.test"])
    assert (dsn.mail_from, dsn.rcpt_tos) == ("", [SENDER])  # the bounce, from <>
    assert b"report-type=\"delivery-status\"" in dsn.data
    assert b"Final-Recipient: rfc822; carol@example.test" in dsn.data
    assert b"Status: 5.1.1" in dsn.data and b"Action: failed" in dsn.data


@pytest.mark.parametrize("trouble", ["down", "4xx"])
def test_a_next_hop_down_or_tempfailing_is_a_tempfail(short_tmp, ours, trouble):
    """amavisd-new 2.13 answers these with return_value=discard (the milter
    would drop mail nobody has): we answer tempfail, the MTA keeps it."""
    port = free_port()
    sink = None
    if trouble == "4xx":
        if shutil.which("smtp-sink") is None:
            pytest.skip("smtp-sink not installed (Debian package postfix)")
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-r", "data",
                                 f"127.0.0.1:{port}", "10"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        daemon = ours(f"smtp:[127.0.0.1]:{port}")
        status, attrs = submit(short_tmp, daemon.socket_path, daemon.tempbase, clean_message())
    finally:
        if sink is not None:
            sink.kill()
            sink.wait()
    assert status == 75, attrs
    assert (one(attrs, "return_value"), one(attrs, "exit_code")) == ("tempfail", "75")
    assert shape(one(attrs, "setreply")) == (
        "451 4.5.0 Temporary failure, id=ID - TEMPFAIL: Temporary MTA failure on relaying")
    assert f"127.0.0.1]:{port}" in daemon.log_text()  # the detail is in the log


def test_amavisd_milter_dash_d_server_end_to_end(short_tmp, postfix_factory, ours):
    """Postfix -> Debian's C amavisd-milter -D server -> us -> Postfix's
    re-injection port -> the sink: once; the milter's own copy is dropped."""
    need(AMAVISD_MILTER, "amavisd-milter")
    milter_sock = short_tmp / "milter.sock"
    pfx = postfix_factory(milters=[f"unix:{milter_sock}"], reinject=True,
                          main={"milter_content_timeout": "120s"})
    daemon = ours(f"smtp:[127.0.0.1]:{pfx.reinject_port}")
    workdir = Path(daemon.tempbase)  # the milter spools where we read
    milter = subprocess.Popen([AMAVISD_MILTER, "-f", "-D", "server", "-s", str(milter_sock),
                               "-S", daemon.socket_path, "-w", str(workdir),
                               "-p", str(short_tmp / "milter.pid")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not milter_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert milter_sock.exists(), "amavisd-milter did not start"
        os.chmod(milter_sock, 0o666)  # Postfix's smtpd connects as postfix
        sent = pfx.send(SENDER, ["bob@example.test"], clean_message())
        assert sent.code == 250, sent
        [got] = pfx.sink.wait(1, timeout=60)
        assert got.rcpt_tos == ["bob@example.test"]
        assert got.data.startswith(b"X-Virus-Scanned: ") or b"\nX-Virus-Scanned: " in got.data
        pfx.wait_queue_empty(60)
        assert pfx.sink.wait(2, timeout=3) == [got]  # once: the milter's copy was dropped
        # one line for the message, with the re-injection's queue id, as amavisd-new's
        [line] = [t for t in daemon.log_text().splitlines() if "Passed CLEAN" in t]
        assert re.search(r", queued_as: [0-9A-Za-z]+, \d+ ms$", line), line

        infected = pfx.send(SENDER, ["bob@example.test"], eicar_message())
        assert infected.code // 100 == 5, infected  # virus_destiny=reject
        daemon.write_config(forward_method=f"smtp:[127.0.0.1]:{free_port()}")
        daemon.signal(1)  # HUP: the re-injection port is now down
        time.sleep(2)
        down = pfx.send(SENDER, ["bob@example.test"], clean_message(subject="later"))
        assert down.code // 100 == 4, down  # the sender keeps the mail
        assert pfx.sink.wait(2, timeout=3) == [got]
    finally:
        milter.terminate()
        milter.wait(10)


# -- release ---------------------------------------------------------------------------


def test_release_replies_and_the_released_mail_match_amavisd_new(short_tmp, sinks, ours, theirs):
    our_sink, their_sink = sinks(refuse=["carol@example.test"]), sinks(refuse=["carol@example.test"])
    daemon = ours(method(our_sink), virus_destiny="discard")
    instance = theirs(method(their_sink))
    submit(short_tmp, daemon.socket_path, daemon.tempbase, eicar_message(), server=False)
    ours_id = re.search(r"quarantine: (virus-\S{12})", daemon.log_text()).group(1)
    instance.check_message(eicar_message(), sender=SENDER, recipients=RCPTS)
    [theirs_id] = os.listdir(instance.quarantine_dir)

    replies = [release(short_tmp, daemon.socket_path, ours_id),
               release(short_tmp, instance.socket_path, theirs_id)]
    assert [[shape(r) for r in rs] for rs in replies] == [[
        "250 2.0.0 from MTA(smtp:[127.0.0.1]:PORT): 250 2.0.0 ok: kept",
        "550 5.1.1 from MTA(smtp:[127.0.0.1]:PORT): 550 5.1.1 recipient refused by the test sink",
    ]] * 2
    trace = []
    for sink, qid in ((our_sink, ours_id), (their_sink, theirs_id)):
        [got] = sink.wait(1, timeout=30)
        assert (got.mail_from, got.rcpt_tos) == (SENDER, ["bob@example.test"])
        names = [line.split(b":")[0] for line in got.data.split(b"\r\n")
                 if line[:1] not in (b" ", b"\t")]
        trace.append(names[:5])
        head = got.data.partition(b"\r\n\r\n")[0].replace(b"\r\n ", b" ")
        assert b"Resent-To: undisclosed-recipients:;" in head
        assert re.search(rb"Resent-Message-ID: <" + qid.split("-")[1].encode() + rb"-\S+@", head)
        assert b"postmaster@" in head.split(b"\r\n")[0]
    assert trace[0] == trace[1] == [b"Resent-From", b"Resent-To", b"Resent-Date",
                                    b"Resent-Message-ID", b"Received"]
    # ours: the stored bytes follow the trace unchanged
    assert our_sink.messages[0].data.replace(b"\r\n", b"\n").endswith(eicar_message())


def test_every_refusal_is_450_failure_exit_75_as_in_amavisd_new(short_tmp, sinks, ours, theirs):
    sink = sinks()
    daemon = ours(method(sink), auth_required_release=True)
    instance = theirs(method(sinks()))
    unknown = [("request", "release"), ("mail_id", "AAAAAAAAAAAA"),
               ("mail_file", "virus-AAAAAAAAAAAA")]
    for socket_path in (daemon.socket_path, instance.socket_path):
        attrs = ask(socket_path, unknown)
        assert one(attrs, "setreply").startswith("450 4.5.0 Failure: "), attrs
        assert (one(attrs, "return_value"), one(attrs, "exit_code")) == ("tempfail", "75")
    submit(short_tmp, daemon.socket_path, daemon.tempbase, eicar_message(), server=False)
    qid = re.search(r"quarantine: (virus-\S{12})", daemon.log_text()).group(1)
    refusals = [ask(daemon.socket_path, unknown),
                ask(daemon.socket_path, [("request", "release"), ("mail_file", qid)]),
                ask(daemon.socket_path, [("request", "release"), ("mail_file", qid),
                                         ("secret_id", "A" * 16)])]
    said = {one(a, "setreply") for a in refusals}
    assert said == {"450 4.5.0 Failure: release refused: no such quarantine entry, or a "
                    "missing or wrong secret_id"}  # one answer: no oracle for which ids exist
    assert sink.wait(1, timeout=0.5) == []


def test_report_requests_are_refused_as_a_feature_not_enabled(ours, sinks):
    daemon = ours(method(sinks()))
    attrs = ask(daemon.socket_path, [("request", "report"), ("mail_id", "AAAAAAAAAAAA")])
    assert one(attrs, "setreply") == ("450 4.5.0 Failure: spam/abuse reporting "
                                      "(request=report) not enabled on this server")
    assert (one(attrs, "return_value"), one(attrs, "exit_code")) == ("tempfail", "75")


# -- replies say nothing internal ---------------------------------------------------------


def test_a_dead_clamd_is_named_as_a_class_and_detailed_in_the_log(short_tmp):
    daemon = DaemonInstance(short_tmp / "d", f"unix:{short_tmp}/nonexistent.sock",
                            workers=1).start()
    try:
        status, attrs = submit(short_tmp, daemon.socket_path, daemon.tempbase, clean_message(),
                               server=False)
    finally:
        daemon.stop()
    assert status == 75 and one(attrs, "return_value") == "tempfail"
    reply = one(attrs, "setreply")
    assert shape(reply) == ("451 4.5.0 Temporary failure, id=ID - TEMPFAIL: "
                            "virus scanner unavailable")
    assert not any(word in reply for word in INTERNALS)
    log_id = re.search(r"id=(\d+-\d+)", reply).group(1)
    [line] = [x for x in daemon.log_text().splitlines() if f"({log_id}) tempfail," in x]
    assert "nonexistent.sock" in line and "cannot connect" in line and "Errno 2" in line
