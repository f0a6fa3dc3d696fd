"""The settings table: every key amavisd reads, declared once.

One `Setting` row a key, in the order of the sample file; `BY_NAME` and
`SECTIONS` are derived from it. The TOML schema (`loading.py`), the command-line
flags (`flags.py`), `check-config` and the sample (`rendering.py`) all read
this table, so they cannot drift. A new setting is one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from amavisd.actions.methods import client_networks, listen_specs
from amavisd.config.setting import Setting
from amavisd.config.validators import (
    absolute_path,
    absolute_path_or_empty,
    banned_rules,
    between,
    categories,
    file_mode,
    log_targets,
    loopback_listen,
    method_spec,
    method_spec_or_empty,
    non_negative,
    one_of,
    positive,
    reason_destinies_validator,
    scanner_address,
    scanner_names,
    scanner_tables,
)
from amavisd.config.validators import address_specs as bank_address_specs
from amavisd.config.validators import interface_policy as bank_interface_policy
from amavisd.config.validators import networks as bank_networks
from amavisd.config.validators import policy_bank_tables as bank_tables_check
from amavisd.config.validators import recipient_policy as bank_recipient_policy
from amavisd.policy.banned import DEFAULT_RULES as BANNED_DEFAULTS

DESTINIES = ("pass", "discard", "bounce", "reject", "tempfail")

# Sections that hold named tables ([scanners.NAME]) rather than settings.
TABLE_SECTIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "scanners": scanner_tables,
}

def metrics_listen(value: str) -> str:
    """[metrics] metrics_listen: host:port, or empty for off."""
    from amavisd_client.wire.address import AddressError, parse_host_port

    if value:
        try:
            parse_host_port(value)
        except AddressError:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9825, or empty") from None
    return value


def milter_listen(value: str) -> str:
    """[milter] milter_listen: the spellings amavisd-milter takes (its options.py):
    unix:/path, inet:host:port (Postfix), inet:port@host (Sendmail)."""
    from amavisd_client.wire.address import AddressError, parse

    scheme, _, rest = value.partition(":")
    spelled = "tcp:" + rest if scheme in ("inet", "inet6") and "@" not in rest else value
    try:
        parse(spelled, accept=("unix", "local", "inet", "inet6", "tcp"))
    except AddressError:
        raise ValueError("must be unix:/path, inet:host:port or inet:port@host") from None
    return value


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
    Setting("interface_policy", "daemon", list, [],
            "Policy banks by the listener a message came in on, KEY=BANK: SOCK (every Unix "
            "socket), a socket path, a port or host:port, e.g. [\"SOCK=AM.PDP-SOCK\", "
            "\"10026=ORIGINATING\"] (amavisd-new's %interface_policy).",
            bank_interface_policy),
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
    Setting("max_pending_connections", "daemon", int, 256,
            "AM.PDP connections the master holds whose first request is not whole yet "
            "(no worker is given one before); past it the oldest is closed, silent ones "
            "first.",
            between(1, 65536)),
    Setting("max_connection_requests", "daemon", int, 100,
            "Requests served on one connection before the worker closes it.", positive),
    Setting("max_connection_time", "daemon", float, 600.0,
            "Seconds one connection may last, all its requests together (processing aside); "
            "then the worker hangs up before reading another.", positive),
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
            "Where logs go: syslog (facility below) and/or stderr. With both, a stderr that "
            "is systemd's journal is left out (syslog reaches the journal too: each line once).",
            log_targets),
    Setting("log_file", "log", str, "",
            "Also append logs to this file (reopened on SIGUSR1, for logrotate).",
            absolute_path_or_empty, ("--log-file",), metavar="PATH"),
    Setting("log_level", "log", str, "info", "Least severe level logged.",
            one_of("debug", "info", "warning", "error")),
    Setting("log_format", "log", str, "text",
            "text: amavisd-new's line per message; json: one JSON object per record (the "
            "message's with the line's fields), for log shippers.", one_of("text", "json")),
    Setting("syslog_facility", "log", str, "mail", "Syslog facility.",
            one_of("mail", "daemon", "user", "local0", "local1", "local2", "local3",
                   "local4", "local5", "local6", "local7")),
    Setting("syslog_ident", "log", str, "amavisd", "Syslog ident."),
    Setting("syslog_socket", "log", str, "/dev/log",
            "The local syslog daemon's socket (a chroot or container may put it elsewhere).",
            absolute_path),
    # [metrics] -- Prometheus /metrics, /healthz and /status (amavisd status): observe/
    Setting("metrics_listen", "metrics", str, "127.0.0.1:9825",
            "Where the master serves /metrics, /healthz and /status (host:port); empty turns "
            "metrics and `amavisd status` off. Keep it off the Internet.",
            metrics_listen, ("--metrics-listen",), metavar="HOST:PORT"),
    Setting("metrics_dir", "metrics", str, "",
            "The workers' metric files (0700, emptied at start); empty means "
            "<workdir>/metrics.", absolute_path_or_empty),
    # [scan]
    Setting("clamd", "scan", str, "unix:/var/run/clamav/clamd.ctl",
            "clamd to ask: unix:/path or tcp:host:port.", scanner_address, ("--clamd",),
            metavar="ADDR"),
    Setting("clamd_timeout", "scan", float, 100.0,
            "Seconds to wait for clamd on one message before giving up (tempfail). Below "
            "clamd's MaxScanTime (120 s by default): clamd cutting a scan short first would "
            "answer OK for that part unless AlertExceedsMax is set.", positive),
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
    Setting("tool_network", "decode", str, "isolated",
            "isolated: each external unpacker runs in its own network namespace (no "
            "network at all; best effort: where the kernel refuses, one warning at start and "
            "tools keep the host's network); inherit: the host's network.",
            one_of("isolated", "inherit")),
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
    # policy banks ([policy_banks.NAME] tables) and per-recipient settings
    Setting("mynetworks", "policy", list,
            ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "10.0.0.0/8",
             "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
            "Our networks: a client address in them loads the built-in policy bank MYNETS "
            "(originating mail). CIDRs, first match wins, !CIDR excludes.", bank_networks),
    Setting("originating", "policy", bool, False,
            "Mail from our own users (set by the MYNETS and ORIGINATING banks): a local "
            "sender is told when such mail is discarded, strangers never."),
    Setting("bypass_virus_checks", "policy", list, [],
            "Recipients whose mail is not virus-checked: user@domain, domain, .domain "
            "(it and its subdomains), !... excludes; the most specific match wins. If every "
            "recipient is listed the message is not scanned.", bank_address_specs),
    Setting("bypass_banned_checks", "policy", list, [],
            "Recipients for whom banned_rules are not applied (same syntax).",
            bank_address_specs),
    Setting("recipient_policy", "policy", list, [],
            "Policy banks per recipient, ADDRESS=BANK (user@domain, domain or .domain), e.g. "
            "[\"example.org=STRICT\"]: each recipient's destiny comes from its bank; over "
            "AM.PDP the strictest recipient's destiny answers for the message.",
            bank_recipient_policy),
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
    # [smtp] -- the SMTP/LMTP content filter: Postfix in on smtp_listen, out to forward_method
    Setting("smtp_listen", "smtp", list, [],
            "SMTP/LMTP listeners of the workers (the after-queue content filter): HOST:PORT, "
            "lmtp:HOST:PORT, unix:/path or lmtp:unix:/path, e.g. [\"127.0.0.1:10024\"]; "
            "empty is off. Loopback only unless smtp_listen_remote.",
            listen_specs, ("--smtp-listen",), metavar="ADDR[,ADDR...]"),
    Setting("smtp_listen_remote", "smtp", bool, False,
            "Allow smtp_listen addresses that are not loopback (smtp_allow then says who "
            "may connect)."),
    Setting("smtp_allow", "smtp", list, ["127.0.0.0/8", "::1"],
            "Client addresses or networks allowed to talk SMTP/LMTP to us; others get 554.",
            client_networks),
    Setting("forward_method", "smtp", str, "smtp:[127.0.0.1]:10025",
            "Where checked mail goes next: smtp:HOST:PORT (the MTA's re-injection port), "
            "lmtp:HOST:PORT, smtp:unix:/path, lmtp:unix:/path or pipe:/usr/sbin/sendmail. "
            "Our 250 waits for its answer.", method_spec, ("--forward",), metavar="METHOD"),
    Setting("forward_timeout", "smtp", float, 120.0,
            "Seconds each step of forwarding may take (connect, a command, a block of the "
            "message, the final reply); past it our client hears 451.", positive),
    Setting("forward_keep_idle", "smtp", float, 10.0,
            "Seconds a session to the next hop stays open after a message for the worker's "
            "next one (saves connect, greeting and EHLO; checked by RSET before reuse); "
            "0 closes it after each message.", non_negative),
    Setting("smtp_max_recipients", "smtp", int, 1000,
            "Recipients one SMTP/LMTP transaction may have; more are answered 452 "
            "(the client sends them again in another transaction).", positive),
    Setting("smtp_idle_timeout", "smtp", float, 300.0,
            "Seconds an SMTP/LMTP client may be silent before its next command, and "
            "have to send a whole command line; then the worker hangs up (RFC 5321's "
            "5 minutes; amavisd-new's $smtpd_timeout is 480). AM.PDP keeps "
            "client_idle_timeout and request_timeout.", positive),
    Setting("smtp_data_timeout", "smtp", float, 600.0,
            "Seconds an SMTP/LMTP client has for a whole DATA, from the 354 to the final "
            "\".\", or for all the BDAT chunks of a message, from the first to the LAST, "
            "however slowly it trickles (max_connection_time still bounds the "
            "connection).", positive),
    # [headers]
    Setting("myhostname", "headers", str, "",
            "This host's name in headers and replies; empty asks the system."),
    Setting("x_header_tag", "headers", str, "X-Virus-Scanned",
            "Header field added to mail that was scanned and passed."),
    Setting("x_header_line", "headers", str, "by amavisd {version} at {myhostname}",
            "Its text; {version} and {myhostname} are filled in."),
    # [milter] -- read by amavisd-milter (amavisd_client/milter/options.py), not the daemon
    Setting("milter_listen", "milter", str, "unix:/var/lib/amavis/amavisd-milter.sock",
            "Where amavisd-milter listens for the MTA: unix:/path, inet:host:port (Postfix "
            "spelling) or inet:port@host (Sendmail's).", milter_listen),
    Setting("milter_socket_mode", "milter", str, "0660",
            "Permissions of the milter's Unix socket (octal); the MTA reaches it through "
            "milter_socket_group.", file_mode),
    Setting("milter_socket_group", "milter", str, "",
            "Group of the milter's Unix socket: the MTA's (postfix; Sendmail connects as "
            "root); empty means the milter's group."),
    Setting("milter_daemon_timeout", "milter", float, 600.0,
            "Seconds the milter waits for the daemon's verdict on one message before "
            "milter_on_error applies.", positive),
    Setting("milter_progress_interval", "milter", float, 10.0,
            "Seconds between the milter's keep-alives to the MTA while the daemon works, so "
            "the MTA's content timeout does not fire on a slow scan.", positive),
    Setting("milter_on_error", "milter", str, "tempfail",
            "What the MTA is told when there is no verdict (daemon down, too slow, bad reply, "
            "spool failure): tempfail, reject or accept (passes unscanned mail: not "
            "recommended).", one_of("tempfail", "reject", "accept")),
    Setting("milter_policy_bank", "milter", str, "",
            "AM.PDP policy_bank the milter sends: comma-separated names; {daemon_name} (any "
            "{macro}) stands for that milter macro's value. SMTP_AUTH is added for "
            "authenticated clients."),
    Setting("milter_quarantine", "milter", list, [],
            "Verdicts (return values discard, reject) the milter turns into the MTA's hold "
            "queue instead (Postfix: postsuper -H to release); empty: none.",
            categories("discard", "reject")),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))
# [policy_banks.NAME]: overrides of the [policy], [notify] and [headers] settings, each
# value checked by its own row (so the validator needs the finished table).
TABLE_SECTIONS["policy_banks"] = bank_tables_check(BY_NAME)
