"""The translation as TOML that amavisd's own loader accepts.

Every value is checked by the settings table before it is written (the
setting's own type and validator, the scanner and policy-bank schemas);
one amavisd refuses is written commented out and reported, as is a setting
this amavisd's table does not have yet. Comments carry where each value came
from, and every string from the site's files is escaped, so a hostile value
can neither break the TOML nor smuggle a line into it.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from amavisd.config.setting import ConfigError, coerce
from amavisd.config.table import BY_NAME, SECTIONS, TABLE_SECTIONS
from amavisd.migrate.scope import Entry, Translation, Untranslated
from amavisd.scan.definitions import check_definitions

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
MAX_VALUE_CHARS = 256 * 1024  # one setting's value; a site's longest is a few KiB
MAX_COMMENT = 400
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029]")


@dataclass
class Verdicts:
    """Which entries amavisd refuses (with its message) or does not know yet."""
    refused: dict[tuple[str, str], str] = field(default_factory=dict)  # (table, key) -> error
    pending: set[tuple[str, str]] = field(default_factory=set)


def render(out: Translation, sections: dict[str, str], files: list[str],
           refused_extra: dict[tuple[str, str], str] | None = None) -> tuple[str, Verdicts]:
    verdicts = check(out, sections)
    verdicts.refused.update(refused_extra or {})
    lines = header(files)
    by_section: dict[str, list[str]] = {}
    for key in out.settings:
        by_section.setdefault(sections.get(key, "?"), []).append(key)
    for section in [s for s in SECTIONS if s in by_section] + \
            sorted(s for s in by_section if s not in SECTIONS):
        known = section in SECTIONS
        lines.append(f"[{section}]" if known else f"# [{section}]  (not yet a section of "
                                                  "this amavisd)")
        for key in by_section[section]:
            lines += entry_lines(key, out.settings[key], ("", key), verdicts, known)
        lines.append("")
    lines += bank_lines(out, verdicts)
    lines += scanner_lines(out, verdicts)
    lines += report_lines(out, verdicts, files)
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # a bug of ours if this fails: never hand out broken TOML
    return text, verdicts


def check(out: Translation, sections: dict[str, str]) -> Verdicts:
    verdicts = Verdicts()
    for key, entry in out.settings.items():
        if too_large(entry.value):
            verdicts.refused[("", key)] = f"a value of more than {MAX_VALUE_CHARS} characters"
            continue
        setting = BY_NAME.get(key)
        if setting is None:
            verdicts.pending.add(("", key))
            continue
        try:
            entry.value = coerce(setting, entry.value, f"{setting.section}.{key}")
        except ConfigError as err:
            verdicts.refused[("", key)] = str(err)
    for name, entry in out.scanners.items():
        if too_large(entry.value):
            verdicts.refused[("scanners", name)] = "too large"
            continue
        try:
            check_definitions({name: entry.value})
        except ValueError as err:
            verdicts.refused[("scanners", name)] = str(err)
    for key in ("primary_scanners", "backup_scanners"):  # only scanners that are written
        entry = out.settings.get(key)
        if entry is not None and isinstance(entry.value, list):
            entry.value = [n for n in entry.value if ("scanners", n) not in verdicts.refused]
    check_banks = TABLE_SECTIONS.get("policy_banks")
    for bank, entries in out.banks.items():
        if check_banks is not None:
            try:
                check_banks({bank: {}})
            except (ValueError, ConfigError) as err:
                verdicts.refused[(bank, "")] = str(err)  # the bank itself: its name
                continue
        for key, entry in entries.items():
            if too_large(entry.value):
                verdicts.refused[(bank, key)] = f"a value of more than {MAX_VALUE_CHARS} characters"
                continue
            if check_banks is None:
                verdicts.pending.add((bank, key))
                continue
            try:
                check_banks({bank: {key: entry.value}})
            except (ValueError, ConfigError) as err:
                verdicts.refused[(bank, key)] = str(err)
    return verdicts


def header(files: list[str]) -> list[str]:
    lines = ["# amavisd configuration translated from amavisd-new's by `amavisd import-config`.",
             "# Read, in this order:"]
    lines += [f"#   {comment(f)}" for f in files]
    lines += ["# Each value says where it came from; what was not translated is listed at the",
              "# end with the reason. Check the result: amavisd check-config -c THIS_FILE", ""]
    return lines


def entry_lines(key: str, entry: Entry, ref: tuple[str, str], verdicts: Verdicts,
                active: bool) -> list[str]:
    source = f"{entry.where}  {entry.source}" + (f": {entry.note}" if entry.note else "")
    lines = [f"# {comment(source)}"]
    assignment = f"{toml_key(key)} = {preview(entry.value)}"
    if ref in verdicts.refused:
        lines.append(f"# amavisd refuses this value: {comment(verdicts.refused[ref])}")
        active = False
    elif ref in verdicts.pending:
        lines.append("# not yet a setting of this amavisd:")
        active = False
    if active:
        lines += assignment.split("\n")
    else:
        lines += [f"# {line}" for line in assignment.split("\n")]
    return lines


def bank_lines(out: Translation, verdicts: Verdicts) -> list[str]:
    lines = []
    for bank, entries in out.banks.items():
        title = f"[policy_banks.{toml_key(bank)}]"
        where = comment(f"{out.bank_where.get(bank, '?')}  $policy_bank{{{bank!r}}}")
        active = False
        if "policy_banks" not in TABLE_SECTIONS:
            lines.append(f"# {title}  (policy banks are not in this amavisd yet)")
        elif (bank, "") in verdicts.refused:
            lines.append(f"# {comment(title)}  (amavisd refuses this bank: "
                         f"{comment(verdicts.refused[(bank, '')])})")
        else:
            lines.append(title)
            active = True
        lines.append(f"# {where}")
        for key, entry in entries.items():
            lines += entry_lines(key, entry, (bank, key), verdicts, active)
        lines.append("")
    return lines


def scanner_lines(out: Translation, verdicts: Verdicts) -> list[str]:
    lines = []
    for name, entry in out.scanners.items():
        refused = verdicts.refused.get(("scanners", name))
        prefix = "# " if refused else ""
        lines.append(f"{prefix}[scanners.{toml_key(name)}]")
        lines.append(f"# {comment(entry.where)}  {comment(entry.source)}")
        if refused:
            lines.append(f"# amavisd refuses this table: {comment(refused)}")
        for key, value in entry.value.items():
            lines += [f"{prefix}{line}" for line in
                      f"{toml_key(key)} = {preview(value)}".split("\n")]
        lines.append("")
    return lines


def report_lines(out: Translation, verdicts: Verdicts, files: list[str]) -> list[str]:
    missed = list(out.untranslated)
    for (table, key), error in verdicts.refused.items():
        if key == "":
            missed.append(Untranslated(out.bank_where.get(table, "?"),
                                       f"$policy_bank{{{table!r}}}", error))
            continue
        entry = _entry(out, table, key)
        if entry is not None:
            missed.append(Untranslated(entry.where, entry.source, f"amavisd refuses "
                                       f"{key} = {preview(entry.value)[:80]}: {error}"))
    order = {name: i for i, name in enumerate(files)}

    def position(item: Untranslated) -> tuple[int, int, str]:
        name, _, line = item.where.rpartition(":")
        return order.get(name, len(order)), int(line) if line.isdigit() else 0, item.what

    lines = ["# " + "-" * 76, "# What was not translated (file:line: variable: why):"]
    lines += [f"# not translated: {comment(f'{m.where}: {m.what}: {m.reason}')}"
              for m in sorted(missed, key=position)]
    if out.notes:
        lines += ["#", "# Notes:"]
        lines += [f"# note: {comment(f'{n.where}: {n.what}: {n.reason}')}"
                  for n in sorted(out.notes, key=position)]
    return lines


def _entry(out: Translation, table: str, key: str) -> Entry | None:
    if table == "":
        return out.settings.get(key)
    if table == "scanners":
        return out.scanners.get(key)
    return out.banks.get(table, {}).get(key)


def comment(text: str) -> str:
    """Text safe inside a TOML comment: no line break, no control character,
    and short (a reason may quote a hostile value)."""
    if len(text) > MAX_COMMENT:
        text = text[:MAX_COMMENT] + "..."
    return CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 256
                       else f"\\u{ord(m.group(0)):04x}", text)


def too_large(value: Any, budget: int = MAX_VALUE_CHARS) -> bool:
    """More than `budget` characters of strings, counted without building them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            budget -= len(item) if isinstance(item, str) else 8
        if budget < 0:
            return True
    return False


def preview(value: Any) -> str:
    """The TOML of a value, or a placeholder for one too large to write."""
    return '"<too large to show>"' if too_large(value) else toml_value(value)


def toml_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else toml_string(key)


def toml_string(text: str) -> str:
    if "\\" in text and "'" not in text and not CONTROL.search(text):
        return f"'{text}'"  # a literal string keeps regex backslashes as written
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + CONTROL.sub(lambda m: f"\\u{ord(m.group(0)):04x}", escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else \
            ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, list):
        items = [toml_value(v) for v in value]
        if sum(len(i) + 2 for i in items) <= 80:
            return "[" + ", ".join(items) + "]"
        return "[\n" + "".join(f"    {i},\n" for i in items) + "]"
    return toml_string(str(value))
