# SPDX-License-Identifier: MIT
"""A private, real Postfix for tests and benchmarks: loopback only, in a tmp dir.

Mail gateways are tested through the MTA that will run them, not a model of
it: this starts Debian's Postfix (`postfix -c DIR start`, no systemd) with
its own config, queue and log under `workdir`, an smtpd on a free loopback
port, and a final destination that keeps what arrives (tests/rigs/
smtpsink.py, or any `relay=(host, port)` such as smtp-sink for a benchmark).

    with PostfixInstance(workdir, milters=["unix:/path/milter.sock"]) as pfx:
        sent = pfx.send("a@example.test", ["b@example.test"], message)
        pfx.sink.wait(1); pfx.queue(); pfx.log_text()

Options: `milters` (smtpd_milters, with milter_default_action = tempfail and
milter_protocol = 6), `content_filter` (main.cf's value, e.g.
"scan:[127.0.0.1]:PORT"; the `scan` (smtp) and `lmtpscan` (lmtp) transports
are always defined) with `reinject=True` for a filter-free smtpd on
`reinject_port`, `main` (more main.cf settings), `master` (more master.cf
lines). Bounces go to the sink too (every address is relayed there).

Postfix prints nothing useful when it fails without a tty: errors carry the
maillog's tail. Everything runs as root (Postfix drops to `postfix` itself);
the workdir must be traversable by user postfix (0755 under /tmp).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.rigs.smtpsink import SMTPSink

__all__ = ["PostfixInstance", "QueueEntry", "Sent", "free_port", "skip_reason", "smtp_send"]

POSTFIX = "/usr/sbin/postfix"
RESERVED_PORTS = {10024, 10025, 10026}  # a real amavisd-new may own them

MAIN_CF = {
    "compatibility_level": "3.6",
    "mail_owner": "postfix",
    "setgid_group": "postdrop",
    "myhostname": "pfxtest.localdomain",
    "mydomain": "localdomain",
    "myorigin": "$myhostname",
    "mydestination": "",
    "inet_interfaces": "127.0.0.1",
    "inet_protocols": "ipv4",
    "mynetworks": "127.0.0.0/8",
    "smtpd_relay_restrictions": "permit_mynetworks, reject",
    "smtp_host_lookup": "native",
    "alias_maps": "",
    "alias_database": "",
    "local_recipient_maps": "",
    "biff": "no",
    "smtpd_error_sleep_time": "0",
    "milter_default_action": "tempfail",
    "milter_protocol": "6",
    "non_smtpd_milters": "",
}

MASTER_CF = """\
{smtpd} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
scan      unix  - - n - 4 smtp
  -o smtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
  -o smtp_data_done_timeout=1200
lmtpscan  unix  - - n - 4 lmtp
  -o lmtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
  -o lmtp_data_done_timeout=1200
"""

REINJECT_CF = """\
{reinject} inet n - n - - smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters,no_address_mappings
  -o smtpd_milters=
  -o smtpd_client_restrictions=
  -o smtpd_helo_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o mynetworks=127.0.0.0/8
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
"""


def skip_reason() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    if not os.access(POSTFIX, os.X_OK):
        return f"{POSTFIX} not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "a private Postfix must be started as root"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "user postfix missing (Debian package postfix)"
    return None


def free_port(avoid: Iterable[int] = ()) -> int:
    """A loopback TCP port nobody listens on now (never 10024-10026)."""
    avoid = set(avoid) | RESERVED_PORTS
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


@dataclass
class QueueEntry:
    """One message in Postfix's queue (`postqueue -j`)."""

    queue_id: str
    queue_name: str  # incoming, active, deferred, hold, maildrop
    sender: str
    recipients: list[str]
    reasons: dict[str, str] = field(default_factory=dict)  # rcpt -> delay reason

    @property
    def held(self) -> bool:
        return self.queue_name == "hold"


@dataclass
class Sent:
    """What the SMTP client was told: the final reply of the transaction."""

    code: int  # 250 when queued; else the refusing reply's code (0: disconnected)
    text: str
    stage: str  # connect, mail, rcpt, data
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def queue_id(self) -> str | None:
        found = re.search(r"queued as ([0-9A-Za-z]+)", self.text)
        return found.group(1) if found else None

    def __str__(self) -> str:
        return f"{self.code} {self.text} (at {self.stage})"


def smtp_send(port: int, sender: str, recipients: Sequence[str], message: bytes,
              timeout: float = 120.0) -> Sent:
    """One SMTP transaction to 127.0.0.1:`port`; never raises for a refusal.
    Bare LF line ends are sent as CRLF (smtplib sends bytes as they are)."""
    message = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
            smtp.ehlo("client.example.test")
            code, text = smtp.mail(sender)
            if code != 250:
                return Sent(code, text.decode(errors="replace"), "mail")
            refused = {}
            for rcpt in recipients:
                code, text = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    refused[rcpt] = (code, text.decode(errors="replace"))
            if len(refused) == len(recipients):
                code, reason = next(iter(refused.values()))
                return Sent(code, reason, "rcpt", refused)
            try:
                code, text = smtp.data(message)
            except smtplib.SMTPDataError as err:
                return Sent(err.smtp_code, err.smtp_error.decode(errors="replace"), "data",
                            refused)
            return Sent(code, text.decode(errors="replace"), "data", refused)
    except smtplib.SMTPConnectError as err:
        return Sent(err.smtp_code, err.smtp_error.decode(errors="replace"), "connect")
    except smtplib.SMTPServerDisconnected as err:
        return Sent(0, f"disconnected: {err}", "connect")
    except OSError as err:
        return Sent(0, f"connection failed: {err}", "connect")


class PostfixError(RuntimeError):
    pass


class PostfixInstance:
    def __init__(self, workdir: str | os.PathLike[str], *, relay: tuple[str, int] | None = None,
                 milters: Sequence[str] = (), content_filter: str | None = None,
                 reinject: bool = False, main: dict[str, str] | None = None,
                 master: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.etc = self.workdir / "etc"
        self.spool = self.workdir / "spool"
        self.data = self.workdir / "data"
        self.maillog = self.workdir / "maillog"
        self.sink = SMTPSink() if relay is None else None
        self.relay = relay
        self.milters = list(milters)
        self.content_filter = content_filter
        self.reinject = reinject
        self.extra_main = dict(main or {})
        self.extra_master = list(master)
        self.smtp_port = 0
        self.reinject_port = 0
        self.running = False

    # -- configuration ----------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        assert self.relay is not None
        host, port = self.relay
        settings = dict(MAIN_CF)
        settings.update({
            "queue_directory": str(self.spool),
            "data_directory": str(self.data),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.workdir),
            "relayhost": f"[{host}]:{port}",
            "smtpd_milters": ", ".join(self.milters),
            "content_filter": self.content_filter or "",
        })
        settings.update(self.extra_main)
        return settings

    def _write_config(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(exist_ok=True)
        self.data.mkdir(exist_ok=True)
        shutil.chown(self.data, "postfix")
        self.data.chmod(0o700)
        self.smtp_port = free_port()
        self.reinject_port = free_port({self.smtp_port}) if self.reinject else 0
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.etc / "main.cf").write_text(main)
        master = MASTER_CF.format(smtpd=f"127.0.0.1:{self.smtp_port}")
        if self.reinject:
            master += REINJECT_CF.format(reinject=f"127.0.0.1:{self.reinject_port}")
        master += "".join(line.rstrip("\n") + "\n" for line in self.extra_master)
        (self.etc / "master.cf").write_text(master)

    def postconf(self, **settings: str) -> None:
        """Change main.cf settings (postconf -e) and reload a running Postfix."""
        self.extra_main.update(settings)
        argv = ["postconf", "-c", str(self.etc), "-e"]
        argv += [f"{key} = {value}" for key, value in settings.items()]
        self._run(argv)
        if self.running:
            self.reload()

    # -- life cycle ---------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostfixInstance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.sink is not None:
            self.relay = self.sink.start()
        try:
            for _attempt in range(3):  # a port taken between our probe and Postfix's bind
                self._write_config()
                done = self._postfix("start", check=False)
                if done.returncode == 0 and self._wait_listening(timeout):
                    self.running = True
                    return self
                self._postfix("stop", check=False)
                self._wait_master_gone(10)
                if "in use" not in self.log_text()[-2000:]:
                    break
            raise PostfixError(f"postfix did not start (rc {done.returncode}):\n"
                               f"{done.stdout}{done.stderr}{self.log_text()[-3000:]}")
        except BaseException:
            if self.sink is not None:
                self.sink.stop()
            raise

    def _wait_listening(self, timeout: float) -> bool:
        started = time.monotonic()
        ports = [self.smtp_port] + ([self.reinject_port] if self.reinject else [])
        while time.monotonic() < started + timeout:
            try:
                for port in ports:
                    with socket.create_connection(("127.0.0.1", port), timeout=2):
                        pass
                return True
            except OSError:
                if self.master_pid() is None and time.monotonic() > started + 5:
                    return False  # the master died (a bind failure, a bad setting)
                time.sleep(0.1)
        return False

    def master_pid(self) -> int | None:
        try:
            pid = int((self.spool / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def _wait_master_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.master_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def reload(self) -> None:
        self._postfix("reload")
        time.sleep(0.5)  # the master re-reads its files and restarts services

    def stop(self) -> None:
        if self.running or self.master_pid() is not None:
            self._postfix("stop", check=False)
            self._wait_master_gone(15)
            pid = self.master_pid()
            if pid is not None:  # never leave a Postfix behind a test
                self._postfix("abort", check=False)
                os.kill(pid, 9)
        self.running = False
        if self.sink is not None:
            self.sink.stop()

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands -------------------------------------------------------------------

    def _run(self, argv: list[str], check: bool = True, timeout: float = 60,
             **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and done.returncode:
            raise PostfixError(f"{' '.join(argv)}: rc {done.returncode}: {done.stdout}"
                               f"{done.stderr}\n{self.log_text()[-2000:]}")
        return done

    def _postfix(self, verb: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run([POSTFIX, "-c", str(self.etc), verb], check=check)

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[str]:
        """Maillog lines matching the regex `pattern`, once `count` are there."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_text().splitlines() if re.search(pattern, line)]
            if len(lines) >= count or time.monotonic() > deadline:
                if len(lines) < count:
                    raise TimeoutError(f"no {pattern!r} x{count} in the maillog within "
                                       f"{timeout}s:\n{self.log_text()[-3000:]}")
                return lines
            time.sleep(0.1)

    # -- the queue ---------------------------------------------------------------------

    def queue(self) -> list[QueueEntry]:
        """Every queued message, hold queue included (postqueue -j)."""
        done = self._run(["postqueue", "-c", str(self.etc), "-j"])
        entries = []
        for line in done.stdout.splitlines():
            item = json.loads(line)
            recipients = item.get("recipients", [])
            entries.append(QueueEntry(
                item["queue_id"], item["queue_name"], item.get("sender", ""),
                [r["address"] for r in recipients],
                {r["address"]: r.get("delay_reason", "") for r in recipients}))
        return entries

    def held(self) -> list[QueueEntry]:
        return [entry for entry in self.queue() if entry.held]

    def wait_queue_empty(self, timeout: float = 60.0, include_hold: bool = False) -> None:
        """Until nothing is queued (the hold queue counts only if asked)."""
        deadline = time.monotonic() + timeout
        while True:
            left = [e for e in self.queue() if include_hold or not e.held]
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout}s: {left}\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def wait_queued(self, count: int = 1, queue_name: str | None = None,
                    timeout: float = 30.0) -> list[QueueEntry]:
        """Until `count` messages are queued (in `queue_name`, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = [e for e in self.queue() if queue_name in (None, e.queue_name)]
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.2)

    def flush(self) -> None:
        """Try deferred mail now (postqueue -f), whatever its back-off says."""
        self._run(["postqueue", "-c", str(self.etc), "-f"])

    def postcat(self, queue_id: str, what: str = "-hq") -> str:
        """A queued message's headers (`-hq`), body (`-bq`) or all (`-q`)."""
        return self._run(["postcat", "-c", str(self.etc), what, queue_id]).stdout

    def release(self, queue_id: str = "ALL") -> None:
        """Release from the hold queue (postsuper -H) and try it now: released
        mail goes to the deferred queue, which waits for the next queue run."""
        self._run(["postsuper", "-c", str(self.etc), "-H", queue_id])
        self.flush()

    def delete(self, queue_id: str = "ALL") -> None:
        self._run(["postsuper", "-c", str(self.etc), "-d", queue_id])

    # -- sending ------------------------------------------------------------------------

    def send(self, sender: str, recipients: Sequence[str], message: bytes, *,
             port: int | None = None, timeout: float = 120.0) -> Sent:
        """One SMTP transaction to our smtpd (or `port`); never raises for a refusal."""
        return smtp_send(port or self.smtp_port, sender, recipients, message, timeout)

    def swaks(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run swaks against our smtpd: `pfx.swaks("--from", a, "--to", b, "--body", text)`."""
        return self._run(["swaks", "--server", f"127.0.0.1:{self.smtp_port}", *args],
                         check=False, timeout=timeout)

    def sendmail(self, sender: str, recipients: Sequence[str], message: bytes) -> int:
        """Local submission (sendmail -C: pickup, non_smtpd_milters); its exit code."""
        return subprocess.run(["sendmail", "-C", str(self.etc), "-i", "-f", sender, "--",
                               *recipients], input=message, capture_output=True,
                              timeout=60).returncode
