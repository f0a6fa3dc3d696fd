"""What happens to a message: destinies, quarantine, a scanner failure.

`$final_virus_destiny` and friends map D_* to amavisd's destinies, with
amavisd-new's rule that `$warnbannedsender` turns a D_DISCARD of banned
mail into D_BOUNCE. Two settings are never carried over, because here they
would pass mail nobody checked: `$final_unchecked_destiny = D_PASS` (the
default of amavisd-new 2.7+, fail-open) and `$virus_scanners_failure_is_fatal
= 0`. A site that wants that must say so in amavisd's own words.
"""

from __future__ import annotations

from amavisd.migrate.rows import Row, boolean, destiny
from amavisd.migrate.scope import NotTranslated, Scope
from amavisd.migrate.values import Unknown, perl_str, truthy

DESTINY_VARS = (("$final_virus_destiny", "virus_destiny"),
                ("$final_banned_destiny", "banned_destiny"),
                ("$final_unchecked_destiny", "unchecked_destiny"))
# amavisd-new's defaults (Amavis::Conf), for methods a configuration leaves alone
QUARANTINE_METHODS = (("$virus_quarantine_method", "infected", "local:virus-%m"),
                      ("$banned_files_quarantine_method", "banned", "local:banned-%m"),
                      ("$unchecked_quarantine_method", "unchecked", None),
                      ("$clean_quarantine_method", "clean", None))
OTHER_QUARANTINES = {"$spam_quarantine_method": "no spam checks in amavisd",
                     "$bad_header_quarantine_method": "no header checks in amavisd",
                     "$archive_quarantine_method": "no archive quarantine of all mail in "
                                                   "amavisd"}


def _destinies(scope: Scope) -> None:
    for var, key in DESTINY_VARS:
        if not scope.assigned(var):
            continue
        try:
            value = destiny(scope.get(var))
        except NotTranslated as err:
            scope.skip(var, str(err))
            continue
        if key == "unchecked_destiny" and value == "pass":
            scope.skip(var, "D_PASS would deliver mail amavisd could not fully check; "
                            "amavisd rejects it unless you set unchecked_destiny = \"pass\" "
                            "yourself")
            continue
        note = "passes mail with a virus (tagged)" if key == "virus_destiny" and \
            value == "pass" else ""
        if key == "banned_destiny" and value == "discard" and \
                truthy(scope.get("$warnbannedsender", 0)) is True:
            value, note = "bounce", "D_DISCARD with $warnbannedsender is a bounce in amavisd-new"
        scope.set(key, value, var, note)
    if scope.assigned("$warnbannedsender"):
        warn = truthy(scope.get("$warnbannedsender"))
        if isinstance(warn, Unknown):
            scope.skip("$warnbannedsender", warn.reason)
        elif warn:
            scope.set("sender_notify", ["banned"], "$warnbannedsender")
        else:
            scope.info("$warnbannedsender", "off: senders of banned mail hear only of a bounce")


def _quarantine(scope: Scope) -> None:
    kept, gzip = [], False
    where = scope.first_where(*(v for v, _, _ in QUARANTINE_METHODS))
    for var, category, default in QUARANTINE_METHODS:
        method = perl_str(scope.get(var, default))
        if isinstance(method, Unknown):
            scope.skip(var, method.reason)
            continue
        if not method:
            continue
        kept.append(category)
        gzip |= method.endswith(".gz")
        if not method.startswith("local:") and scope.assigned(var):
            scope.info(var, f"{method}: amavisd keeps quarantined mail in its file store "
                            "(quarantine_dir), one file and a JSON sidecar per message")
    var = next(v for v, _, _ in QUARANTINE_METHODS if scope.assigned(v))
    scope.set("quarantine", kept, var, where=where)
    if gzip:
        scope.set("quarantine_gzip", True, var, "a method ending in .gz", where)


def _failure_is_fatal(scope: Scope) -> None:
    var = "$virus_scanners_failure_is_fatal"
    try:
        fatal = boolean(scope.get(var))
    except NotTranslated as err:
        scope.skip(var, str(err))
        return
    if fatal:
        scope.set("when_scanners_fail", "tempfail", var)
    else:
        scope.skip(var, "0 made mail no scanner could check UNCHECKED (and passed by "
                        "default); amavisd tempfails it: when_scanners_fail = \"pass\" exists, "
                        "but set it yourself if you must")


ROWS = (
    Row(tuple(v for v, _ in DESTINY_VARS) + ("$warnbannedsender",), _destinies),
    Row(tuple(v for v, _, _ in QUARANTINE_METHODS), _quarantine),
    *(Row((var,), lambda scope, var=var, why=why: scope.skip(var, why))
      for var, why in OTHER_QUARANTINES.items()),
    Row(("$virus_scanners_failure_is_fatal",), _failure_is_fatal, banks=False),
)
