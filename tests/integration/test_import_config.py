"""`amavisd import-config` on Debian's real amavisd-new configuration (a copy
of /usr/share/amavis/conf.d and /etc/amavis/conf.d, read-only), through the
installed command, then `amavisd check-config -c` and `amavisd scan` with
the result against a real clamd."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from amavisd.testing.archivers import as_attachment
from amavisd.testing.messages import clean_message, eicar_message

REPO = Path(__file__).resolve().parents[2]
DEBIAN = (Path("/usr/share/amavis/conf.d"), Path("/etc/amavis/conf.d"))
# Debian 2.13's 20-debian_defaults $banned_filename_re, as amavisd rules
DEBIAN_RULES = [
    r"deny name ~ \.[^./]*\.(exe|vbs|pif|scr|bat|cmd|com|cpl|dll)\.?$",
    r"deny name ~ \{[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}\}?$",
    "deny mime ~ ^application/x-msdownload$",
    "deny mime ~ ^application/x-msdos-program$",
    "deny mime ~ ^application/hta$",
    r"deny name ~ .\.(exe|vbs|pif|scr|bat|cmd|com|cpl)$",
    "deny type = exe",
]


def amavisd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amavisd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def debian(tmp_path_factory):
    """Debian's two conf.d directories, copied; the translation of the copy
    (with $mydomain given, as /etc/mailname is what a host says), and the
    effective config `check-config` prints for it."""
    missing = [str(d) for d in DEBIAN if not d.is_dir()]
    if missing:
        pytest.skip(f"Debian's amavisd-new is not installed ({', '.join(missing)})")
    tmp = tmp_path_factory.mktemp("debian")
    share, etc = tmp / "share-conf.d", tmp / "etc-conf.d"
    shutil.copytree(DEBIAN[0], share)
    shutil.copytree(DEBIAN[1], etc)
    proc = amavisd("import-config", "-D", "mydomain=example.com", str(share), str(etc))
    assert proc.returncode == 0, proc.stderr
    out = tmp / "imported.toml"
    out.write_text(proc.stdout)
    check = amavisd("check-config", "-c", str(out))
    assert check.returncode == 0, check.stderr
    effective = tomllib.loads(check.stdout)
    return {"tmp": tmp, "share": share, "etc": etc, "text": proc.stdout, "file": out,
            "doc": tomllib.loads(proc.stdout), "effective": effective}


def test_debians_files_load_and_say_what_debian_says(debian):
    e = debian["effective"]
    assert (e["daemon"]["workdir"], e["daemon"]["tempbase"]) == \
        ("/var/lib/amavis", "/var/lib/amavis/tmp")
    assert (e["daemon"]["user"], e["daemon"]["group"]) == ("amavis", "amavis")
    assert e["daemon"]["socket"] == "/var/lib/amavis/amavisd.sock"
    assert e["daemon"]["pidfile"] == "/var/run/amavis/amavisd.pid"
    assert e["daemon"]["interface_policy"] == ["SOCK=AM.PDP-SOCK"]
    assert e["log"]["log_to"] == ["syslog"]
    assert (e["log"]["syslog_ident"], e["log"]["syslog_facility"]) == ("amavis", "mail")
    assert e["scan"]["clamd"] == "unix:/var/run/clamav/clamd.ctl"
    assert (e["scan"]["primary_scanners"], e["scan"]["backup_scanners"]) == \
        (["clamd"], ["clamscan"])
    assert (e["decode"]["max_depth"], e["decode"]["max_parts"]) == (14, 1500)
    assert (e["policy"]["virus_destiny"], e["policy"]["banned_destiny"]) == \
        ("discard", "discard")
    assert e["policy"]["unchecked_destiny"] == "reject"  # amavisd's, not 2.13's D_PASS
    assert e["policy"]["quarantine_dir"] == "/var/lib/amavis/virusmails"
    assert e["policy"]["banned_rules"] == DEBIAN_RULES
    assert e["notify"]["local_domains"] == [".example.com"]
    assert e["notify"]["admin"] == "postmaster@example.com"
    assert e["headers"]["x_header_line"] == "Debian amavis at example.com"
    assert e["smtp"]["smtp_listen"] == ["127.0.0.1:10024"]
    assert debian["doc"]["policy_banks"] == {"AM.PDP-SOCK": {}}


def test_what_debian_sets_and_amavisd_has_not_is_listed_with_file_and_line(debian):
    text, share, etc = debian["text"], debian["share"], debian["etc"]
    for place, words in [
        (f"{share}/20-package:8", "@bypass_virus_checks_maps: virus checks are off for every "
                                  "recipient"),
        (f"{etc}/20-debian_defaults:35", "$sa_spam_subject_tag: no spam checks"),
        (f"{etc}/20-debian_defaults:70", "$final_spam_destiny: no spam checks"),
        (f"{etc}/25-amavis_helpers:18", "$auth_required_release (policy bank AM.PDP-SOCK)"),
        (f"{etc}/30-template_localization:40", "read_l10n_templates(...)"),
        (f"{etc}/15-av_scanners:96", "@av_scanners: 'KasperskyLab AntiViral Toolkit Pro "
                                     "(AVP)': none of its programs (avp) is installed here"),
    ]:
        assert f"# not translated: {place}: {words}" in text, place


def test_without_mailname_the_settings_built_on_it_are_reported_not_guessed(debian, tmp_path):
    etc = tmp_path / "etc-conf.d"
    shutil.copytree(debian["etc"], etc)
    domain_id = etc / "05-domain_id"
    domain_id.write_text(domain_id.read_text().replace("/etc/mailname",
                                                       str(tmp_path / "no-mailname")))
    proc = amavisd("import-config", str(debian["share"]), str(etc))
    assert proc.returncode == 0, proc.stderr
    doc = tomllib.loads(proc.stdout)
    assert "local_domains" not in doc.get("notify", {}) and "admin" not in doc.get("notify", {})
    assert f"# not translated: {etc}/20-debian_defaults:75: $virus_admin: `head -n 1 " \
           f"{tmp_path}/no-mailname`: {tmp_path}/no-mailname cannot be read here" in proc.stdout


def test_the_imported_debian_config_checks_mail_with_a_real_clamd(debian, clamd_nodecomp,
                                                                  tmp_path):
    """The translated rules and destinies at work: EICAR is INFECTED, a double
    extension is BANNED by Debian's own first rule, clean mail is clean."""
    text = debian["text"].replace("/var/lib/amavis", str(tmp_path / "amavis"))
    text = text.replace("/var/run/amavis", str(tmp_path / "run"))
    config = tmp_path / "imported.toml"
    config.write_text(text)
    (tmp_path / "amavis" / "virusmails").mkdir(parents=True, mode=0o700)  # as the package does
    messages = {"eicar": eicar_message(), "clean": clean_message(),
                "banned": as_attachment(b"%PDF-1.4 nothing to run\n", "invoice.pdf.exe")}
    paths = []
    for name, data in messages.items():
        (tmp_path / f"{name}.eml").write_bytes(data)
        paths.append(str(tmp_path / f"{name}.eml"))
    proc = amavisd("scan", "-c", str(config), "--json", "--clamd", clamd_nodecomp.address,
                   *paths)
    records = {Path(r["path"]).stem: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(records) == set(messages), proc.stderr[-2000:]
    assert records["eicar"]["verdict"] == "INFECTED", proc.stderr[-3000:]
    assert records["eicar"]["destiny"] == "discard"
    assert records["clean"]["verdict"] == "CLEAN"
    assert records["banned"]["verdict"] == "BANNED"
    assert records["banned"]["banned_rules"][0]["rule"] == DEBIAN_RULES[0]
