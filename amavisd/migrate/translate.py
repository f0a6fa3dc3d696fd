"""The registry of translators, and the pass that runs it over a configuration.

`ROWS` holds one row a variable (or a few that make one setting together);
`FAMILIES` says, once a kind, why whole families of amavisd-new variables
have no equivalent (spam, DKIM, SQL, LDAP, decoder programs, ...). `run`
applies the rows to the whole configuration and then to each
`$policy_bank{NAME}`; every variable a file set is translated, or reported
with the reason, and `my` helpers are left alone.
"""

from __future__ import annotations

import re

from amavisd.config.table import BY_NAME
from amavisd.migrate import banned, listen, lookups, notices, outcomes, scanners
from amavisd.migrate.evaluate import BUILT_IN, Reader
from amavisd.migrate.rows import (
    Row,
    boolean,
    integer,
    log_level,
    lowercase,
    noted,
    octal_mode,
    path,
    seconds,
    simple,
    skipped,
    text,
)
from amavisd.migrate.scope import (
    BankScope,
    NotTranslated,
    Scope,
    TopScope,
    Translation,
    Untranslated,
)
from amavisd.migrate.values import HashRef, Unknown, perl_str

# Where a setting goes when this amavisd's table does not have it yet: other
# parts of the daemon are adding these, and the output keeps them commented.
PLANNED_SECTIONS = {
    "interface_policy": "daemon", "mynetworks": "policy", "originating": "policy",
    "bypass_virus_checks": "policy", "bypass_banned_checks": "policy",
    "recipient_policy": "policy", "smtp_listen": "smtp", "smtp_allow": "smtp",
    "forward_method": "smtp",
}

ROWS: tuple[Row, ...] = (
    # [daemon]
    simple("$max_servers", "workers", integer),
    simple("$max_requests", "max_requests", integer,
           "amavisd-new's default was 20; amavisd's is 500"),
    simple("$child_timeout", "child_timeout", seconds),
    simple("$MYHOME", "workdir", path),
    simple("$TEMPBASE", "tempbase", path),
    simple("$unix_socket_mode", "socket_mode", octal_mode),
    simple("$daemon_user", "user", text),
    simple("$daemon_group", "group", text),
    simple("$pid_file", "pidfile", path),
    *listen.ROWS,
    # [log]
    Row(("$DO_SYSLOG", "$LOGFILE"), lambda scope: _logging(scope), banks=False),
    simple("$syslog_facility", "syslog_facility", lowercase),
    simple("$syslog_ident", "syslog_ident", text),
    simple("$log_level", "log_level", log_level),
    # [scan], [decode]
    *scanners.ROWS,
    simple("$MAXLEVELS", "max_depth", integer),
    simple("$MAXFILES", "max_parts", integer),
    *(skipped(v, "amavisd's quota is max(min_expansion_quota, expansion_quota_factor x "
                 "message size), not amavisd-new's formula; its defaults stay")
      for v in ("$MIN_EXPANSION_QUOTA", "$MAX_EXPANSION_QUOTA", "$MIN_EXPANSION_FACTOR",
                "$MAX_EXPANSION_FACTOR")),
    # [policy]
    *outcomes.ROWS,
    simple("$QUARANTINEDIR", "quarantine_dir", lambda v: "" if v in (None, "") else path(v)),
    *banned.ROWS,
    *lookups.ROWS,  # after banned: a bypass of banned checks for everyone empties the rules
    simple("$originating", "originating", boolean),
    # [notify], [headers]
    *notices.ROWS,
    simple("$X_HEADER_TAG", "x_header_tag", text),
    noted("$mydomain", "used in other settings' values only; amavisd has no such setting"),
    noted("$lock_file", "amavisd's master needs no lock file"),
)

FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), why) for p, why in (
    (r"^(?:sa_|spam_|bypass_spam|score_sender|warnspam|dspam|razor|bayes)|_spam_|spam$",
     "no spam checks in amavisd"),
    (r"^final_bad_header_destiny$|bad_header|badh", "no header checks in amavisd"),
    (r"dkim", "no DKIM in amavisd"),
    (r"sql", "no SQL lookups or logging in amavisd"),
    (r"ldap", "no LDAP lookups in amavisd"),
    (r"^(?:file|gzip|bzip2|lzop|rpm2cpio|cabextract|uncompress|unfreeze|arc|unarj|unrar|zoo|"
     r"lha|pax|cpio|ar|ripole|tnef|gunzip|bunzip2|unlzop|unzoo|unstuff|lrzip|path|ENV)$",
     "amavisd's decoders are built in and find their own tools"),
    (r"^(?:enable_db|enable_global_cache|db_home|nanny_details_level|enable_zmq|zmq_sockets)$",
     "no BerkeleyDB or 0MQ: amavisd counts in Prometheus metrics and watches its workers by "
     "heartbeat"),
    (r"^(?:syslog_priority|SYSLOG_LEVEL|warnvirussender|insert_received_line|"
     r"relayhost_is_client|notify_xmailer_header)$",
     "retired in amavisd-new itself (it ignores the value)"),
    (r"templ$|^(?:hdr_encoding|bdy_encoding)$",
     "amavisd's notice templates are its own (UTF-8); template_dir holds a site's own"),
    (r"^quarantine_subdir_levels$",
     "amavisd's quarantine layout is its own: one file per message and a JSON sidecar"),
    (r"^viruses_that_fake_sender_maps$",
     "amavisd never sends a sender DSN for a virus unless sender_notify says so"),
    (r"^keep_decoded_original_maps$", "amavisd's decoders decide which originals are scanned"),
    (r"defang|^undecipherable_subject_tag$", "no defanging or subject tags in amavisd"),
    (r"p0f|os_fingerprint|pen_?pals|redis|ip_repu", "not in amavisd"),
    (r"^(?:banned_namepath_re|banned_rules|banned_filename_maps)$",
     "per-recipient banned tables: amavisd has one rule list (banned_rules, per policy bank); "
     "write these rules there"),
))


def run(reader: Reader, sections: dict[str, str]) -> Translation:
    out = Translation()
    top = TopScope(out, sections, reader.vars)
    _apply(top, [v for v in reader.vars.assigned if top.assigned(v) and
                 not v.startswith(("%policy_bank",))])
    banks = reader.vars.hashes.get("policy_bank", {})
    for name, bank in banks.items():
        where = reader.vars.elements.get(("%policy_bank", name), top.where("%policy_bank"))
        if name == "" or not isinstance(bank, HashRef):
            reason = bank.reason if isinstance(bank, Unknown) else "not a { key => value } hash"
            out.untranslated.append(Untranslated(where, f"$policy_bank{{{name!r}}}",
                                                 "the built-in base bank" if name == "" else
                                                 reason))
            continue
        out.banks[name] = {}
        out.bank_where[name] = where
        scope = BankScope(top, name, bank, where)
        _apply(scope, [_bank_var(key) for key in bank.items])
    for item in reader.unread:
        out.untranslated.append(Untranslated(item.where, item.what, item.reason))
    for name, first in reader.vars.built_in_used.items():
        if f"${name}" not in reader.vars.assigned:
            hint = " (Debian sets it in /usr/share/amavis/conf.d, which amavisd reads first: " \
                   "name that directory first)" if name == "MYHOME" else ""
            out.notes.append(Untranslated(first, f"${name}", f"not set in the files read: "
                                          f"amavisd-new's built-in {perl_str(BUILT_IN[name])!r} "
                                          f"was used{hint}"))
    return out


def _apply(scope: Scope, variables: list[str]) -> None:
    done: set[str] = set()
    for row in ROWS:
        hits = [v for v in row.reads if scope.assigned(v)]
        if not hits:
            continue
        done.update(row.reads)
        if scope.bank is not None and not row.banks:
            for var in hits:
                scope.skip(var, "a daemon-wide setting, not one of a policy bank in amavisd")
            continue
        row.translate(scope)
    for var in variables:
        if var not in done and var[1:] not in {d[1:] for d in done}:
            scope.skip(var, family_reason(var[1:]))


def family_reason(name: str) -> str:
    for pattern, why in FAMILIES:
        if pattern.search(name):
            return why
    return "amavisd has no setting for this"


def _bank_var(key: str) -> str:
    """A bank's key as the variable it overrides: `..._maps` keys are arrays."""
    for sigil in ("$", "@", "%"):
        for row in ROWS:
            if sigil + key in row.reads:
                return sigil + key
    return ("@" if key.endswith("_maps") else "$") + key


def _logging(scope: Scope) -> None:
    syslog = scope.get("$DO_SYSLOG", 0)
    logfile = scope.get("$LOGFILE", None)
    var = "$DO_SYSLOG" if scope.assigned("$DO_SYSLOG") else "$LOGFILE"
    try:
        if boolean(syslog):
            scope.set("log_to", ["syslog"], var)
        elif logfile not in (None, ""):
            scope.set("log_to", [], var)
            scope.set("log_file", path(logfile), "$LOGFILE")
        else:
            scope.set("log_to", ["stderr"], var)
    except NotTranslated as err:
        scope.skip(var, str(err))


def planned_sections() -> dict[str, str]:
    """Each setting's section: the table's, else where it is planned."""
    sections = dict(PLANNED_SECTIONS)
    sections.update({name: s.section for name, s in BY_NAME.items()})
    return sections
