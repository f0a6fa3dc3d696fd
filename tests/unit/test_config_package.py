"""The settings package: its public API as before the split, and the
vocabularies it checks kept beside the registries that use them."""

from __future__ import annotations

import pytest

import amavisd.config as config

# Every name importers used from the single-module amavisd/config.py.
PUBLIC = [
    "BANNED_DEFAULTS", "BY_NAME", "DEFAULT_CONFIG_PATH", "DESTINIES", "SAMPLE_VALUES",
    "SCANNERS_HELP", "SECTIONS", "SETTINGS", "TABLE_SECTIONS", "Config", "ConfigError",
    "Setting", "absolute_path", "absolute_path_or_empty", "add_flags", "banned_rules",
    "between", "categories", "check_scanner_names", "check_work_base", "coerce", "defaults",
    "file_mode", "load", "log_targets", "loopback_listen", "method_spec",
    "method_spec_or_empty", "non_negative", "one_of", "overrides_from", "parse_address",
    "positive", "read_toml", "reason_destinies_validator", "render", "sample",
    "scanner_address", "scanner_names", "scanner_tables", "toml_value",
]


def test_the_public_api_is_where_it_was():
    missing = [name for name in PUBLIC if not hasattr(config, name)]
    assert not missing
    assert sorted(config.__all__) == sorted(PUBLIC)


def test_every_scanner_type_the_settings_accept_can_be_built():
    from amavisd.scan.definitions import TYPE_KEYS
    from amavisd.scan.scanners import SCANNER_TYPES

    assert list(SCANNER_TYPES) == list(TYPE_KEYS)


def test_every_method_the_settings_accept_has_a_forwarder():
    from amavisd.actions.forward import FORWARDERS
    from amavisd.actions.methods import PARSERS

    examples = {"smtp": "smtp:[127.0.0.1]:10025", "lmtp": "lmtp:[127.0.0.1]:24",
                "pipe": "pipe:/usr/sbin/sendmail"}
    assert set(PARSERS) == set(examples)
    assert {type(PARSERS[k](spec.partition(":")[2])) for k, spec in examples.items()} == set(
        FORWARDERS)


@pytest.mark.parametrize("key, value, said", [
    ("notify_method", "smtp:host", "smtp method must be smtp:HOST:PORT"),
    ("release_method", "pipe:sendmail", "pipe method must be pipe:/absolute/path"),
    ("notify_method", "mail:x", "unknown method"),
    ("unchecked_destinies", ["secret=pass"], "use kind=destiny"),
    ("banned_rules", ["deny nonsense"], "nonsense"),
    ("clamd", "inet:3310@127.0.0.1", "must be unix:/path or tcp:host:port"),
])
def test_values_checked_by_other_parts_vocabularies(key, value, said):
    with pytest.raises(config.ConfigError, match=said):
        config.load(None, {key: value})


def test_check_config_output_keeps_policy_banks(tmp_path):
    """`check-config` prints the effective config; it must load back as it is,
    banks included (they were dropped, so a printed config lost them)."""
    from amavisd.config import load
    from amavisd.config.rendering import render

    source = tmp_path / "a.toml"
    source.write_text('[policy]\nvirus_destiny = "discard"\n\n'
                      '[policy_banks.STRICT]\nvirus_destiny = "reject"\n'
                      'banned_rules = [\'deny name ~ \\.exe$\']\n')
    config = load(str(source))
    printed = tmp_path / "printed.toml"
    printed.write_text(render(config, commented=False))
    again = load(str(printed))
    assert again["policy_banks"] == config["policy_banks"]
    assert again["policy_banks"]["STRICT"]["virus_destiny"] == "reject"
