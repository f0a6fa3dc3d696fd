"""amavisd-new's lookup maps (`@local_domains_maps`, `@bypass_*_checks_maps`,
`@mynetworks`) as amavisd's lists of domains, addresses and networks.

A map list holds hashes (`%local_domains`, a `read_hash` file), access
lists (`['.example.com', '!x.example.com']`), regex tables and constants.
Hash keys and ACL entries translate as they are (`example.com` that domain,
`.example.com` it and its subdomains, `user@example.com` one address, `!`
in front or a false hash value a "no": the same syntax in amavisd's bypass
lists and mynetworks; local_domains has no "no"). Regex tables do not
translate, and are reported. A catch-all (`(1)`, `'.'`) that would switch
virus checks off for every recipient is never carried over: amavisd always
scans unless a site says otherwise in amavisd's own words.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from amavisd.migrate.rows import Row
from amavisd.migrate.scope import Scope
from amavisd.migrate.values import (
    ArrayRef,
    Bareword,
    HashRef,
    Regex,
    RegexTable,
    Unknown,
    VarRef,
    perl_str,
    truthy,
)

MAX_ENTRY = 512


@dataclass
class MapEntries:
    entries: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    everyone: bool = False  # a catch-all: '.', or a true constant such as (1)


def map_entries(scope: Scope, maps: list[Any]) -> MapEntries:
    found = MapEntries()
    for item in maps:
        item = scope.deref(item)
        item = item.items if isinstance(item, (HashRef, ArrayRef)) else item
        if isinstance(item, dict):
            for key, value in item.items():
                _entry(found, key, truthy(value))
        elif isinstance(item, list):
            for raw in item:
                entry = perl_str(raw)
                if isinstance(entry, Unknown):
                    found.problems.append(entry.reason)
                else:
                    negated = len(entry) - len(entry.lstrip("!"))
                    _entry(found, entry.lstrip("!"), negated % 2 == 0)
        elif item is None:
            continue  # an unset $..._re: matches nothing
        elif isinstance(item, (Regex, RegexTable)):
            found.problems.append("a regex lookup table (amavisd's lists hold names, "
                                  "not patterns)")
        elif isinstance(item, Unknown):
            found.problems.append(item.reason)
        elif isinstance(item, (str, int, float, Bareword)):
            if truthy(item) is True:
                found.everyone = True
                found.entries.append(".")
            break  # a constant ends the lookup, true or false
        else:
            found.problems.append(f"a {type(item).__name__} in the list of maps")
    found.entries = list(dict.fromkeys(found.entries))
    return found


def _entry(found: MapEntries, key: str, positive: Any) -> None:
    if len(key) > MAX_ENTRY:  # an address or a domain; checked before any copy is made
        found.problems.append(f"an entry of more than {MAX_ENTRY} characters")
        return
    key = key.strip().lower()
    if isinstance(positive, Unknown):
        found.problems.append(positive.reason)
    elif not key:
        found.problems.append("an empty entry")
    else:
        found.everyone |= key == "." and positive
        found.entries.append(key if positive else "!" + key)


def _maps(scope: Scope, maps_var: str, stem: str) -> list[Any]:
    """The map list: as set, else amavisd-new's default (\\%stem, \\@stem_acl, \\$stem_re)."""
    if scope.assigned(maps_var):
        return list(scope.get(maps_var))
    return [VarRef("%", stem), VarRef("@", f"{stem}_acl"), VarRef("$", f"{stem}_re")]


def _reads(maps_var: str, stem: str) -> tuple[str, ...]:
    return (maps_var, f"%{stem}", f"@{stem}_acl", f"${stem}_re")


def _local_domains(scope: Scope) -> None:
    reads = _reads("@local_domains_maps", "local_domains")
    var = next(v for v in reads if scope.assigned(v))
    found = map_entries(scope, _maps(scope, reads[0], "local_domains"))
    for problem in dict.fromkeys(found.problems):
        scope.skip(var, f"an entry not translated: {problem}")
    if found.everyone:
        scope.skip(var, "every domain is local here; amavisd's local_domains lists domains")
        return
    domains = []
    for entry in found.entries:
        if entry.startswith("!") or "@" in entry:
            scope.skip(var, f"{entry!r}: local_domains lists domains (no addresses, no !)")
        else:
            domains.append(entry)
    if domains or not found.problems:
        scope.set("local_domains", domains, var)


def _bypass(kind: str) -> Row:
    stem = f"bypass_{kind}_checks"
    reads = _reads(f"@{stem}_maps", stem)

    def translate(scope: Scope) -> None:
        var = next(v for v in reads if scope.assigned(v))
        found = map_entries(scope, _maps(scope, reads[0], stem))
        for problem in dict.fromkeys(found.problems):
            scope.skip(var, f"an entry not translated: {problem}")
        if found.everyone and kind == "virus":
            scope.skip(var, "virus checks are off for every recipient here (Debian's "
                            "default until 15-content_filter_mode turns them on); amavisd "
                            "always checks for viruses unless you set bypass_virus_checks "
                            "= [\".\"] yourself")
            return
        if found.entries or not found.problems:
            scope.set(stem, found.entries, var)

    return Row(reads, translate)


def _mynetworks(scope: Scope) -> None:
    var = next(v for v in ("@mynetworks_maps", "@mynetworks") if scope.assigned(v))
    maps = scope.get("@mynetworks_maps") if scope.assigned("@mynetworks_maps") \
        else [VarRef("@", "mynetworks")]
    found = map_entries(scope, list(maps))
    networks = []
    for entry in found.entries:
        bare = entry.lstrip("!").replace("[", "").replace("]", "")
        try:
            network = str(ipaddress.ip_network(bare, strict=False))
        except ValueError:
            found.problems.append(f"{entry!r} is not an IP network")
            continue
        networks.append(("!" if entry.startswith("!") else "") + network)
    for problem in dict.fromkeys(found.problems):
        scope.skip(var, f"an entry not translated: {problem}")
    if networks or not found.problems:
        scope.set("mynetworks", list(dict.fromkeys(networks)), var)


ROWS = (
    Row(_reads("@local_domains_maps", "local_domains"), _local_domains),
    _bypass("virus"),
    _bypass("banned"),
    Row(("@mynetworks_maps", "@mynetworks"), _mynetworks),
)
