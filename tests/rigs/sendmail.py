# SPDX-License-Identifier: MIT
"""A private, real Sendmail for tests: loopback only, in a tmp dir.

Sendmail is never apt-installed here (it would remove Postfix): tools/deps.sh
unpacks Debian's sendmail-bin/-base/-cf into var/sendmail-root (SENDMAIL_ROOT).
This builds a .cf from the unpacked m4 files and runs `sendmail -bD`
(the daemon, in the foreground, as our child) inside a private UTS namespace
with a dotted host name: with the machine's unqualified name Sendmail sleeps
60 s at every start. Every other sendmail command (queue listing, queue run)
runs the same way. No shell anywhere: `unshare -u` runs a tiny Python helper
that sets the host name and execs Sendmail.

    with SendmailInstance(workdir, milters=["S=unix:/path, F=T, T=..."],
                          mc=["define(`LOCAL_MAILER_PATH', ...)dnl"]) as sm:
        sent = sm.send("a@example.test", ["b@example.test"], message)
        sm.sink.wait(1); sm.queue(); sm.queue(quarantined=True); sm.run_queue()

Mail to other domains goes to the built-in SMTPSink (`sm.sink`) or `relay`
(esmtp on that port); mail to `user@smtest.localdomain` (or a bare `user`)
goes to the local mailer, which `mc` lines may redefine (the mailer-mode
tests put the client there). No syslog on this machine: `traffic_log()`
(-X) and the queue files are what there is to read.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.rigs.postfix import Sent, free_port, smtp_send
from tests.rigs.smtpsink import SMTPSink

__all__ = ["SENDMAIL_ROOT", "QueuedMail", "SendmailInstance", "skip_reason"]

REPO = Path(__file__).resolve().parents[2]
SENDMAIL_ROOT = Path(os.environ.get("SENDMAIL_ROOT") or REPO / "var" / "sendmail-root")
HOSTNAME = "smtest.localdomain"

# Runs under `unshare -u`: name the private UTS namespace, then become Sendmail.
_SETHOST = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execv(sys.argv[2], sys.argv[2:])"

MC = """\
divert(-1)
divert(0)dnl
include(`{cf}/m4/cf.m4')dnl
VERSIONID(`amavisd test rig')dnl
OSTYPE(`linux')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit,MapInUnsafeDirPath,RunProgramInUnsafeDirPath,IncludeFileInUnsafeDirPath,GroupReadableKeyFile')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confDOMAIN_NAME', `{hostname}')dnl
define(`QUEUE_DIR', `{work}/mqueue')dnl
define(`MSP_QUEUE_DIR', `{work}/clientmqueue')dnl
define(`confPID_FILE', `{work}/sendmail.pid')dnl
define(`STATUS_FILE', `{work}/sendmail.st')dnl
define(`ALIAS_FILE', `{work}/aliases')dnl
define(`HELP_FILE', `{root}/etc/mail/helpfile')dnl
define(`confSERVICE_SWITCH_FILE', `{work}/service.switch')dnl
define(`confHOSTS_FILE', `{work}/hosts')dnl
define(`confLOG_LEVEL', `14')dnl
define(`confMILTER_LOG_LEVEL', `14')dnl
define(`confDELIVERY_MODE', `background')dnl
define(`confPRIVACY_FLAGS', `goaway')dnl
define(`confTO_QUEUEWARN', `0')dnl
define(`confCON_EXPENSIVE', `False')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`accept_unqualified_senders')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA-test, Port={port}, Addr=127.0.0.1')dnl
define(`SMART_HOST', `esmtp:[{relay_host}]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {relay_port}')dnl
"""


def skip_reason() -> str | None:
    """Why a private Sendmail cannot run here, or None if it can."""
    binary = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
    if not os.access(binary, os.X_OK):
        return f"Sendmail not unpacked at {SENDMAIL_ROOT} (make deps does it; SENDMAIL_ROOT)"
    for tool in ("/usr/bin/m4", "/usr/bin/unshare"):
        if not os.access(tool, os.X_OK):
            return f"{tool} missing (Debian packages m4, util-linux)"
    if os.geteuid() != 0:
        return "a private Sendmail must be started as root (and needs a UTS namespace)"
    return None


@dataclass
class QueuedMail:
    """One message in Sendmail's queue, read from its qf (or hf: quarantined) file."""

    queue_id: str
    sender: str
    recipients: list[str]
    status: str = ""  # the last delivery attempt's message (qf line M)
    quarantine: str | None = None  # the reason, when in the quarantine (hf file)
    attempts: int = 0
    headers: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return self.quarantine is not None


def _read_qf(path: Path) -> QueuedMail:
    sender, recipients, status, reason, attempts, headers = "", [], "", None, 0, []
    for line in path.read_text(errors="replace").splitlines():
        key, value = line[:1], line[1:]
        if key == "S":
            sender = value.strip("<>")
        elif key == "R":
            recipients.append(value.split(":", 1)[-1].strip("<>"))
        elif key == "M":
            status = value
        elif key == "q":
            reason = value
        elif key == "N":
            attempts = int(value or 0)
        elif key == "H":
            headers.append(re.sub(r"^\?[^?]*\?", "", value))
    if path.name.startswith("hf") and reason is None:
        reason = ""
    return QueuedMail(path.name[2:], sender, recipients, status, reason, attempts, headers)


class SendmailError(RuntimeError):
    pass


class SendmailInstance:
    def __init__(self, workdir: str | os.PathLike[str], *,
                 relay: tuple[str, int] | None = None,
                 milters: Sequence[str] = (), mc: Sequence[str] = (),
                 mailers: Sequence[str] = (), aliases: dict[str, str] | None = None):
        """`milters`: INPUT_MAIL_FILTER equates ("S=unix:/p, F=T, T=E:5m"), or
        whole `INPUT_MAIL_FILTER(...)` lines; `mc`: .mc lines put before the
        MAILER() lines (e.g. LOCAL_MAILER_* defines); `mailers`: lines for
        MAILER_DEFINITIONS (M lines)."""
        self.workdir = Path(workdir)
        self.sink = SMTPSink() if relay is None else None
        self.relay = relay
        self.milters = list(milters)
        self.mc_lines = list(mc)
        self.mailer_lines = list(mailers)
        self.aliases = {"postmaster": "root", "MAILER-DAEMON": "postmaster"} | dict(aliases or {})
        self.cf_dir = SENDMAIL_ROOT / "usr/share/sendmail/cf"
        self.binary = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
        self.queue_dir = self.workdir / "mqueue"
        self.cf = self.workdir / "test.cf"
        self.traffic = self.workdir / "traffic.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._stderr = None

    # -- configuration ----------------------------------------------------------

    def mc_text(self) -> str:
        assert self.relay is not None
        text = MC.format(cf=self.cf_dir, root=SENDMAIL_ROOT, work=self.workdir,
                         hostname=HOSTNAME, port=self.port, relay_host=self.relay[0],
                         relay_port=self.relay[1])
        for number, milter in enumerate(self.milters):
            if milter.lstrip().startswith("INPUT_MAIL_FILTER"):
                text += milter.rstrip("\n") + "\n"
            else:
                text += f"INPUT_MAIL_FILTER(`milter{number}', `{milter}')dnl\n"
        text += "".join(line.rstrip("\n") + "\n" for line in self.mc_lines)
        if self.mailer_lines:
            text += "MAILER_DEFINITIONS\n"
            text += "".join(line.rstrip("\n") + "\n" for line in self.mailer_lines)
        text += "MAILER(`local')dnl\nMAILER(`smtp')dnl\n"
        return text

    def _write_config(self) -> None:
        for name, mode in (("mqueue", 0o700), ("clientmqueue", 0o770)):
            path = self.workdir / name
            path.mkdir(exist_ok=True)
            path.chmod(mode)
        (self.workdir / "service.switch").write_text("hosts\tfiles\naliases\tfiles\n")
        (self.workdir / "hosts").write_text(f"127.0.0.1\tlocalhost {HOSTNAME}\n")
        (self.workdir / "aliases").write_text(
            "".join(f"{name}: {target}\n" for name, target in self.aliases.items()))
        self.port = free_port()
        (self.workdir / "test.mc").write_text(self.mc_text())
        done = subprocess.run(["m4", str(self.workdir / "test.mc")], capture_output=True,
                              text=True, timeout=60)
        if done.returncode or "ERROR" in done.stderr or "***" in done.stderr:
            raise SendmailError(f"m4 failed: {done.stderr}")
        self.cf.write_text(done.stdout)
        self.run("-bi")  # newaliases

    def argv(self, *args: str) -> list[str]:
        """A sendmail command line on our .cf, in a UTS namespace with a dotted name."""
        return ["unshare", "-u", sys.executable, "-I", "-c", _SETHOST, HOSTNAME,
                str(self.binary), "-C", str(self.cf), *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(self.argv(*args), input=input, capture_output=True,
                              timeout=timeout)
        if check and done.returncode:
            raise SendmailError(f"sendmail {' '.join(args)}: rc {done.returncode}: "
                                f"{done.stdout.decode(errors='replace')}"
                                f"{done.stderr.decode(errors='replace')}")
        return done

    # -- life cycle -------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> SendmailInstance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.sink is not None:
            self.relay = self.sink.start()
        try:
            self._write_config()
            self._stderr = open(self.workdir / "sendmail.stderr", "ab")
            self.proc = subprocess.Popen(self.argv("-bD", "-X", str(self.traffic)),
                                         stdout=self._stderr, stderr=self._stderr)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SendmailError(f"sendmail exited with {self.proc.returncode}: "
                                        f"{self.stderr_text()}")
                if smtp_banner(self.port):
                    return self
                time.sleep(0.1)
            raise SendmailError(f"sendmail did not listen on {self.port} in {timeout}s")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.sink is not None:
            self.sink.stop()

    def __enter__(self) -> SendmailInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stderr_text(self) -> str:
        try:
            return (self.workdir / "sendmail.stderr").read_text(errors="replace")
        except OSError:
            return ""

    def traffic_log(self) -> str:
        """The -X traffic log: every SMTP line the daemon and its children saw."""
        try:
            return self.traffic.read_text(errors="replace")
        except OSError:
            return ""

    # -- sending ----------------------------------------------------------------------

    def send(self, sender: str, recipients: Sequence[str], message: bytes, *,
             timeout: float = 120.0) -> Sent:
        """One SMTP transaction to the daemon; never raises for a refusal."""
        return smtp_send(self.port, sender, recipients, message, timeout)

    # -- the queue -----------------------------------------------------------------------

    def queue(self, quarantined: bool | None = False) -> list[QueuedMail]:
        """Queued messages: the normal queue (False), the quarantine (True), or both (None)."""
        prefixes = {False: ("qf",), True: ("hf",), None: ("qf", "hf")}[quarantined]
        entries = []
        for path in sorted(self.queue_dir.iterdir()):
            if path.name[:2] in prefixes:
                try:
                    entries.append(_read_qf(path))
                except OSError:
                    continue  # delivered and removed while we looked
        return entries

    def mailq(self, quarantined: bool = False) -> str:
        """What `mailq` prints (`-bp`; with `-qQ` the quarantine)."""
        args = ("-qQ", "-bp") if quarantined else ("-bp",)
        return self.run(*args, check=False).stdout.decode(errors="replace")

    def run_queue(self, quarantined: bool = False) -> subprocess.CompletedProcess:
        """One queue run in the foreground (`-q`; with -qQ the quarantine)."""
        return self.run("-qQ" if quarantined else "-q", check=False)

    def release(self, queue_id: str) -> None:
        """Take a message out of the quarantine (-qQ -Q with an empty reason);
        the same command may deliver it at once, in the background."""
        self.run(f"-qI{queue_id}", "-qQ", "-Q", check=False)

    def wait_queue_empty(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue():
            if time.monotonic() > deadline:
                raise TimeoutError(f"sendmail queue not empty after {timeout}s: {self.queue()}")
            time.sleep(0.2)

    def wait_queued(self, count: int = 1, quarantined: bool | None = False,
                    timeout: float = 60.0, settled: bool = True) -> list[QueuedMail]:
        """Until `count` messages are queued; with `settled`, each tried at least once."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.queue(quarantined)
            ready = [e for e in entries if not settled or e.attempts or e.held]
            if len(ready) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.2)


def smtp_banner(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(5)
            return sock.recv(512).startswith(b"220")
    except OSError:
        return False
