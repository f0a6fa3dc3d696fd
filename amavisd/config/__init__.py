"""Settings: declared once, in one table.

Every setting is a `Setting` row (name, type, default, validator, help). The
same table yields the TOML schema, the command-line flags, `check-config`'s
output and the commented sample `etc/amavisd.toml`, so they cannot drift.

A bad key or value raises `ConfigError` with one line naming the key; the
CLI turns it into exit status 78 (EX_CONFIG). Nothing here touches sockets
or processes.

One module a job:

    setting.py     a row (`Setting`), `ConfigError`, `coerce` (type, then validator)
    validators.py  the validators the rows name
    table.py       `SETTINGS`, the table itself
    values.py      `Config`, the effective settings and the paths derived from them
    loading.py     `load`: defaults, the TOML file, the command line, cross-checks
    flags.py       argparse flags from the table
    rendering.py   TOML text: the sample and `check-config`'s output

This package sits below the daemon's other layers: it imports no scanner, no
forwarder, no listener, and nothing that imports it back (the import-graph
test keeps it so). Where a value's syntax belongs to another part (scanner
tables, mail-sending methods, banned rules), that part keeps the checker in a
leaf module beside its registry and the validators here call it. The names
below are the public API: import them from `amavisd.config`.
"""

from amavisd.config.flags import add_flags, overrides_from
from amavisd.config.loading import (
    DEFAULT_CONFIG_PATH,
    check_scanner_names,
    check_work_base,
    defaults,
    load,
    read_toml,
)
from amavisd.config.rendering import SAMPLE_VALUES, SCANNERS_HELP, render, sample, toml_value
from amavisd.config.setting import ConfigError, Setting, coerce
from amavisd.config.table import (
    BANNED_DEFAULTS,
    BY_NAME,
    DESTINIES,
    SECTIONS,
    SETTINGS,
    TABLE_SECTIONS,
)
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
    parse_address,
    positive,
    reason_destinies_validator,
    scanner_address,
    scanner_names,
    scanner_tables,
)
from amavisd.config.values import Config

__all__ = [
    "BANNED_DEFAULTS", "BY_NAME", "DEFAULT_CONFIG_PATH", "DESTINIES", "SAMPLE_VALUES",
    "SCANNERS_HELP", "SECTIONS", "SETTINGS", "TABLE_SECTIONS",
    "Config", "ConfigError", "Setting",
    "absolute_path", "absolute_path_or_empty", "add_flags", "banned_rules", "between",
    "categories", "check_scanner_names", "check_work_base", "coerce", "defaults", "file_mode",
    "load", "log_targets", "loopback_listen", "method_spec", "method_spec_or_empty",
    "non_negative", "one_of", "overrides_from", "parse_address", "positive", "read_toml",
    "reason_destinies_validator", "render", "sample", "scanner_address", "scanner_names",
    "scanner_tables", "toml_value",
]
