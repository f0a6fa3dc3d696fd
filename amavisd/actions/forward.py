"""Sending mail out: quarantine releases and notifications share this.

Two methods, chosen by a spec string (amavisd-new's $notify_method and
$forward_method vocabulary), parsed in `methods.py` (the settings check it
there without loading this module):

    smtp:[127.0.0.1]:10025   SMTP to host:port (the MTA's re-injection port)
    smtp:mail.example.com:25
    pipe:/usr/sbin/sendmail  runs PATH -i -f SENDER -- RCPT... (argv, no shell)

The message bytes are handed over as they are: a released message must
reach its recipients byte for byte as it was quarantined. This module must
never go through a shell, and never put an address where it could be read
as an option (the sender follows -f, recipients follow --).
"""

from __future__ import annotations

import re
import smtplib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from amavisd.actions.methods import PipeMethod, SMTPMethod, parse_method
from amavisd.envelope import bare_address

DEFAULT_METHOD = "smtp:[127.0.0.1]:10025"
_BARE_LF = re.compile(rb"(?<!\r)\n")


class ForwardError(Exception):
    """The message could not be handed over; one line saying why."""


class Forwarder(Protocol):
    def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, str]:
        """Hand over one message; returns the recipients refused (address ->
        reply) when others were taken; raises ForwardError when none was."""
        ...


@dataclass
class SMTPForwarder:
    host: str = "127.0.0.1"
    port: int = 10025
    timeout: float = 30.0
    helo: str | None = None  # None: the local FQDN, as smtplib does

    def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, str]:
        if not recipients:
            raise ForwardError("no recipients")
        where = f"smtp:[{self.host}]:{self.port}"
        sender, recipients = bare_address(sender), [bare_address(r) for r in recipients]
        # SMTP wants CRLF lines; smtplib does not convert bytes, and a message
        # spooled with bare LFs would gain a blank line before the final dot.
        data = _BARE_LF.sub(b"\r\n", data)
        # Internationalised addresses need the server's SMTPUTF8 (smtplib checks).
        options = [] if all(a.isascii() for a in [sender, *recipients]) else ["SMTPUTF8"]
        try:
            with smtplib.SMTP(self.host, self.port, local_hostname=self.helo,
                              timeout=self.timeout) as smtp:
                refused = smtp.sendmail(sender, recipients, data, mail_options=options)
        except smtplib.SMTPRecipientsRefused as err:
            raise ForwardError(f"{where}: all recipients refused: "
                               f"{_replies(err.recipients)}") from None
        except smtplib.SMTPResponseException as err:
            text = err.smtp_error.decode("utf-8", "replace")
            raise ForwardError(f"{where}: {err.smtp_code} {text}") from None
        except (smtplib.SMTPException, OSError, UnicodeError) as err:  # OSError: timeouts too
            raise ForwardError(f"{where}: {err}") from None
        return {rcpt: _reply(code, text) for rcpt, (code, text) in refused.items()}


@dataclass
class PipeForwarder:
    """A sendmail-compatible program: PATH [ARGS] -i -f SENDER -- RCPT..."""

    argv: Sequence[str] = ("/usr/sbin/sendmail",)
    timeout: float = 30.0

    def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, str]:
        if not recipients:
            raise ForwardError("no recipients")
        # Postfix, Exim and Sendmail all read "<>" after -f as the null sender.
        argv = [*self.argv, "-i", "-f", bare_address(sender) or "<>", "--",
                *(bare_address(r) for r in recipients)]
        try:
            done = subprocess.run(argv, input=data, capture_output=True,
                                  timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ForwardError(f"{self.argv[0]}: {err}") from None
        if done.returncode != 0:
            said = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise ForwardError(f"{self.argv[0]} exited {done.returncode}"
                               + (f": {said[-1]}" if said else ""))
        return {}


def _reply(code: int, text: bytes) -> str:
    return f"{code} {text.decode('utf-8', 'replace')}"


def _replies(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{rcpt}: {_reply(code, text)}" for rcpt, (code, text) in refused.items())


# The registry: each parsed method (methods.py) -> the Forwarder that sends by it.
FORWARDERS: dict[type, Callable[[Any, float], Forwarder]] = {
    SMTPMethod: lambda method, timeout: SMTPForwarder(method.host, method.port, timeout),
    PipeMethod: lambda method, timeout: PipeForwarder(method.argv, timeout),
}


def forwarder(spec: str, timeout: float = 30.0) -> Forwarder:
    """Build a Forwarder from a method spec; ValueError (one line) if bad."""
    method = parse_method(spec)
    return FORWARDERS[type(method)](method, timeout)
