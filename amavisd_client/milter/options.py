"""The milter's settings: defaults, the daemon's TOML file, then the command line.

The milter reads the `[milter]` section of the daemon's own amavisd.toml
(`-c`, else $AMAVISD_CONFIG, else /etc/amavisd/amavisd.toml if it exists),
with the same keys the daemon's settings table declares there (so
`amavisd check-config` accepts and documents them), plus what it shares
with the daemon from `[daemon]`: the socket, the temp base, and the user
and group to run as (the daemon only takes spool files that belong to the
peer, and reads them as its own user). Flags override the file.

Stdlib only (tomllib): the daemon's config package is not imported. A bad
value is one line naming the key, and exit status 78 (main.py).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from amavisd_client.milter.verdicts import ON_ERROR_CHOICES, QUARANTINE_CHOICES
from amavisd_client.wire.address import Address, AddressError, parse, parse_or_path

DEFAULT_CONFIG = "/etc/amavisd/amavisd.toml"
DEFAULT_WORKDIR = "/var/lib/amavis"

# The [milter] keys, as amavisd/config/table.py declares them (a unit test
# keeps the two equal).
DEFAULTS: dict[str, Any] = {
    "milter_listen": "unix:/var/lib/amavis/amavisd-milter.sock",
    "milter_socket_mode": "0660",
    "milter_socket_group": "",
    "milter_daemon_timeout": 600.0,
    "milter_progress_interval": 10.0,
    "milter_on_error": "tempfail",
    "milter_policy_bank": "",
    "milter_quarantine": [],
}
DAEMON_KEYS = ("workdir", "socket", "tempbase", "user", "group")


class OptionError(Exception):
    """A bad setting, said in one line that names it."""


def listen_address(text: str) -> Address:
    """unix:/path (also local:, or a bare absolute path), inet:host:port
    (Postfix), inet:port@host and inet6:port@host (Sendmail), tcp:host:port."""
    scheme, _, rest = text.partition(":")
    if text.startswith("/"):
        return Address("unix", path=text)
    if scheme in ("inet", "inet6") and "@" not in rest:
        text = "tcp:" + rest
    try:
        return parse(text, accept=("unix", "local", "inet", "inet6", "tcp"))
    except AddressError:
        raise OptionError(f"{text!r}: expected unix:/path, inet:host:port or "
                          "inet:port@host") from None


def socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise OptionError(f"socket mode {text!r}: expected octal, such as 0660") from None
    if mode & 0o007 or mode > 0o777:
        raise OptionError(f"socket mode {text!r}: no access for others (0660 and a group)")
    return mode


def positive(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name}: expected a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not number > 0 or number == float("inf"):
        raise OptionError(f"{name}: must be > 0 (got {value!r})")
    return number


def choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise OptionError(f"{name}: must be one of {', '.join(choices)} (got {value!r})")
    return value.lower()


def quarantine_list(value: Any, name: str) -> frozenset[str]:
    if isinstance(value, str):
        value = [] if value.lower() in ("", "off", "none") else value.split(",")
    if not isinstance(value, list):
        raise OptionError(f"{name}: expected a list such as [\"discard\"], got {value!r}")
    return frozenset(choice(v.strip() if isinstance(v, str) else v, name, QUARANTINE_CHOICES)
                     for v in value)


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise OptionError(f"{name}: expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    listen: Address
    socket_mode: int
    socket_group: str
    daemon_socket: Address
    tempbase: str
    daemon_timeout: float
    progress_interval: float
    on_error: str
    policy_bank: str
    quarantine: frozenset[str]
    user: str = ""
    group: str = ""
    log: str = "syslog"
    pidfile: str = ""
    foreground: bool = False


def read_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """([milter] values, the [daemon] values we share) from a TOML file."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as err:
        raise OptionError(f"{path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise OptionError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise OptionError(f"{path}: not UTF-8 (byte {err.start})") from None
    milter = doc.get("milter", {})
    daemon = doc.get("daemon", {})
    if not isinstance(milter, dict) or not isinstance(daemon, dict):
        raise OptionError(f"{path}: [milter] and [daemon] must be tables")
    unknown = sorted(set(milter) - set(DEFAULTS))
    if unknown:
        raise OptionError(f"{path}: unknown key milter.{unknown[0]}")
    return milter, {k: daemon[k] for k in DAEMON_KEYS if k in daemon}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amavisd-milter",
        description="A milter for Postfix and Sendmail that has amavisd check each message.")
    add = p.add_argument
    add("-c", "--config", metavar="FILE",
        help=f"the daemon's TOML file ([milter] and [daemon]); default $AMAVISD_CONFIG, "
             f"else {DEFAULT_CONFIG} if it exists")
    add("--listen", metavar="ADDR", help="where the MTA connects: unix:/path, "
        "inet:host:port or inet:port@host (default: milter_listen, "
        f"{DEFAULTS['milter_listen']})")
    add("--daemon-socket", metavar="ADDR",
        help="the daemon's AM.PDP socket (default: [daemon] socket, <workdir>/amavisd.sock)")
    add("--tempbase", metavar="DIR",
        help="the daemon's temp base, where messages are spooled (default: [daemon] "
             "tempbase, <workdir>/tmp)")
    add("--socket-mode", metavar="MODE", help="mode of the Unix socket (default 0660)")
    add("--socket-group", metavar="GROUP",
        help="group of the Unix socket: the MTA's (postfix); default the milter's")
    add("--daemon-timeout", metavar="SEC",
        help="seconds to wait for the daemon's verdict (default 600)")
    add("--progress-interval", metavar="SEC",
        help="seconds between keep-alives to the MTA while the daemon works (default 10)")
    add("--on-error", metavar="ACTION",
        help="when there is no verdict: tempfail (default), reject or accept")
    add("--policy-bank", metavar="NAMES", help="AM.PDP policy_bank: comma-separated names; "
        "{daemon_name} stands for that macro's value")
    add("--quarantine", metavar="LIST", help="return values held in the MTA's quarantine "
        "instead: discard, reject, comma-separated; off (default) for none")
    add("--user", metavar="USER", help="drop root to this user (default: [daemon] user)")
    add("--group", metavar="GROUP", help="and this group (default: [daemon] group)")
    add("--log", choices=("syslog", "stderr"), default=None,
        help="where log lines go (default syslog; stderr with --foreground)")
    add("--pidfile", metavar="PATH", help="write the pid here")
    add("--foreground", action="store_true", help="do not detach (systemd, tests)")
    return p


_FLAGS = {"listen": "milter_listen", "socket_mode": "milter_socket_mode",
          "socket_group": "milter_socket_group", "daemon_timeout": "milter_daemon_timeout",
          "progress_interval": "milter_progress_interval", "on_error": "milter_on_error",
          "policy_bank": "milter_policy_bank", "quarantine": "milter_quarantine"}


def resolve(argv: list[str]) -> Settings:
    """Settings from defaults, the file and `argv`; OptionError on a bad one."""
    args = parser().parse_args(argv)
    values = dict(DEFAULTS)
    daemon: dict[str, Any] = {}
    path = args.config or os.environ.get("AMAVISD_CONFIG") or None
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    if path is not None:
        milter, daemon = read_file(path)
        values.update(milter)
    for flag, key in _FLAGS.items():
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    for key in DAEMON_KEYS:
        if key in daemon:
            daemon[key] = text(daemon[key], f"daemon.{key}")
    workdir = daemon.get("workdir") or DEFAULT_WORKDIR
    daemon_socket = args.daemon_socket or daemon.get("socket") or \
        os.path.join(workdir, "amavisd.sock")
    try:
        daemon_address = parse_or_path(daemon_socket)
    except AddressError as err:
        raise OptionError(f"daemon socket: {err}") from None
    if not daemon_address.is_tcp:
        daemon_address = Address("unix", path=os.path.abspath(daemon_address.path))
    tempbase = args.tempbase or daemon.get("tempbase") or os.path.join(workdir, "tmp")
    return Settings(
        listen=listen_address(text(values["milter_listen"], "milter_listen")),
        socket_mode=socket_mode(text(values["milter_socket_mode"], "milter_socket_mode")),
        socket_group=text(values["milter_socket_group"], "milter_socket_group"),
        daemon_socket=daemon_address,
        tempbase=os.path.abspath(tempbase),
        daemon_timeout=positive(values["milter_daemon_timeout"], "milter_daemon_timeout"),
        progress_interval=positive(values["milter_progress_interval"],
                                   "milter_progress_interval"),
        on_error=choice(values["milter_on_error"], "milter_on_error", ON_ERROR_CHOICES),
        policy_bank=text(values["milter_policy_bank"], "milter_policy_bank"),
        quarantine=quarantine_list(values["milter_quarantine"], "milter_quarantine"),
        user=args.user if args.user is not None else daemon.get("user", ""),
        group=args.group if args.group is not None else daemon.get("group", ""),
        log=args.log or ("stderr" if args.foreground else "syslog"),
        pidfile=args.pidfile or "",
        foreground=args.foreground,
    )
