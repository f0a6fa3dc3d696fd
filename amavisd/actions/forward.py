"""Sending mail out: the content filter's forwarding, releases and notices.

Three methods, chosen by a spec string (amavisd-new's $forward_method and
$notify_method vocabulary), parsed in `methods.py` (the settings check it
there without loading this module):

    smtp:[127.0.0.1]:10025   SMTP to host:port (the MTA's re-injection port)
    smtp:unix:/path          SMTP over a Unix socket
    lmtp:[127.0.0.1]:24      LMTP (one reply per recipient), TCP or lmtp:unix:/path
    pipe:/usr/sbin/sendmail  runs PATH -i -f SENDER -- RCPT... (argv, no shell)

`hand_over()` is the whole answer of the next hop: which recipients it took
(`Handed.accepted`), which it refused while others were taken
(`Handed.refused`), or `ForwardError` when it took none, with `temporary`
saying whether the MTA that gave us the mail should keep it (4xx) or bounce
it (5xx). Anything unsure (connection lost, timeout, a reply we cannot read)
is temporary: a 250 from us must mean the mail is safe with someone.
`send()` is the older, thinner answer (the refused recipients) that notices
and releases use.

The message is streamed from a file or bytes (a 50 MB mail is never copied
whole), in CRLF lines and dot-stuffed on the way (`smtpdata.py`); its bytes
are otherwise handed over as they are: a released message reaches its
recipients byte for byte as it was quarantined. The envelope goes out as it
came in, with the ESMTP parameters the next hop understands (DSN, SIZE,
BODY, SMTPUTF8) and XFORWARD when it offers it (`Params`). This module must
never go through a shell, and never put an address where it could be read
as an option (the sender follows -f, recipients follow --).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from amavisd.actions.methods import PipeMethod, SMTPMethod, parse_method
from amavisd.actions.outcome import ForwardError, Handed, Message, Params
from amavisd.actions.smtpdata import raw_blocks
from amavisd.actions.smtpout import Transaction
from amavisd.envelope import bare_address

DEFAULT_METHOD = "smtp:[127.0.0.1]:10025"


class Forwarder(Protocol):
    def hand_over(self, sender: str, recipients: Sequence[str], data: Message, *,
                  params: Params | None = None,
                  per_recipient: bool = False) -> Handed:
        """Hand over one message; ForwardError when the next hop took none.

        `per_recipient`: the caller can answer each recipient on its own
        (LMTP in): `Handed.refused` then holds 4xx and 5xx replies alike.
        Otherwise (one reply for all: SMTP in, AM.PDP) a recipient the next
        hop tempfails makes the whole hand-over a temporary ForwardError:
        at RCPT before DATA is sent (a retry would deliver twice to the
        others), after DATA (LMTP next hop) too, since a duplicate is better
        than a loss; `Handed.refused` then holds only 5xx replies, which the
        caller must bounce or report."""
        ...

    def send(self, sender: str, recipients: Sequence[str], data: Message) -> dict[str, str]:
        """Hand over one message; returns the recipients refused (address ->
        reply) when others were taken; raises ForwardError when none was."""
        ...


@dataclass
class SMTPForwarder:
    host: str = "127.0.0.1"
    port: int = 10025
    timeout: float = 30.0  # each step: connect, each command, each block of DATA
    helo: str | None = None  # None: the local FQDN, as smtplib does
    lmtp: bool = False
    path: str = ""  # a Unix socket instead of host:port
    keep_idle: float = 0.0  # seconds a session stays open for the next message (0: QUIT)

    @property
    def where(self) -> str:
        proto = "lmtp" if self.lmtp else "smtp"
        return f"{proto}:unix:{self.path}" if self.path else f"{proto}:[{self.host}]:{self.port}"

    def hand_over(self, sender: str, recipients: Sequence[str], data: Message, *,
                  params: Params | None = None, per_recipient: bool = False) -> Handed:
        if not recipients:
            raise ForwardError("no recipients", temporary=False,
                               reply="554 5.5.1 no recipients")
        return Transaction(self.where, self.host, self.port, self.path, self.lmtp, self.helo,
                           self.timeout, per_recipient, self.keep_idle
                           ).run(sender, list(recipients), data, params or Params())

    def send(self, sender: str, recipients: Sequence[str], data: Message) -> dict[str, str]:
        # per_recipient: as before hand_over, the others get the mail whatever
        # one recipient is told (notices and releases report the refused).
        return self.hand_over(sender, recipients, data, per_recipient=True).refused


# Exit codes of a sendmail-like program that say the mail itself is refused
# for good (sysexits.h); any other failure, a signal or a timeout is
# temporary: a misconfigured pipe must not bounce mail.
PERMANENT_EXITS = {65: "5.6.0", 67: "5.1.1", 68: "5.1.2", 69: "5.5.0", 77: "5.7.1"}


@dataclass
class PipeForwarder:
    """A sendmail-compatible program: PATH [ARGS] -i -f SENDER -- RCPT...

    An argv with `{sender}` or `{recipients}` is a template instead: the
    sender fills its item, the recipients take the place of theirs, one item
    each (still no shell)."""

    argv: Sequence[str] = ("/usr/sbin/sendmail",)
    timeout: float = 30.0

    @property
    def where(self) -> str:
        return f"pipe:{self.argv[0]}"

    def command(self, sender: str, recipients: Sequence[str]) -> list[str]:
        # Postfix, Exim and Sendmail all read "<>" after -f as the null sender.
        sender = bare_address(sender) or "<>"
        rcpts = [bare_address(r) for r in recipients]
        if any("{sender}" in a or a == "{recipients}" for a in self.argv):
            argv: list[str] = []
            for arg in self.argv:
                argv += rcpts if arg == "{recipients}" else [arg.replace("{sender}", sender)]
            return argv
        return [*self.argv, "-i", "-f", sender, "--", *rcpts]

    def hand_over(self, sender: str, recipients: Sequence[str], data: Message, *,
                  params: Params | None = None, per_recipient: bool = False) -> Handed:
        if not recipients:
            raise ForwardError("no recipients", temporary=False,
                               reply="554 5.5.1 no recipients")
        argv = self.command(sender, recipients)
        code, said = self._run(argv, data)
        if code == 0:
            reply = f"250 2.6.0 Ok, handed to {self.where}"
            return Handed(self.where, reply, {}, {bare_address(r): reply for r in recipients})
        if code == -1000:
            why = f"{self.argv[0]}: {said}"
        else:
            why = (f"{self.argv[0]} exited {code}" if code > 0
                   else f"{self.argv[0]} killed by signal {-code}") + (f": {said}" if said else "")
        if code in PERMANENT_EXITS:
            raise ForwardError(why, temporary=False,
                               reply=f"554 {PERMANENT_EXITS[code]} {why}")
        raise ForwardError(why, temporary=True, reply=f"451 4.3.0 {why}")

    def _run(self, argv: list[str], data: Message) -> tuple[int, str]:
        """(exit code, last line of stderr); -1000 for a program that could
        not be run or outlived the timeout. stderr goes to a file, so a chatty
        program cannot block us while we feed its stdin."""
        with tempfile.TemporaryFile() as errors:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=errors, start_new_session=True)
            except OSError as err:
                return -1000, err.strerror or str(err)
            timed_out = threading.Event()
            timer = threading.Timer(self.timeout, _kill_group, (proc, timed_out))
            timer.start()
            try:
                assert proc.stdin is not None
                try:
                    for chunk in raw_blocks(data):
                        proc.stdin.write(chunk)
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass  # the exit status says what went wrong
                code = proc.wait()
            finally:
                timer.cancel()
            if timed_out.is_set():
                return -1000, f"timed out after {self.timeout:g}s"
            errors.seek(0)
            lines = errors.read(64 * 1024).decode("utf-8", "replace").strip().splitlines()
        return code, lines[-1][:300] if lines else ""

    def send(self, sender: str, recipients: Sequence[str], data: Message) -> dict[str, str]:
        return self.hand_over(sender, recipients, data).refused


def _kill_group(proc: subprocess.Popen, timed_out: threading.Event) -> None:
    timed_out.set()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


# The registry: each parsed method (methods.py) -> the Forwarder that sends by it.
FORWARDERS: dict[type, Callable[[Any, float, str | None, float], Forwarder]] = {
    SMTPMethod: lambda method, timeout, helo, keep_idle: SMTPForwarder(
        method.host, method.port, timeout, helo, lmtp=method.lmtp, path=method.path,
        keep_idle=keep_idle),
    PipeMethod: lambda method, timeout, helo, keep_idle: PipeForwarder(method.argv, timeout),
}


def forwarder(spec: str, timeout: float = 30.0, helo: str | None = None,
              keep_idle: float = 0.0) -> Forwarder:
    """Build a Forwarder from a method spec; ValueError (one line) if bad.
    `helo`: our name in EHLO/LHLO (None: the local FQDN); `keep_idle`: seconds
    an SMTP/LMTP session may stay open for the next message (0: QUIT each)."""
    method = parse_method(spec)
    return FORWARDERS[type(method)](method, timeout, helo, keep_idle)


__all__ = ["DEFAULT_METHOD", "ForwardError", "Forwarder", "Handed", "Params", "PipeForwarder",
           "SMTPForwarder", "forwarder"]
