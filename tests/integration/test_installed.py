"""`pip install .` into a fresh venv outside the checkout: what a site gets.

The wheel is built from a copy of the sources (the build leaves nothing in the
checkout) and installed with no network and no index: the dependencies are
the ones already in this venv, seen through a .pth line pointing at a
directory of links to them (amavisd's own editable install left out). Then the
installed `amavisd`, run from a directory outside the checkout with no
PYTHONPATH, must write the sample config, scan a message with a real clamd and
render the shipped notification templates (package data), and must not carry
the test rigs that need root, Debian's amavisd-new or the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message

REPO = Path(__file__).resolve().parents[2]
# What amavisd.testing keeps: what `make check` and a site's own tests use.
SHIPPED_TESTING = {"__init__.py", "archivers.py", "clamd.py", "eicar.py", "messages.py"}
# Rigs that need root, amavisd-new or the checkout, or that only tests use.
RIGS = ("amavisd_new", "daemon", "faults", "sealed", "codec_messages", "smtpsink")

RENDER = """
import json
from amavisd.actions import notify
templates = notify.Templates()
templates.check_all()
values = {name: f"<{name}>" for name in notify.PLACEHOLDERS}
names = sorted(set(notify.TEMPLATES.values()) | set(notify.ROLE_TEMPLATES.values()))
print(json.dumps({"shipped": str(notify.SHIPPED_TEMPLATES),
                  "rendered": {n: templates.get(n).render(values) for n in names}}))
"""

PROBE = """
import importlib.util, json, amavisd
found = {}
for name in %r:
    try:
        found[name] = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found[name] = False
print(json.dumps({"amavisd": amavisd.__file__, "found": found}))
"""


def _dependency_links(dest: Path) -> Path:
    """A directory of links to this venv's installed packages, amavisd's
    editable install excepted, so the new venv resolves nothing from here."""
    links = dest / "deps"
    links.mkdir()
    paths = sysconfig.get_paths()
    for site in dict.fromkeys((paths["purelib"], paths["platlib"])):
        for entry in Path(site).iterdir():
            name = entry.name
            if (name.startswith(("__editable__", "amavisd-", "amavisd_client"))
                    or name.endswith(".pth") or (links / name).exists()):
                continue
            (links / name).symlink_to(entry)
    return links


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "AMAVISD_CONFIG", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def installed():
    """(venv dir, its python, a work dir outside the checkout)."""
    base = Path(tempfile.mkdtemp(prefix="aminst", dir="/tmp"))
    try:
        src = base / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        for package in ("amavisd", "amavisd_client"):
            shutil.copytree(REPO / package, src / package,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        venv = base / "venv"
        interpreter = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        site = subprocess.run([str(python), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "_amavisd_test_deps.pth").write_text(f"{_dependency_links(base)}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
             "--no-build-isolation", "--no-cache-dir", "--disable-pip-version-check", "-q",
             str(src)],
            capture_output=True, text=True, cwd=base, env=_clean_env(), timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        work = base / "work"
        work.mkdir()
        work.chmod(0o755)
        base.chmod(0o755)
        yield venv, python, work
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(argv: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=120, **kw)


def test_the_installed_package_is_the_one_that_runs(installed):
    venv, python, work = installed
    probe = run([str(python), "-c", PROBE % (["tests"],)], work)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)
    assert report["amavisd"].startswith(str(venv)), report
    assert report["found"] == {"tests": False}


def test_check_config_sample_is_the_checkouts(installed):
    venv, _python, work = installed
    got = run([str(venv / "bin" / "amavisd"), "check-config", "--sample"], work)
    want = run([sys.executable, "-m", "amavisd", "check-config", "--sample"], REPO)
    assert got.returncode == 0, got.stderr
    assert "[scan]" in got.stdout
    assert got.stdout == want.stdout


def test_scan_with_a_real_clamd(installed, clamd_nodecomp):
    venv, _python, work = installed
    (work / "virus.eml").write_bytes(eicar_message())
    (work / "clean.eml").write_bytes(clean_message())
    proc = run([str(venv / "bin" / "amavisd"), "scan", "--json", "--clamd",
                clamd_nodecomp.address, "virus.eml", "clean.eml"], work)
    verdicts = {r["path"]: r["verdict"] for r in map(json.loads, proc.stdout.splitlines())}
    assert verdicts == {"virus.eml": "INFECTED", "clean.eml": "CLEAN"}, proc.stderr
    assert proc.returncode == 1  # the worst verdict, as documented


def test_templates_are_package_data(installed):
    venv, python, work = installed
    got = run([str(python), "-c", RENDER], work)
    assert got.returncode == 0, got.stderr
    installed_render = json.loads(got.stdout)
    assert installed_render["shipped"].startswith(str(venv))
    want = run([sys.executable, "-c", RENDER], REPO)
    assert json.loads(want.stdout)["rendered"] == installed_render["rendered"]
    assert "<viruses>" in installed_render["rendered"]["virus-admin.txt"][0]


def test_no_rig_that_needs_root_or_the_checkout_is_installed(installed):
    venv, python, work = installed
    modules = [f"amavisd.testing.{name}" for name in RIGS] + ["tests.rigs"]
    probe = run([str(python), "-c", PROBE % (modules,)], work)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["found"] == dict.fromkeys(modules, False)
    (testing,) = venv.glob("lib/python*/site-packages/amavisd/testing")
    assert {p.name for p in testing.glob("*.py")} == SHIPPED_TESTING
    # what stays still works from the install: make check's own pieces
    check = run([str(python), "-c", "from amavisd.testing import archivers, clamd, messages; "
                 "print(archivers.available('zip'), clamd.CLAMD_PATH)"], work)
    assert check.returncode == 0, check.stderr
