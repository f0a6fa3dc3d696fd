"""Settings: declared once, in one table.

Every setting is a `Setting` row (name, type, default, validator, help). The
same table yields the TOML schema, the command-line flags, `check-config`'s
output and the commented sample `etc/amavisd.toml`, so they cannot drift.

A bad key or value raises `ConfigError` with one line naming the key; the
CLI turns it into exit status 78 (EX_CONFIG). Nothing here touches sockets
or processes.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amavisd.policy.banned import DEFAULT_RULES as BANNED_DEFAULTS

DEFAULT_CONFIG_PATH = "/etc/amavisd/amavisd.toml"


class ConfigError(Exception):
    """A configuration problem, said in one line that names the key."""


# -- validators: each returns the normalised value or raises ValueError ---------


def positive(value: Any) -> Any:
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def non_negative(value: Any) -> Any:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def between(low: int, high: int) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return check


def one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        value = value.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return check


def absolute_path_or_empty(value: str) -> str:
    if value and not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    return value


def absolute_path(value: str) -> str:
    if not value:
        raise ValueError("must be an absolute path, not empty")
    return absolute_path_or_empty(value)


def file_mode(value: str) -> str:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError("must be an octal mode such as '0660'") from None
    if mode & 0o007:
        raise ValueError("must not give any access to others (the socket is the daemon's door)")
    return f"{mode:04o}"


def parse_address(value: str) -> tuple[str, str | tuple[str, int]]:
    """`unix:/path` -> ("unix", path); `tcp:host:port` -> ("tcp", (host, port))."""
    kind, _, rest = value.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix", rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", (host, int(port))
    raise ValueError("must be unix:/path or tcp:host:port")


def scanner_address(value: str) -> str:
    parse_address(value)
    return value


def loopback_listen(value: str) -> str:
    """Optional TCP listener: loopback only, since AM.PDP passes file paths."""
    if not value:
        return value
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("must be host:port, e.g. 127.0.0.1:9998")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError("must be a loopback address: AM.PDP hands over file paths")
    return value


DESTINIES = ("pass", "discard", "bounce", "reject", "tempfail")


def reason_destinies_validator(value: list[str]) -> list[str]:
    from amavisd.policy.destinies import reason_destinies

    return reason_destinies(value)


def scanner_names(value: list[str]) -> list[str]:
    bad = [v for v in value if not isinstance(v, str) or not v.replace("-", "").replace(
        "_", "").isalnum()]
    if bad:
        raise ValueError(f"bad scanner name {bad[0]!r}")
    return list(value)


def scanner_tables(tables: dict[str, Any]) -> dict[str, Any]:
    from amavisd.scan.scanners import check_definitions  # the scanners know their keys

    return check_definitions(tables)


def categories(*allowed: str) -> Callable[[list[str]], list[str]]:
    def check(value: list[str]) -> list[str]:
        value = [v.lower() for v in value]
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"unknown category {bad[0]!r}; use {', '.join(allowed)}")
        return value

    return check


def banned_rules(value: list[str]) -> list[str]:
    from amavisd.policy.banned import BannedRules  # the rules know their syntax

    BannedRules.parse(value)  # BannedRuleError is a ValueError naming the bad rule
    return list(value)


def method_spec(value: str) -> str:
    from amavisd.actions.forward import method_spec as check

    return check(value)


def method_spec_or_empty(value: str) -> str:
    return method_spec(value) if value else value


# Sections that hold named tables ([scanners.NAME]) rather than settings.
TABLE_SECTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "scanners": scanner_tables,
}


def log_targets(value: list[str]) -> list[str]:
    allowed = {"syslog", "stderr"}
    bad = [v for v in value if v not in allowed]
    if bad:
        raise ValueError(f"unknown target {bad[0]!r}; use syslog and/or stderr")
    return list(value)


# -- the table -------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    section: str
    type: type
    default: Any
    help: str
    validator: Callable[[Any], Any] | None = None
    flags: tuple[str, ...] = ()
    # For booleans: the flag that sets False (e.g. --foreground for daemon).
    negative_flag: str | None = None
    metavar: str | None = None


SETTINGS: tuple[Setting, ...] = (
    # [daemon] -- the process model
    Setting("workdir", "daemon", str, "/var/lib/amavis",
            "Home of the daemon: holds the socket (amavisd.sock) and the temp base (tmp/).",
            absolute_path_or_empty, ("--workdir",), metavar="DIR"),
    Setting("socket", "daemon", str, "",
            "AM.PDP Unix socket; empty means <workdir>/amavisd.sock.",
            absolute_path_or_empty, ("--socket",), metavar="PATH"),
    Setting("socket_mode", "daemon", str, "0660",
            "Permissions of the Unix socket (octal); never open to others.", file_mode),
    Setting("socket_owner", "daemon", str, "",
            "Owner of the socket; empty means the daemon's user."),
    Setting("socket_group", "daemon", str, "",
            "Group of the socket (the MTA's or milter's group); empty means the daemon's group."),
    Setting("tcp_listen", "daemon", str, "",
            "Also serve AM.PDP on this loopback host:port (e.g. 127.0.0.1:9998); empty is off.",
            loopback_listen, ("--tcp-listen",), metavar="HOST:PORT"),
    Setting("tempbase", "daemon", str, "",
            "Where clients spool messages and workers keep per-message dirs; "
            "empty means <workdir>/tmp. mail_file/tempdir outside it are refused.",
            absolute_path_or_empty, ("--tempbase",), metavar="DIR"),
    Setting("workers", "daemon", int, 2,
            "Pre-forked worker processes (messages scanned at once).",
            between(1, 512), ("--workers",), metavar="N"),
    Setting("max_requests", "daemon", int, 500,
            "A worker retires after this many messages (plus jitter); 0 = never.", non_negative),
    Setting("max_requests_jitter", "daemon", int, 50,
            "Random extra requests per worker, so workers do not all retire at once.",
            non_negative),
    Setting("child_timeout", "daemon", float, 300.0,
            "Seconds one request may take; a worker stuck longer is killed (ABRT, then KILL) "
            "and its client gets a tempfail.", positive),
    Setting("graceful_timeout", "daemon", float, 30.0,
            "Seconds in-flight messages get to finish on TERM or reload.", positive),
    Setting("client_timeout", "daemon", float, 60.0,
            "Deprecated, ignored: see client_idle_timeout and request_timeout.", positive),
    Setting("client_idle_timeout", "daemon", float, 10.0,
            "Seconds a connection may sit idle (after connecting, or after a reply) before "
            "its next request starts; then the worker hangs up.", positive),
    Setting("request_timeout", "daemon", float, 30.0,
            "Seconds a client has to send one whole request, from its first byte.", positive),
    Setting("max_connection_requests", "daemon", int, 100,
            "Requests served on one connection before the worker closes it.", positive),
    Setting("max_message_size", "daemon", int, 100 * 1024 * 1024,
            "Largest message (bytes) a request may hand over; a larger one is UNCHECKED "
            "(kind limit) without being read.", positive),
    Setting("work_base", "daemon", str, "",
            "The workers' own per-message dirs (0700, closed to clients); empty means "
            "<workdir>/work. Never inside the temp base.",
            absolute_path_or_empty, ("--work-base",), metavar="DIR"),
    Setting("user", "daemon", str, "",
            "Drop root to this user after binding; empty keeps the invoking user."),
    Setting("group", "daemon", str, "",
            "Drop root to this group; empty means the user's primary group."),
    Setting("pidfile", "daemon", str, "",
            "Write the master's pid here; empty writes none.",
            absolute_path_or_empty, ("--pidfile",), metavar="PATH"),
    Setting("daemon", "daemon", bool, False,
            "Detach into the background (SysV); the default stays in the foreground (systemd).",
            None, ("--daemon",), negative_flag="--foreground"),
    # [log]
    Setting("log_to", "log", list, ["stderr", "syslog"],
            "Where logs go: syslog (facility below) and/or stderr.", log_targets),
    Setting("log_file", "log", str, "",
            "Also append logs to this file (reopened on SIGUSR1, for logrotate).",
            absolute_path_or_empty, ("--log-file",), metavar="PATH"),
    Setting("log_level", "log", str, "info", "Least severe level logged.",
            one_of("debug", "info", "warning", "error")),
    Setting("syslog_facility", "log", str, "mail", "Syslog facility.",
            one_of("mail", "daemon", "user", "local0", "local1", "local2", "local3",
                   "local4", "local5", "local6", "local7")),
    Setting("syslog_ident", "log", str, "amavisd", "Syslog ident."),
    Setting("syslog_socket", "log", str, "/dev/log",
            "The local syslog daemon's socket (a chroot or container may put it elsewhere).",
            absolute_path),
    # [scan]
    Setting("clamd", "scan", str, "unix:/var/run/clamav/clamd.ctl",
            "clamd to ask: unix:/path or tcp:host:port.", scanner_address, ("--clamd",),
            metavar="ADDR"),
    Setting("clamd_timeout", "scan", float, 120.0,
            "Seconds to wait for clamd on one message before giving up (tempfail).", positive),
    Setting("clamd_max_stream", "scan", int, 25 * 1024 * 1024,
            "clamd's StreamMaxLength: larger parts go to a backup scanner, or the message is "
            "UNCHECKED; they are never called clean.", positive),
    Setting("primary_scanners", "scan", list, ["clamd"],
            "Scanners asked first (names of built-in scanners clamd and clamscan, or of "
            "[scanners.NAME] tables).", scanner_names, ("--scanners",), metavar="NAMES"),
    Setting("primary_mode", "scan", str, "all",
            "all: every primary scanner is asked; first: the first that answers is enough.",
            one_of("all", "first")),
    Setting("backup_scanners", "scan", list, ["clamscan"],
            "Asked only when every primary scanner failed, and for parts the primaries "
            "could not take.", scanner_names),
    Setting("scanner_retry_after", "scan", float, 10.0,
            "Seconds a failed scanner rests before it is tried again.", non_negative),
    Setting("when_scanners_fail", "scan", str, "tempfail",
            "No scanner answered: tempfail (the MTA keeps the mail and retries) or pass "
            "(delivered with an X-Amavis-Alert header; not recommended).",
            one_of("tempfail", "pass")),
    # [decode]
    Setting("max_depth", "decode", int, 20,
            "Deepest nesting decoded (the message is level 0, each decoded layer adds one); "
            "deeper content makes the message UNCHECKED.", between(1, 100)),
    Setting("max_parts", "decode", int, 3000,
            "Most parts one message may decode into.", positive),
    Setting("min_expansion_quota", "decode", int, 100 * 1024 * 1024,
            "Bytes a message may always expand to (the quota is the larger of this and "
            "expansion_quota_factor times the message size).", positive),
    Setting("expansion_quota_factor", "decode", int, 50,
            "Expansion allowed per byte of message.", positive),
    Setting("max_part_size", "decode", int, 256 * 1024 * 1024,
            "Largest single decoded part.", positive),
    Setting("max_decode_time", "decode", float, 60.0,
            "Seconds of decoding per message before it is UNCHECKED.", positive),
    Setting("max_memory", "decode", int, 32 * 1024 * 1024,
            "Bytes of decoded parts one message keeps in memory; parts past this (and any "
            "part over 8 MiB) are spilled to its private work dir.", positive),
    Setting("tool_timeout", "decode", float, 30.0,
            "Seconds one external unpacker (unar, 7zz, arj, ...) may run on one archive; "
            "never more than what is left of max_decode_time.", positive),
    Setting("tool_memory", "decode", int, 1024 * 1024 * 1024,
            "Address-space limit (bytes) of one external unpacker.", positive),
    # [policy]
    Setting("virus_destiny", "policy", str, "discard",
            "What happens to INFECTED mail: pass, discard, bounce, reject or tempfail. "
            "discard (after quarantine) sends nothing back to a sender viruses forge.",
            one_of(*DESTINIES)),
    Setting("banned_destiny", "policy", str, "discard",
            "What happens to mail with a BANNED part (see banned_rules).",
            one_of(*DESTINIES)),
    Setting("unchecked_destiny", "policy", str, "reject",
            "What happens to mail we could not fully check (limits, encrypted, "
            "message/partial, parts no scanner could take): never passed as clean "
            "unless set to pass.", one_of(*DESTINIES)),
    Setting("unchecked_destinies", "policy", list, [],
            "Destinies for kinds of UNCHECKED, overriding unchecked_destiny: "
            "kind=destiny entries, kind one of encrypted, partial, unscanned, limit, "
            "undecipherable (an archive whose content could not all be read), internal "
            "(a decoder failed) "
            '(e.g. ["encrypted=pass"]).', reason_destinies_validator),
    Setting("quarantine_dir", "policy", str, "/var/virusmails",
            "Quarantine of infected and banned mail (directory 0700).",
            absolute_path_or_empty, ("--quarantine-dir",), metavar="DIR"),
    Setting("quarantine_store", "policy", str, "",
            "Where quarantined mail is kept, as a URL: file:/var/virusmails (one file per "
            "message plus a JSON sidecar); empty means file:<quarantine_dir>."),
    Setting("quarantine", "policy", list, ["infected", "banned"],
            "Categories whose mail is kept in the quarantine (infected, banned, unchecked, "
            "clean); empty keeps none.", categories("infected", "banned", "unchecked", "clean")),
    Setting("quarantine_gzip", "policy", bool, False,
            "Gzip quarantined messages (virus-ID.gz); releases are byte-identical either way."),
    Setting("banned_rules", "policy", list, list(BANNED_DEFAULTS),
            "Ordered allow/deny rules checked on every part, archive members too; the first "
            "that matches a part decides. 'deny|allow FIELD OP VALUE [and ...]', FIELD: name, flag, "
            "mime, type (detected: exe, elf, zip...), magic (libmagic); OP: ~ regex, = equal, "
            "!~ !=; case-insensitive. Write them as TOML literal strings ('...').",
            banned_rules),
    # [notify] -- notifications, and where released mail goes
    Setting("notify_method", "notify", str, "smtp:[127.0.0.1]:10025",
            "How notifications are sent: smtp:HOST:PORT (the MTA's re-injection port) or "
            "pipe:/usr/sbin/sendmail (run as PATH -i -f SENDER -- RCPT..., no shell).",
            method_spec),
    Setting("auth_required_release", "notify", bool, True,
            "AM.PDP release/requeue must carry the entry's secret_id (amavisd-release "
            "mail_file secret_id), checked in constant time; the local `amavisd quarantine "
            "release` run by root or the daemon's user needs none."),
    Setting("release_to_others", "notify", bool, False,
            "Allow an AM.PDP release to recipients other than the original ones."),
    Setting("release_method", "notify", str, "",
            "How released quarantined mail is re-sent; empty means notify_method.",
            method_spec_or_empty),
    Setting("smtp_timeout", "notify", float, 30.0,
            "Seconds one notification or release may take over SMTP or the pipe.", positive),
    Setting("local_domains", "notify", list, [],
            "Our mail domains: example.com matches that domain, .example.com it and its "
            "subdomains. Only their senders get DSNs, only their recipients notices."),
    Setting("admin", "notify", str, "",
            "Who gets admin alerts; empty means virusalert@<first local domain, else "
            "myhostname>."),
    Setting("admin_notify", "notify", list, ["infected", "banned"],
            "Categories the admin is alerted about (infected, banned, unchecked).",
            categories("infected", "banned", "unchecked")),
    Setting("sender_notify", "notify", list, ["banned"],
            "Categories for which a sender gets a DSN when the destiny is bounce; never "
            "infected by default (virus senders are forged: backscatter).",
            categories("infected", "banned", "unchecked")),
    Setting("sender_notify_remote", "notify", bool, False,
            "Also send DSNs to senders outside local_domains (backscatter risk)."),
    Setting("recipient_notify", "notify", list, [],
            "Categories for which each local recipient of undelivered mail is told.",
            categories("infected", "banned", "unchecked")),
    Setting("notify_from", "notify", str, "",
            "From: of notifications; empty means \"Content-filter at HOST\" "
            "<postmaster@HOST>."),
    Setting("template_dir", "notify", str, "",
            "Directory of site templates (virus-admin.txt, banned-sender.txt, dsn.txt, ...); "
            "a file missing there comes from the shipped set.", absolute_path_or_empty),
    # [headers]
    Setting("myhostname", "headers", str, "",
            "This host's name in headers and replies; empty asks the system."),
    Setting("x_header_tag", "headers", str, "X-Virus-Scanned",
            "Header field added to mail that was scanned and passed."),
    Setting("x_header_line", "headers", str, "by amavisd {version} at {myhostname}",
            "Its text; {version} and {myhostname} are filled in."),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


class Config(Mapping[str, Any]):
    """The effective settings: defaults, then the TOML file, then the command line."""

    def __init__(self, values: dict[str, Any], source: str | None = None):
        self._values = values
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> Config:
        values = dict(self._values)
        for key, value in changes.items():
            values[key] = coerce(BY_NAME[key], value, f"{key}")
        return Config(values, self.source)

    # Derived paths: the Debian layout, <workdir>/amavisd.sock and <workdir>/tmp.
    @property
    def socket_path(self) -> str:
        return self.socket or os.path.join(self.workdir, "amavisd.sock")

    @property
    def tempbase_path(self) -> str:
        return self.tempbase or os.path.join(self.workdir, "tmp")

    @property
    def work_base_path(self) -> str:
        return self.work_base or os.path.join(self.workdir, "work")

    @property
    def hostname(self) -> str:
        return self.myhostname or socket.getfqdn()


def coerce(setting: Setting, value: Any, where: str) -> Any:
    """Check a value's type (TOML gives real types) and run the validator."""
    expected = setting.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is list and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {value!r}")
    if setting.validator is not None:
        try:
            value = setting.validator(value)
        except ValueError as err:
            raise ConfigError(f"{where}: {err} (got {value!r})") from None
    return value


def defaults() -> dict[str, Any]:
    values = {s.name: (list(s.default) if isinstance(s.default, list) else s.default)
              for s in SETTINGS}
    values["scanners"] = {}
    return values


def read_toml(path: str) -> dict[str, Any]:
    """Flatten `[section] key = value` into {key: value}, refusing unknown keys."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    flat: dict[str, Any] = {}
    for section, table in doc.items():
        if section in TABLE_SECTIONS and isinstance(table, dict):
            try:
                flat[section] = TABLE_SECTIONS[section](table)
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from None
            continue
        if section not in SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            setting = BY_NAME.get(key)
            if setting is None or setting.section != section:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            flat[key] = coerce(setting, value, f"{path}: {section}.{key}")
    return flat


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the effective config. A missing *default* file means all defaults."""
    values = defaults()
    source = None
    if path is None:
        path = os.environ.get("AMAVISD_CONFIG") or None
    if path is not None:
        values.update(read_toml(path))
        source = path
    elif os.path.exists(DEFAULT_CONFIG_PATH):
        values.update(read_toml(DEFAULT_CONFIG_PATH))
        source = DEFAULT_CONFIG_PATH
    for key, value in (overrides or {}).items():
        if key in TABLE_SECTIONS:
            try:
                values[key] = TABLE_SECTIONS[key](value)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            continue
        setting = BY_NAME[key]
        flag = setting.flags[0] if setting.flags else key
        values[key] = coerce(setting, value, flag)
    check_scanner_names(values, source)
    config = Config(values, source)
    check_work_base(config)
    return config


def check_work_base(config: Config) -> None:
    """The workers' own dirs must be out of the clients' reach."""
    work = os.path.normpath(config.work_base_path)
    temp = os.path.normpath(config.tempbase_path)
    if os.path.commonpath([work, temp]) in (work, temp):
        where = f"{config.source}: " if getattr(config, "source", None) else ""
        raise ConfigError(f"{where}daemon.work_base {work} must be neither inside nor above "
                          f"the temp base {temp}, which clients may write")


def check_scanner_names(values: dict[str, Any], source: str | None) -> None:
    from amavisd.scan.scanners import BUILTIN

    known = set(BUILTIN) | set(values.get("scanners", {}))
    for key in ("primary_scanners", "backup_scanners"):
        for name in values[key]:
            if name not in known:
                where = f"{source}: scan.{key}" if source else key
                raise ConfigError(f"{where}: no scanner named {name!r} "
                                  f"(define it in a [scanners.{name}] table)")
    if not values["primary_scanners"]:
        raise ConfigError(f"{source + ': ' if source else ''}scan.primary_scanners is empty")


# -- command line -------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """Add each setting's flags; values not given stay absent (argparse.SUPPRESS)."""
    wanted = set(only) if only is not None else None
    for s in SETTINGS:
        if not s.flags or (wanted is not None and s.name not in wanted):
            continue
        if s.type is bool:
            parser.add_argument(*s.flags, dest=s.name, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=s.help)
            if s.negative_flag:
                parser.add_argument(s.negative_flag, dest=s.name, action="store_const",
                                    const=False, default=argparse.SUPPRESS,
                                    help=f"the opposite of {s.flags[0]}")
        else:
            # lists are given comma-separated; coerce() splits them
            parser.add_argument(*s.flags, dest=s.name, type=str if s.type is list else s.type,
                                metavar=s.metavar,
                                default=argparse.SUPPRESS, help=s.help)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {name: value for name, value in vars(args).items() if name in BY_NAME}


# -- rendering ------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        items = [toml_value(v) for v in value]
        if sum(len(i) + 2 for i in items) <= 80:
            return "[" + ", ".join(items) + "]"
        return "[\n" + "".join(f"    {i},\n" for i in items) + "]"
    text = str(value)
    if "\\" in text and "'" not in text and "\n" not in text:
        return f"'{text}'"  # a literal string keeps regex backslashes as written
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render(config: Mapping[str, Any] | None = None, commented: bool = True) -> str:
    """TOML text: the sample config (defaults, with help) or the effective one."""
    values = config if config is not None else defaults()
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for s in SETTINGS:
            if s.section != section:
                continue
            if commented:
                lines.append(f"# {s.help}")
            lines.append(f"{s.name} = {toml_value(values[s.name])}")
        lines.append("")
    if commented:
        lines += SCANNERS_HELP
    for name, spec in values.get("scanners", {}).items():
        lines.append(f'[scanners."{name}"]' if not name.isidentifier() else f"[scanners.{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in spec.items()]
        lines.append("")
    return "\n".join(lines)


SCANNERS_HELP = [
    "# Scanners named in primary_scanners/backup_scanners: clamd and clamscan are",
    "# built in; a [scanners.NAME] table defines another or replaces one, e.g.",
    "# [scanners.clamd-remote]",
    '# type = "clamd"',
    '# address = "tcp:10.0.0.5:3310"',
    "# timeout = 60",
    "# Command-line products (type = \"command\"): see scanners-examples.toml",
    "# shipped next to this file.",
    "",
]


# The sample runs as the `amavis` user, as Debian's amavisd-new does.
SAMPLE_VALUES = {"user": "amavis", "group": "amavis"}


def sample() -> str:
    values = defaults() | SAMPLE_VALUES
    head = (
        "# amavisd configuration (TOML). Every key is shown with its default,\n"
        "# except user/group, which the built-in defaults leave empty.\n"
        "# Generated from the settings table: `amavisd check-config --sample`.\n"
        "# Command-line flags override this file; `amavisd check-config` prints the result.\n\n"
    )
    return head + render(values, commented=True)
