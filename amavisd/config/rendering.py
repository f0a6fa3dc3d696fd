"""The settings as TOML text: the commented sample and `check-config`'s output.

Both are rendered from the table, so the sample `etc/amavisd.toml` documents
every key with its default and help, and the effective config printed by
`check-config` loads back as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from amavisd.config.loading import defaults
from amavisd.config.table import SECTIONS, SETTINGS


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
    for name, overrides in values.get("policy_banks", {}).items():
        lines.append(f'[policy_banks."{name}"]')
        lines += [f"{key} = {toml_value(value)}" for key, value in overrides.items()]
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
