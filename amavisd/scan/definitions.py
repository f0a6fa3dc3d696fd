"""What a `[scanners.NAME]` table may say, checked without loading a scanner.

The settings check these tables when the config is read (a bad one is a
one-line config error at start or HUP, not a failure on the first message),
yet the settings must not import the scanners, which talk to sockets and
run programs. So the schema lives here, beside the registry in
`scanners.py` that builds scanners from it: the keys each scanner type
takes, the command-line definition and its checks, and the scanners that
are always defined. Standard library only; it must never import a scanner.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# ClamAV's name for a file it stopped scanning at one of its limits (with
# AlertExceedsMax; the bare name before ClamAV 0.103): its own names only,
# since another database's signature named so is reported with ".UNOFFICIAL"
# appended, and is what it found. clamd's scanner and clamscan's share it.
CLAMAV_GAVE_UP = r"Heuristics\.Limits\.Exceeded(\.Max[A-Za-z0-9]+)?"


@dataclass(frozen=True)
class CommandDefinition:
    argv: tuple[str, ...]  # "{dir}" is the dir of parts, "{files}" expands to one arg each
    clean: frozenset[int] = frozenset({0})
    infected: frozenset[int] = frozenset({1})
    names: str = r"^(?P<path>.+?): (?P<name>\S+) FOUND$"  # groups: name, optional path
    # names that mean "I gave up on this file" (a size limit), not a virus: missed
    unchecked_names: str = rf"^{CLAMAV_GAVE_UP}$"
    version_argv: tuple[str, ...] = ()
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must not be empty")
        if not any("{dir}" in a or a == "{files}" for a in self.argv):
            raise ValueError('argv must contain "{dir}" or "{files}"')
        if self.clean & self.infected:
            raise ValueError("an exit code cannot mean both clean and infected")
        try:
            pattern = re.compile(self.names, re.M)
        except re.error as err:
            raise ValueError(f"names is not a valid regular expression: {err}") from None
        if "name" not in pattern.groupindex:
            raise ValueError("names must have a (?P<name>...) group")


# clamscan as a backup to clamd: the same engine, no daemon needed. It loads its
# database on every run (seconds), which is fine for a backup. --alert-exceeds-max
# makes a part over its size limits a finding instead of a silent "OK".
CLAMSCAN = CommandDefinition(
    argv=("clamscan", "--stdout", "--no-summary", "--infected", "--alert-exceeds-max=yes",
          "{files}"),
    clean=frozenset({0}),
    infected=frozenset({1}),
    names=r"^(?P<path>.+?): (?P<name>\S+) FOUND$",
    version_argv=("clamscan", "--version"),
)

# Always defined; [scanners.<name>] tables add more or replace these.
BUILTIN: dict[str, dict[str, Any]] = {
    "clamd": {"type": "clamd"},
    "clamscan": {"type": "command", "argv": list(CLAMSCAN.argv),
                 "version_argv": list(CLAMSCAN.version_argv)},
}

COMMAND_KEYS = {"type", "argv", "clean", "infected", "names", "unchecked_names", "version_argv",
                "timeout"}
CLAMD_KEYS = {"type", "address", "timeout", "max_stream"}

# The keys each scanner type takes: scanners.SCANNER_TYPES builds the same types.
TYPE_KEYS: dict[str, set[str]] = {"clamd": CLAMD_KEYS, "command": COMMAND_KEYS}


def command_definition(spec: Mapping[str, Any]) -> CommandDefinition:
    fields: dict[str, Any] = {"argv": tuple(spec.get("argv", ()))}
    for key in ("clean", "infected"):
        if key in spec:
            fields[key] = frozenset(int(v) for v in spec[key])
    for key in ("names", "unchecked_names"):
        if key in spec:
            fields[key] = str(spec[key])
    if "version_argv" in spec:
        fields["version_argv"] = tuple(spec["version_argv"])
    if "timeout" in spec:
        fields["timeout"] = float(spec["timeout"])
    return CommandDefinition(**fields)


def check_definitions(definitions: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate [scanners.*] tables; raise ValueError naming the bad one."""
    checked: dict[str, dict[str, Any]] = {}
    for name, spec in definitions.items():
        if not isinstance(spec, dict):
            raise ValueError(f"scanners.{name} must be a table")
        kind = spec.get("type")
        if kind not in TYPE_KEYS:
            raise ValueError(f"scanners.{name}.type must be one of {', '.join(TYPE_KEYS)}")
        unknown = sorted(set(spec) - TYPE_KEYS[kind])
        if unknown:
            raise ValueError(f"scanners.{name}: unknown key {unknown[0]}")
        if kind == "command":
            try:
                command_definition(spec)
            except (TypeError, ValueError) as err:
                raise ValueError(f"scanners.{name}: {err}") from None
        checked[name] = dict(spec)
    return checked
