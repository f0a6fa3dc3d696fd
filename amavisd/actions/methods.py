"""How a way of sending mail is written: `smtp:HOST:PORT` or `pipe:/path`.

`notify_method` and `release_method` are checked when the config is read,
yet the settings must not import what sends mail (smtplib, subprocess). So
the spelling is parsed here, beside the forwarders' registry in
`forward.py`, which turns a parsed method into a `Forwarder`. Standard
library only; nothing here sends anything.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from amavisd_client.wire.address import AddressError, parse_host_port


@dataclass(frozen=True)
class SMTPMethod:
    host: str
    port: int


@dataclass(frozen=True)
class PipeMethod:
    argv: tuple[str, ...]  # a sendmail-compatible program and its own arguments


Method = SMTPMethod | PipeMethod


def _smtp(rest: str) -> SMTPMethod:
    try:
        host, port = parse_host_port(rest)
    except AddressError:
        raise ValueError("smtp method must be smtp:HOST:PORT, e.g. smtp:[127.0.0.1]:10025"
                         ) from None
    return SMTPMethod(host, port)


def _pipe(rest: str) -> PipeMethod:
    argv = shlex.split(rest)
    if not argv or not argv[0].startswith("/"):
        raise ValueError("pipe method must be pipe:/absolute/path [args], "
                         "e.g. pipe:/usr/sbin/sendmail")
    return PipeMethod(tuple(argv))


PARSERS: dict[str, Callable[[str], Method]] = {"smtp": _smtp, "pipe": _pipe}


def parse_method(spec: str) -> Method:
    """A method spec parsed; ValueError (one line) if bad."""
    kind, _, rest = spec.partition(":")
    if kind not in PARSERS:
        raise ValueError(f"unknown method {spec!r}; use smtp:HOST:PORT or pipe:/path/to/sendmail")
    return PARSERS[kind](rest)


def method_spec(value: str) -> str:
    """Config validator for *_method settings."""
    parse_method(value)
    return value
