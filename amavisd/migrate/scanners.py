"""`@av_scanners` and `@av_scanners_backup` as amavisd's scanners.

An entry is `[name, command, args, clean_status, infected_status,
virus_name_regex, pre_sub, post_sub]`. ClamAV through `\\&ask_daemon` is
our built-in clamd (its socket becomes `clamd`), ClamAV-clamscan our
built-in clamscan. Another command-line product becomes a
`[scanners.NAME]` table of type command, when the program is installed
here (amavisd-new drops an entry whose program it cannot find, at start)
and its statuses are exit codes: `{}` is the directory of parts (`{dir}`),
`{}/*` one argument a file (`{files}`), the name regex's first group the
virus name. Daemon protocols other than clamd's, Perl code and
regex-valued statuses are reported, not guessed.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from amavisd.migrate.perlre import RegexNotTranslated, to_python
from amavisd.migrate.rows import Row
from amavisd.migrate.scope import Entry, NotTranslated, Scope
from amavisd.migrate.values import ArrayRef, Code, Regex, Unknown, perl_num, perl_str

SOCKET_PREFIX = re.compile(r"^(?:clamd|simple|sophie|trophie):")


def translate(scope: Scope) -> None:
    used: set[str] = {"clamd", "clamscan"}
    for var, key in (("@av_scanners", "primary_scanners"),
                     ("@av_scanners_backup", "backup_scanners")):
        if not scope.assigned(var):
            continue
        names: list[str] = []
        for item in scope.get(var):
            where = item.where if isinstance(item, ArrayRef) and item.where else scope.where(var)
            try:
                name = _entry(scope, item, used, names, where)
            except NotTranslated as err:
                scope.skip(var, str(err), where)
                continue
            if name not in names:
                names.append(name)
        if names or key == "backup_scanners":
            scope.set(key, names, var)
        else:
            scope.skip(var, "no entry could be translated; amavisd keeps its default "
                            "(clamd)")


def _entry(scope: Scope, item: Any, used: set[str], names: list[str], where: str) -> str:
    if not isinstance(item, ArrayRef) or len(item.items) < 2:
        raise NotTranslated("an entry that is not [name, command, ...]")
    label = perl_str(item.items[0])
    label = label if isinstance(label, str) else "?"
    command = item.items[1]
    args = item.items[2] if len(item.items) > 2 else None
    if isinstance(command, Code) and command.name in ("ask_daemon", "ask_av") \
            and re.search("clam", label, re.I):
        return _clamd(scope, label, args, used, names, where)
    if isinstance(command, Code):
        raise NotTranslated(f"{label!r}: {_code_reason(command)}")
    if re.search("clamscan", label, re.I) or command == "clamscan":
        return "clamscan"  # our built-in: the same program, with our own arguments
    return _command(scope, label, item.items, used, where)


def _code_reason(command: Code) -> str:
    if command.name.startswith("ask_"):
        return "a daemon protocol amavisd does not speak (only clamd's)"
    return f"runs Perl code ({command.name})"


def _clamd(scope: Scope, label: str, args: Any, used: set[str], names: list[str],
           where: str) -> str:
    if not isinstance(args, ArrayRef) or len(args.items) < 2:
        raise NotTranslated(f"{label!r}: no socket given")
    sockets = args.items[1]
    sockets = sockets.items if isinstance(sockets, ArrayRef) else [sockets]
    addresses = [_clamd_address(s) for s in sockets]
    if "clamd" not in names:
        scope.set("clamd", addresses[0], "@av_scanners", where=where)
        for extra in addresses[1:]:
            scope.skip("@av_scanners", f"{label!r}: amavisd asks one clamd; {extra} (a "
                                       "failover socket) is not used", where)
        return "clamd"
    name = _unique("clamd", used)
    scope.out.scanners[name] = Entry({"type": "clamd", "address": addresses[0]}, where, label)
    return name


def _clamd_address(spec: Any) -> str:
    text = perl_str(spec)
    if isinstance(text, Unknown):
        raise NotTranslated(text.reason)
    text = SOCKET_PREFIX.sub("", text)
    if text.startswith("/"):
        return f"unix:{text}"
    if re.fullmatch(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", text):
        return f"tcp:{text}"
    raise NotTranslated(f"{text!r} is not a socket path or host:port")


def _command(scope: Scope, label: str, items: list[Any], used: set[str], where: str) -> str:
    programs = items[1].items if isinstance(items[1], ArrayRef) else [items[1]]
    candidates = [p for p in (perl_str(p) for p in programs) if isinstance(p, str) and p]
    found = next((f for f in map(_installed, candidates) if f), None)
    if found is None:
        raise NotTranslated(f"{label!r}: none of its programs ({', '.join(candidates[:4])}) "
                            "is installed here (amavisd-new drops such an entry too)")
    if len(items) > 6 and any(x is not None for x in items[6:8]):
        raise NotTranslated(f"{label!r}: runs Perl code before or after the scan")
    table: dict[str, Any] = {"type": "command", "argv": [found] + _argv(label, items[2])}
    for index, key in ((3, "clean"), (4, "infected")):
        table[key] = _statuses(label, items[index] if len(items) > index else None, key)
    pattern = items[5] if len(items) > 5 else None
    if not isinstance(pattern, Regex):
        raise NotTranslated(f"{label!r}: no regex for the virus name")
    try:
        table["names"] = to_python(pattern, case="given", name_group=True)
    except RegexNotTranslated as err:
        raise NotTranslated(f"{label!r}: its virus-name regex: {err}") from None
    name = _unique(re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "scanner", used)
    scope.out.scanners[name] = Entry(table, where, label)
    return name


def _installed(program: str) -> str | None:
    first = program.split()[0] if program.split() else ""
    if first.startswith("/"):
        return first if os.path.isfile(first) and os.access(first, os.X_OK) else None
    return shutil.which(first) if first and "/" not in first else None


def _argv(label: str, args: Any) -> list[str]:
    text = perl_str(args)
    if isinstance(text, Unknown) or not isinstance(args, str):
        raise NotTranslated(f"{label!r}: arguments that are not a string")
    argv = ["{files}" if word in ("{}/*", "*") else word.replace("{}", "{dir}")
            for word in text.split()]
    if not any("{dir}" in a or a == "{files}" for a in argv):
        raise NotTranslated(f"{label!r}: its arguments do not name the parts ({{}})")
    return argv


def _statuses(label: str, value: Any, key: str) -> list[int]:
    values = value.items if isinstance(value, ArrayRef) else [value]
    codes = [perl_num(v) for v in values]
    if isinstance(value, Regex) or not codes or \
            any(not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < 256 for c in codes):
        raise NotTranslated(f"{label!r}: its {key} status is not a list of exit codes (a "
                            "regex over the output, which amavisd's command scanners do not "
                            "read)")
    return codes  # type: ignore[return-value]


def _unique(base: str, used: set[str]) -> str:
    name, n = base, 2
    while name in used:
        name, n = f"{base}-{n}", n + 1
    used.add(name)
    return name


ROWS = (
    Row(("@av_scanners", "@av_scanners_backup"), translate, banks=False),
)
