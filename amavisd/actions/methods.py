"""How a way of sending mail, or of taking it in, is written.

Sending (`forward_method`, `notify_method`, `release_method`):

    smtp:[127.0.0.1]:10025   smtp:mail.example.com:25   smtp:unix:/path/to/socket
    lmtp:[127.0.0.1]:24      lmtp:unix:/var/run/dovecot/lmtp
    pipe:/usr/sbin/sendmail [ARGS]     pipe:/path/prog -f {sender} -- {recipients}

Taking in (`smtp_listen`), an optional protocol, then an address:

    127.0.0.1:10024   smtp:[::1]:10024   lmtp:127.0.0.1:10024   unix:/path   lmtp:unix:/path

The methods are checked when the config is read, yet the settings must not
import what sends mail (smtplib, subprocess) or binds sockets. So the
spellings are parsed here, beside the forwarders' registry in `forward.py`
(which turns a parsed method into a `Forwarder`) and `listeners.py` (which
binds what `parse_listen` read). Standard library only; nothing here sends
or listens.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Callable
from dataclasses import dataclass

from amavisd_client.wire.address import AddressError, parse_host_port


@dataclass(frozen=True)
class SMTPMethod:
    host: str
    port: int
    lmtp: bool = False  # RFC 2033: one reply per recipient after DATA
    path: str = ""  # a Unix socket instead of host:port


@dataclass(frozen=True)
class PipeMethod:
    argv: tuple[str, ...]  # a sendmail-compatible program and its own arguments


Method = SMTPMethod | PipeMethod


def _socket_method(kind: str, rest: str) -> SMTPMethod:
    lmtp = kind == "lmtp"
    if rest.startswith("unix:"):
        path = rest[len("unix:"):]
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{kind} method over a Unix socket must be {kind}:unix:/absolute/path")
        return SMTPMethod("", 0, lmtp, path)
    try:
        host, port = parse_host_port(rest)
    except AddressError:
        raise ValueError(f"{kind} method must be {kind}:HOST:PORT or {kind}:unix:/path, "
                         f"e.g. {kind}:[127.0.0.1]:{24 if lmtp else 10025}") from None
    return SMTPMethod(host, port, lmtp)


def _smtp(rest: str) -> SMTPMethod:
    return _socket_method("smtp", rest)


def _lmtp(rest: str) -> SMTPMethod:
    return _socket_method("lmtp", rest)


def _pipe(rest: str) -> PipeMethod:
    argv = shlex.split(rest)
    if not argv or not argv[0].startswith("/"):
        raise ValueError("pipe method must be pipe:/absolute/path [args], "
                         "e.g. pipe:/usr/sbin/sendmail")
    return PipeMethod(tuple(argv))


PARSERS: dict[str, Callable[[str], Method]] = {"smtp": _smtp, "lmtp": _lmtp, "pipe": _pipe}


def parse_method(spec: str) -> Method:
    """A method spec parsed; ValueError (one line) if bad."""
    kind, _, rest = spec.partition(":")
    if kind not in PARSERS:
        raise ValueError(f"unknown method {spec!r}; use smtp:HOST:PORT, lmtp:HOST:PORT, "
                         "smtp:unix:/path, lmtp:unix:/path or pipe:/path/to/sendmail")
    return PARSERS[kind](rest)


def method_spec(value: str) -> str:
    """Config validator for *_method settings."""
    parse_method(value)
    return value


@dataclass(frozen=True)
class ListenSpec:
    """Where an SMTP or LMTP listener takes mail in."""

    protocol: str  # "smtp" | "lmtp": a tag in protocol.registry
    host: str = ""
    port: int = 0
    path: str = ""  # a Unix socket instead of host:port

    @property
    def loopback(self) -> bool:
        if self.path:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


LISTEN_PROTOCOLS = ("smtp", "lmtp")


def parse_listen(spec: str) -> ListenSpec:
    """`[smtp:|lmtp:]HOST:PORT` or `[smtp:|lmtp:]unix:/path`; ValueError (one line) if bad."""
    protocol, sep, rest = spec.partition(":")
    if not sep or protocol not in LISTEN_PROTOCOLS:
        protocol, rest = "smtp", spec
    if rest.startswith("unix:"):
        path = rest[len("unix:"):]
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{spec!r}: a Unix socket is unix:/absolute/path")
        return ListenSpec(protocol, path=path)
    try:
        host, port = parse_host_port(rest)
    except AddressError:
        raise ValueError(f"{spec!r}: use [smtp:|lmtp:]HOST:PORT or [smtp:|lmtp:]unix:/path, "
                         "e.g. 127.0.0.1:10024") from None
    return ListenSpec(protocol, host, port)


def listen_specs(value: list[str]) -> list[str]:
    """Config validator for `smtp_listen`: each entry parses, none twice."""
    seen: set[ListenSpec] = set()
    for entry in value:
        spec = parse_listen(entry)
        if ListenSpec("", spec.host, spec.port, spec.path) in seen:
            raise ValueError(f"{entry!r} is listed twice")
        seen.add(ListenSpec("", spec.host, spec.port, spec.path))
    return value


def client_networks(value: list[str]) -> list[str]:
    """Config validator for `smtp_allow`: addresses or CIDR networks."""
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an address or network "
                             "(e.g. 127.0.0.0/8, ::1, 192.0.2.10)") from None
    return value
