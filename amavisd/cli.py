"""The `amavisd` command: run, scan, check-config, quarantine, check-scanners,
import-config, status.

Exit statuses follow sysexits.h: 64 usage, 66 missing input, 71 cannot bind,
75 could not scan, 78 configuration error. `scan` adds 0 all clean, 1 any
infected or banned, 2 any unchecked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from amavisd import __version__, sysexits
from amavisd import config as configuration
from amavisd.config import Config, ConfigError

log = logging.getLogger("amavisd")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"TOML config file (default {configuration.DEFAULT_CONFIG_PATH} "
                             "if it exists, or $AMAVISD_CONFIG)")
    parser = argparse.ArgumentParser(prog="amavisd", parents=[common],
                                     description="A pre-forked AMaViS mail virus-scanning "
                                                 "daemon speaking AM.PDP.")
    parser.add_argument("--version", action="version", version=f"amavisd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run the daemon (foreground by default)")
    configuration.add_flags(run)

    check = sub.add_parser("check-config", parents=[common],
                           help="print the effective configuration (or the sample)")
    check.add_argument("--sample", action="store_true",
                       help="print the documented sample config with every default")
    configuration.add_flags(check)

    scan = sub.add_parser("scan", parents=[common], help="scan message files in-process")
    configuration.add_flags(scan, only=["clamd", "primary_scanners"])
    scan.add_argument("--json", action="store_true", help="one JSON object a line per file")
    scan.add_argument("--tree", action="store_true", help="show the part tree")
    scan.add_argument("-v", "--verbose", action="store_true", help="log every message")
    scan.add_argument("--policy-bank", action="append", default=[], metavar="NAME[,NAME]",
                      help="apply these policy banks ([policy_banks.NAME]), in order, as a "
                           "client's policy_bank= would; repeatable")
    scan.add_argument("paths", nargs="+", metavar="PATH")

    quarantine = sub.add_parser("quarantine", parents=[common],
                                help="list, show or release quarantined mail")
    configuration.add_flags(quarantine, only=["quarantine_dir"])
    qsub = quarantine.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = qsub.add_parser("list", help="one line per quarantined message")
    listing.add_argument("--secrets", action="store_true",
                         help="show each entry's secret_id (for amavisd-release ID SECRET)")
    show = qsub.add_parser("show", help="print a message and what was found")
    show.add_argument("id")
    show.add_argument("--headers-only", action="store_true")
    release = qsub.add_parser("release", help="re-send to the original (or given) recipients "
                                              "(local: no secret_id needed)")
    release.add_argument("id")
    release.add_argument("recipients", nargs="*", metavar="RCPT")

    health = sub.add_parser("check-scanners", parents=[common],
                            help="ask each configured scanner for its version and signatures")
    configuration.add_flags(health, only=["clamd", "primary_scanners"])

    status = sub.add_parser("status", parents=[common],
                            help="what the running daemon is doing: workers, totals, scanners "
                                 "(from its metrics_listen)")
    configuration.add_flags(status, only=["metrics_listen"])
    status.add_argument("--json", action="store_true", help="the daemon's report as JSON")

    importer = sub.add_parser("import-config",
                              help="print an amavisd-new configuration as amavisd TOML")
    importer.add_argument("-D", "--define", action="append", default=[], metavar="NAME=VALUE",
                          help="the value of a variable the files compute by running a "
                               "command, e.g. -D mydomain=example.com (wins over the files)")
    importer.add_argument("paths", nargs="*", metavar="DIR_OR_FILE",
                          help="conf.d directories or amavisd.conf files, read in order "
                               "(default: Debian's /usr/share/amavis/conf.d and "
                               "/etc/amavis/conf.d)")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The effective config, checked whole: also what only the layers above
    the settings table know (a quarantine_store URL of a known store)."""
    from amavisd.quarantine import open_store

    cfg = configuration.load(getattr(args, "config", None), configuration.overrides_from(args))
    try:
        open_store(cfg)
    except ConfigError as err:  # said as every other setting's error is
        where = f"{cfg.source}: policy." if cfg.source else ""
        raise ConfigError(f"{where}{err}") from None
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return sysexits.EX_USAGE if exit_.code else sysexits.EX_OK
    if not args.command:
        parser.print_usage(sys.stderr)
        return sysexits.EX_USAGE
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"amavisd: config error: {err}", file=sys.stderr)
        return sysexits.EX_CONFIG


# -- check-config -------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.sample:
        sys.stdout.write(configuration.sample())
        return sysexits.EX_OK
    cfg = load_config(args)
    print(f"# effective configuration (file: {cfg.source or 'none, built-in defaults'})")
    print(f"# socket: {cfg.socket_path}   temp base: {cfg.tempbase_path}")
    sys.stdout.write(configuration.render(cfg, commented=False))
    return sysexits.EX_OK


# -- run ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from amavisd import daemonize, logs, metrics, pidfile, preload, privileges
    from amavisd.actions.notify import load_templates, template_dirs
    from amavisd.listeners import ListenerError, bind_all
    from amavisd.master import Arbiter
    from amavisd.observe import exporter

    cfg = load_config(args)
    logs.setup(cfg)
    # Resolve now: after dropping root the resolver's lazy imports may be unreadable.
    cfg = cfg.replace(myhostname=cfg.hostname)
    metrics.setup(cfg)  # the library's multiprocess storage, before anything imports it
    preload.preload()  # all a worker may import, before the drop and the first fork
    load_templates(*template_dirs(cfg))  # and the notice templates it may read
    try:
        daemonize.prepare_dirs(cfg)
        listeners = bind_all(cfg)
    except (ListenerError, OSError, privileges.PrivilegeError) as err:
        log.error("cannot start: %s", err)
        return sysexits.EX_OSERR
    stderr = None
    if cfg.daemon:
        daemonize.detach(cfg, listeners)
        stderr = False
        logs.setup(cfg, stderr=False)
    exporter.bind(cfg)  # the metrics dir and listener, as root; a failure only turns them off
    try:
        if cfg.pidfile:
            pidfile.write(cfg.pidfile)
            privileges.chown_to(cfg.pidfile, cfg.user, cfg.group)
        privileges.drop(cfg.user, cfg.group)
        if cfg.tool_network == "isolated":  # probed once, as the user; workers inherit it
            from amavisd.decode import external

            external.isolation_failure()
    except (pidfile.PidfileError, privileges.PrivilegeError, OSError) as err:
        log.error("cannot start: %s", err)
        return sysexits.EX_OSERR
    try:
        return Arbiter(cfg, listeners, getattr(args, "config", None),
                       configuration.overrides_from(args), stderr).run()
    finally:
        if cfg.pidfile:
            pidfile.remove(cfg.pidfile)


# -- scan -----------------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    from amavisd.envelope import Envelope, Job
    from amavisd.pipeline import Pipeline
    from amavisd.policy.banks import bank_tables, split_names
    from amavisd.verdict import Category

    cfg = load_config(args)
    names = [name for given in args.policy_bank for name in split_names(given)]
    unknown = [name for name in names if name not in bank_tables(cfg)]
    if unknown:  # a client's unknown bank is ignored; ours is a typo
        print(f"amavisd: no policy bank named {unknown[0]!r}", file=sys.stderr)
        return sysexits.EX_USAGE
    banks = ",".join(names)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="amavisd: %(message)s", stream=sys.stderr)
    missing = [p for p in args.paths if not os.path.isfile(p)]
    if missing:
        print(f"amavisd: no such file: {missing[0]}", file=sys.stderr)
        return sysexits.EX_NOINPUT
    pipeline = Pipeline(cfg, name_types=args.tree or args.json)
    results = []
    for number, path in enumerate(args.paths, 1):
        result = pipeline.process(Job(log_id=f"scan-{number:02d}", mail_path=path,
                                      envelope=Envelope(policy_bank=banks)))
        results.append(result)
        if args.json:
            print(json.dumps(result_json(path, result)), flush=True)
        else:
            print(f"{path}: {result.summary()}", flush=True)
            if args.tree and result.tree is not None:
                print_tree(result.tree.describe(), result)
    if any(r.category is None for r in results):
        return sysexits.EX_TEMPFAIL
    worst = max(r.category for r in results)
    if worst >= Category.BANNED:
        return 1
    return 2 if worst == Category.UNCHECKED else 0


def result_json(path: str, result: Any) -> dict[str, Any]:
    return {
        "path": path,
        "verdict": result.verdict,
        "destiny": result.destiny.value,
        "viruses": result.viruses,
        "findings": [vars(f) for f in result.findings],
        "scanned_by": result.scanned_by,
        "banned": result.banned,
        "banned_rules": [{"part": h.part_path, "name": h.part_name, "rule": h.rule_text}
                         for h in result.banned_hits],
        "unchecked": result.unchecked,
        "tempfail": result.tempfail_reason,
        "parts": len(result.parts),
        "size": result.size,
        "elapsed_ms": round(result.elapsed_ms, 2),
        "policy_banks": list(result.policy_banks),
        "tree": result.tree.describe() if result.tree is not None else None,
    }


def print_tree(node: dict[str, Any], result: Any, indent: int = 1) -> None:
    found = {f.part: f"{f.name} (by {f.scanner})" for f in result.findings}
    for hit in result.banned_hits:
        found.setdefault(hit.part_path, f"BANNED by rule {hit.rule_number} [{hit.rule_text}]")
    mark = f"  <-- {found[node['path']]}" if node["path"] in found else ""
    name = f" {node['name']!r}" if node["name"] else ""
    flags = f" [{', '.join(node['flags'])}]" if node["flags"] else ""
    detected = f" ({node['detected']})" if node["detected"] else ""
    print(f"{'  ' * indent}{node['id']} {node['mime_type'] or '?'}{detected}{name} "
          f"{node['size']} B, depth {node['depth']}{flags}{mark}")
    for child in node["children"]:
        print_tree(child, result, indent + 1)


# -- quarantine ------------------------------------------------------------------


def cmd_quarantine(args: argparse.Namespace) -> int:
    from amavisd.envelope import angled
    from amavisd.quarantine import QuarantineError, open_store
    from amavisd.quarantine.release import release

    cfg = load_config(args)
    logging.basicConfig(level=logging.INFO, format="amavisd: %(message)s", stream=sys.stderr)
    store = open_store(cfg)
    if store is None:
        print("amavisd: no quarantine is configured (quarantine_store, quarantine_dir)",
              file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            for e in store.list():
                found = ", ".join(e.viruses or e.banned or e.unchecked)
                secret = f"  {e.secret_id or '-'}" if args.secrets else ""
                print(f"{e.kind}-{e.id}{secret}  {e.date}  {e.category}  {angled(e.sender)} -> "
                      f"{','.join(angled(r) for r in e.recipients)}  {e.size} B  {found}")
            return 0
        if args.action == "show":
            entry = store.get(args.id)
            data = store.message(entry)
            for key, value in vars(entry).items():
                print(f"# {key}: {value}")
            if args.headers_only:
                data = data.split(b"\n\n", 1)[0] + b"\n"
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            return 0
        # Local: whoever can read the 0700 quarantine (root, the daemon's user)
        # may release, to anyone; the secret_id is for requests over AM.PDP.
        outcome = release(cfg, args.id, args.recipients, log_id="cli", local=True)
        print(f"{outcome.smtp} {outcome.enhanced} {outcome.text}")
        return 0 if outcome.ok else sysexits.EX_TEMPFAIL if outcome.temporary else 1
    except QuarantineError as err:
        print(f"amavisd: {err}", file=sys.stderr)
        return 1


# -- check-scanners -----------------------------------------------------------


def cmd_check_scanners(args: argparse.Namespace) -> int:
    """One line per scanner: role, name, ok/FAILED, version and signature date
    (or the error). Exit 0 when all answer, 1 when only backups are down, 69
    (EX_UNAVAILABLE) when no primary scanner answers."""
    from amavisd.scan.scanners import build_scanner_set

    cfg = load_config(args)
    scanners = build_scanner_set(cfg)
    primary_ok = False
    all_ok = True
    for role, members in (("primary", scanners.primary), ("backup", scanners.backup)):
        for scanner in members:
            health = scanner.health()
            print(f"{role:7} {health.scanner}: {'ok' if health.ok else 'FAILED'}: "
                  f"{health.detail}")
            all_ok &= health.ok
            primary_ok |= health.ok and role == "primary"
    if not primary_ok:
        return sysexits.EX_UNAVAILABLE
    return 0 if all_ok else 1


# -- status ---------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Ask the running daemon (GET /status on metrics_listen). Exit 0 healthy,
    1 unhealthy, 69 (EX_UNAVAILABLE) when it cannot be reached."""
    from amavisd.observe.status import StatusError, fetch, render

    cfg = load_config(args)
    if not cfg.metrics_listen:
        print("amavisd: status: metrics_listen is empty, so the daemon serves no status",
              file=sys.stderr)
        return sysexits.EX_UNAVAILABLE
    try:
        report = fetch(cfg.metrics_listen)
    except StatusError as err:
        print(f"amavisd: status: {err}", file=sys.stderr)
        return sysexits.EX_UNAVAILABLE
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        sys.stdout.write(render(report))
    return 0 if report.get("healthy") else 1


COMMANDS = {"run": cmd_run, "check-config": cmd_check_config, "scan": cmd_scan,
            "check-scanners": cmd_check_scanners, "quarantine": cmd_quarantine}
COMMANDS["status"] = cmd_status


# -- import-config ------------------------------------------------------------


def cmd_import_config(args: argparse.Namespace) -> int:
    """amavisd-new's Perl configuration, read (never run), as TOML on stdout;
    what was not translated is listed in comments with file:line. Exit 66: a
    path is not there; 65: a file is not Perl we can read (file:line said)."""
    from amavisd.migrate.importer import import_config
    from amavisd.migrate.lexer import PerlSyntaxError
    from amavisd.migrate.sources import SourceError

    defines = {}
    for item in args.define:
        name, sep, value = item.partition("=")
        if not sep or not (name.isascii() and name.isidentifier()):
            print(f"amavisd: --define {item!r}: use NAME=VALUE, e.g. mydomain=example.com",
                  file=sys.stderr)
            return sysexits.EX_USAGE
        defines[name] = value
    try:
        imported = import_config(args.paths or None, defines)
    except SourceError as err:
        print(f"amavisd: import-config: {err}", file=sys.stderr)
        return sysexits.EX_NOINPUT
    except PerlSyntaxError as err:
        print(f"amavisd: import-config: {err}", file=sys.stderr)
        return sysexits.EX_DATAERR
    sys.stdout.write(imported.text)
    print(f"amavisd: import-config: {len(imported.files)} files read, {imported.translated} "
          f"settings translated, {imported.untranslated} not (listed at the end)",
          file=sys.stderr)
    if imported.load_error:
        print(f"amavisd: import-config: the result does not load: {imported.load_error}",
              file=sys.stderr)
        return sysexits.EX_SOFTWARE
    return sysexits.EX_OK


COMMANDS["import-config"] = cmd_import_config
