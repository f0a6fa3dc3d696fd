"""The settings table: TOML, flags, validation, the sample file, check-config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.cli import main
from amavisd.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "amavisd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_and_derived_paths():
    cfg = configuration.load(None, {"workdir": "/srv/amavis"})
    assert cfg.workers == 2
    assert cfg.socket_path == "/srv/amavis/amavisd.sock"
    assert cfg.tempbase_path == "/srv/amavis/tmp"


def test_file_then_flags(tmp_path):
    path = write(tmp_path, '[daemon]\nworkers = 5\nchild_timeout = 10\n[scan]\nclamd = "tcp:127.0.0.1:3310"\n')
    cfg = configuration.load(path, {"workers": 7})
    assert cfg.workers == 7
    assert cfg.child_timeout == 10.0 and isinstance(cfg.child_timeout, float)
    assert cfg.clamd == "tcp:127.0.0.1:3310"


@pytest.mark.parametrize("text, key", [
    ("[daemon]\nwokers = 3\n", "daemon.wokers"),
    ("[daemon]\nworkers = 0\n", "daemon.workers"),
    ("[daemon]\nworkers = \"two\"\n", "daemon.workers"),
    ("[daemon]\nworkers = true\n", "daemon.workers"),
    ("[scan]\nclamd = \"/var/run/clamd.ctl\"\n", "scan.clamd"),
    ("[daemon]\nsocket_mode = \"0666\"\n", "daemon.socket_mode"),
    ("[daemon]\ntcp_listen = \"0.0.0.0:9998\"\n", "daemon.tcp_listen"),
    ("[policy]\nvirus_destiny = \"explode\"\n", "policy.virus_destiny"),
    ("[log]\nlog_to = [\"journal\"]\n", "log.log_to"),
    ("[nonsense]\nx = 1\n", "[nonsense]"),
    ("[daemon\n", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        configuration.load(write(tmp_path, text))
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_check_config_exit_78_and_one_line(tmp_path):
    path = write(tmp_path, "[daemon]\nwokers = 3\n")
    proc = subprocess.run([sys.executable, "-m", "amavisd", "check-config", "-c", path],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 78
    assert proc.stderr.strip().count("\n") == 0
    assert "daemon.wokers" in proc.stderr


def test_bad_flag_value_is_78_and_unknown_flag_is_64(capsys):
    assert main(["check-config", "--workers", "0"]) == 78
    assert main(["check-config", "--no-such-flag"]) == 64
    assert main(["check-config", "--clamd", "tcp:localhost:3310"]) == 0
    assert 'clamd = "tcp:localhost:3310"' in capsys.readouterr().out


def test_effective_config_prints_as_loadable_toml(tmp_path, capsys):
    path = write(tmp_path, "[daemon]\nworkers = 4\n")
    assert main(["check-config", "-c", path, "--socket", "/tmp/x.sock"]) == 0
    printed = capsys.readouterr().out
    reloaded = configuration.load(write(tmp_path, printed))
    assert reloaded.workers == 4 and reloaded.socket == "/tmp/x.sock"


def test_every_setting_is_documented_in_the_sample_and_it_loads(tmp_path):
    sample = configuration.sample()
    doc = tomllib.loads(sample)
    flat = {k: v for table in doc.values() for k, v in table.items()}
    assert set(flat) == {s.name for s in configuration.SETTINGS}
    for s in configuration.SETTINGS:
        assert f"# {s.help}" in sample
    cfg = configuration.load(write(tmp_path, sample))
    assert cfg.user == "amavis"


def test_shipped_sample_matches_the_table():
    shipped = (REPO / "etc" / "amavisd.toml").read_text()
    assert shipped == configuration.sample(), "run: amavisd check-config --sample > etc/amavisd.toml"


def test_flags_come_from_the_table():
    from amavisd.cli import build_parser

    run_help = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for flag in ("--socket", "--workers", "--clamd", "--workdir", "--quarantine-dir",
                 "--pidfile", "--foreground", "--daemon", "--config"):
        assert flag in run_help


@pytest.mark.parametrize("work_base", ["/srv/amavis/tmp/work", "/srv/amavis/tmp", "/srv"])
def test_the_work_base_is_kept_out_of_the_clients_temp_base(work_base):
    with pytest.raises(ConfigError, match="work_base"):
        configuration.load(None, {"workdir": "/srv/amavis", "work_base": work_base})
    cfg = configuration.load(None, {"workdir": "/srv/amavis"})
    assert cfg.work_base_path == "/srv/amavis/work"


@pytest.mark.parametrize("url", ["postgres://db/amavis", "file:relative/dir", "nonsense"])
def test_check_config_refuses_a_quarantine_store_it_cannot_open(tmp_path, capsys, url):
    path = tmp_path / "amavisd.toml"
    path.write_text(f'[policy]\nquarantine_store = "{url}"\n')
    assert main(["check-config", "-c", str(path)]) == 78
    assert "quarantine_store" in capsys.readouterr().err


def test_a_quarantine_dir_is_a_directory_not_a_url(tmp_path, capsys):
    path = tmp_path / "amavisd.toml"
    path.write_text('[policy]\nquarantine_dir = "//tmp/q"\n')
    assert main(["check-config", "-c", str(path)]) == 0


def test_a_quarantine_store_error_names_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "amavisd.toml"
    path.write_text('[policy]\nquarantine_store = "/var/q"\n')
    assert main(["check-config", "-c", str(path)]) == 78
    assert f"{path}: policy.quarantine_store:" in capsys.readouterr().err
