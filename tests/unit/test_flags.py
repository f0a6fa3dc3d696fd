"""Command-line flags from the settings table: a list setting's flag adds up."""

from __future__ import annotations

import argparse

import pytest

from amavisd import config as configuration
from amavisd.cli import build_parser


def given(*argv: str, only=None) -> dict:
    parser = argparse.ArgumentParser()
    configuration.add_flags(parser, only=only)
    return configuration.overrides_from(parser.parse_args(list(argv)))


@pytest.mark.parametrize("argv, listen", [
    (["--smtp-listen", "127.0.0.1:10024", "--smtp-listen", "lmtp:127.0.0.1:10026"],
     ["127.0.0.1:10024", "lmtp:127.0.0.1:10026"]),
    (["--smtp-listen", "127.0.0.1:10024,lmtp:127.0.0.1:10026"],  # comma lists still work
     ["127.0.0.1:10024", "lmtp:127.0.0.1:10026"]),
    (["--smtp-listen", "127.0.0.1:10024, [::1]:10024", "--smtp-listen", "unix:/run/a.sock"],
     ["127.0.0.1:10024", "[::1]:10024", "unix:/run/a.sock"]),
    (["--smtp-listen", "127.0.0.1:10024"], ["127.0.0.1:10024"]),
])
def test_a_list_flag_given_several_times_appends(argv, listen):
    assert given(*argv) == {"smtp_listen": listen}
    assert configuration.load(None, given(*argv)).smtp_listen == listen


def test_a_list_flag_not_given_leaves_the_setting_alone():
    assert "smtp_listen" not in given("--workers", "3")
    assert configuration.load(None, given()).smtp_listen == []


def test_the_cli_parser_appends_too():
    args = build_parser().parse_args(["run", "--scanners", "clamd", "--scanners", "backup",
                                      "--smtp-listen", "127.0.0.1:1", "--smtp-listen",
                                      "lmtp:127.0.0.1:2"])
    overrides = configuration.overrides_from(args)
    assert overrides["primary_scanners"] == ["clamd", "backup"]
    assert overrides["smtp_listen"] == ["127.0.0.1:1", "lmtp:127.0.0.1:2"]
