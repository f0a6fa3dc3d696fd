"""Who is told, and how mail leaves: admin notices, methods, headers.

amavisd-new sends virus and unchecked notices to `$virus_admin` and banned
ones to `$banned_admin`, falling back to `$virus_admin`; amavisd has one
`admin` and the list `admin_notify` of categories, so an unset admin means
no notices of that kind. Methods are spelt alike (`smtp:[127.0.0.1]:10025`);
a `pipe:` method's `argv=... ${sender} -- ${recipient}` becomes amavisd's
`pipe:/path ... {sender} -- {recipients}`.
"""

from __future__ import annotations

import re

from amavisd.migrate.rows import Row, boolean, text
from amavisd.migrate.scope import NotTranslated, Scope
from amavisd.migrate.values import Unknown

HOSTNAME_COMMAND = re.compile(r"\s*(?:/bin/|/usr/bin/)?hostname(?:\s+(?:-f|--fqdn|-A))?\s*")


def _admins(scope: Scope) -> None:
    admins: dict[str, str | None] = {}
    for var in ("$virus_admin", "$banned_admin"):
        value = scope.get(var, None)
        if isinstance(value, Unknown):
            scope.skip(var, value.reason)
            return
        try:
            admins[var] = (text(value) or None) if value is not None else None
        except NotTranslated as err:
            scope.skip(var, str(err))
            return
    virus = admins["$virus_admin"]
    banned = admins["$banned_admin"] or virus
    var = "$virus_admin" if scope.assigned("$virus_admin") else "$banned_admin"
    categories = [c for c, who in (("infected", virus), ("banned", banned),
                                   ("unchecked", virus)) if who]
    if virus and banned and virus != banned:
        scope.skip("$banned_admin", f"amavisd has one admin ({virus}); banned notices go there")
    if virus or banned:
        scope.set("admin", virus or banned, var)
    scope.set("admin_notify", categories, var,
              "" if categories else "no admin was set: amavisd-new sent no admin notices")


def _method(var: str, key: str) -> Row:
    def translate(scope: Scope) -> None:
        value = scope.get(var)
        if value is None or value == "":
            if key == "forward_method":
                scope.info(var, "undef: the client delivers (delivery_care_of=client)")
            else:
                scope.skip(var, "undef: amavisd needs a way to send; its default stays")
            return
        try:
            scope.set(key, method(text(value)), var)
        except NotTranslated as err:
            scope.skip(var, str(err))

    return Row((var,), translate)


def method(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    if kind in ("smtp", "lmtp") and "*" not in rest:
        return f"{kind}:unix:{rest}" if rest.startswith("/") else spec
    if kind == "pipe":
        argv = re.search(r"(?:^|\s)argv=(.*)$", rest)
        command = (argv.group(1) if argv else rest).strip()
        command = command.replace("${sender}", "{sender}").replace("${recipient}",
                                                                   "{recipients}")
        if "$" not in command:
            return f"pipe:{command}"
    raise NotTranslated(f"{spec!r}: a method amavisd does not have (smtp:, lmtp:, pipe: are)")


def _myhostname(scope: Scope) -> None:
    value = scope.get("$myhostname")
    if isinstance(value, Unknown) and value.command and HOSTNAME_COMMAND.fullmatch(value.command):
        scope.info("$myhostname", f"`{value.command}`: amavisd asks the system the same way "
                                  "when myhostname is empty")
        return
    try:
        scope.set("myhostname", text(value), "$myhostname")
    except NotTranslated as err:
        scope.skip("$myhostname", str(err))


def _header_line(scope: Scope) -> None:
    try:
        line = text(scope.get("$X_HEADER_LINE"))
    except NotTranslated as err:
        scope.skip("$X_HEADER_LINE", str(err))
        return
    # amavisd fills in {version} and {myhostname}: literal braces are doubled
    scope.set("x_header_line", line.replace("{", "{{").replace("}", "}}"), "$X_HEADER_LINE")


def _release_auth(scope: Scope) -> None:
    var = "$auth_required_release"
    try:
        required = boolean(scope.get(var))
    except NotTranslated as err:
        scope.skip(var, str(err))
        return
    if required:
        scope.set("auth_required_release", True, var)
    else:
        scope.skip(var, "0 released quarantined mail without its secret_id; amavisd asks for "
                        "it (amavisd-release ID SECRET). Set auth_required_release = false "
                        "yourself to allow releases without it")


def _notify_from(scope: Scope) -> None:
    try:
        scope.set("notify_from", text(scope.get("$mailfrom_notify_admin")),
                  "$mailfrom_notify_admin")
    except NotTranslated as err:
        scope.skip("$mailfrom_notify_admin", str(err))


ROWS = (
    Row(("$virus_admin", "$banned_admin"), _admins),
    _method("$notify_method", "notify_method"),
    _method("$forward_method", "forward_method"),
    _method("$release_method", "release_method"),
    Row(("$myhostname",), _myhostname),
    Row(("$X_HEADER_LINE",), _header_line),
    Row(("$auth_required_release",), _release_auth),
    Row(("$mailfrom_notify_admin",), _notify_from),
)
