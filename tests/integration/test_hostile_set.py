"""Issue 10's acceptance: `amavisd scan` on a set of hostile mails, each
hiding EICAR where only a decoder that fails open would miss it, never says
CLEAN; and the real-mail corpus keeps its verdicts (no false UNCHECKED)."""

from __future__ import annotations

import collections
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing.eicar import EICAR
from amavisd.verdict import Destiny
from tests import hostile_mail

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def verdicts(clamd_nodecomp, tmp_path_factory):
    """Every hostile mail through `amavisd scan --json`, in one run."""
    tmp = tmp_path_factory.mktemp("hostile")
    made = hostile_mail.build_all(tmp)
    config = tmp / "amavisd.toml"
    config.write_text(f'[policy]\nquarantine_dir = "{tmp / "quarantine"}"\n'
                      f'[scan]\nbackup_scanners = []\n')
    proc = subprocess.run(
        [sys.executable, "-m", "amavisd", "scan", "-c", str(config), "--json", "--clamd",
         clamd_nodecomp.address, *map(str, made.values())],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    by_path = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        by_path[record["path"]] = record
    assert len(by_path) == len(made), proc.stderr[-3000:]
    return {name: by_path[str(path)] for name, path in made.items()}


@pytest.mark.parametrize("name", sorted(hostile_mail.BUILDERS))
def test_a_hostile_mail_is_never_clean(verdicts, name):
    if hostile_mail.missing_tools(name):
        pytest.skip(f"{', '.join(hostile_mail.missing_tools(name))} not installed")
    record = verdicts[name]
    summary = (record["verdict"], record["viruses"], record["unchecked"], record["tempfail"])
    if hostile_mail.EXPECT[name] == "INFECTED":
        assert record["verdict"] == "INFECTED", summary
    else:
        assert record["verdict"] in ("INFECTED", "UNCHECKED"), summary


# The real-mail corpus, before issue 10: 1,429 messages, 3 UNCHECKED (an encrypted
# Office file, an encrypted zip member, a genuine message/partial).
CORPUS_UNCHECKED = {"encrypted": 2, "partial": 1}


def test_the_real_mail_corpus_gets_no_new_unchecked_verdicts(corpus):
    files = sorted(p for p in (corpus / "mail" / "real").rglob("*") if p.is_file())
    if not files:
        pytest.skip("no real mail in the corpus")
    kinds: collections.Counter = collections.Counter()
    for path in files:
        dec = decompose(path.read_bytes(), Limits())
        kinds.update({r.kind for r in dec.unchecked})
        dec.cleanup()
    assert dict(kinds) == CORPUS_UNCHECKED


def test_a_full_work_base_is_a_tempfail_and_with_room_the_virus_is_found(
        clamd_nodecomp, small_tmpfs, tmp_path):
    """Item 4: a large part spilled to a full disk used to end CLEAN."""
    big = os.urandom(3 * 1024 * 1024) + EICAR
    raw = hostile_mail.attach(gzip.compress(big, 1), "big.gz")
    path = tmp_path / "big.eml"
    path.write_bytes(raw)
    values = {"clamd": clamd_nodecomp.address, "backup_scanners": [],
              "quarantine_dir": str(tmp_path / "q"), "max_memory": 64 * 1024,
              "workdir": str(tmp_path / "home")}
    job = Job(log_id="t-1", mail_path=str(path))
    full = Pipeline(configuration.load(None, values | {"work_base": small_tmpfs}))
    result = full.process(job)
    assert result.destiny is Destiny.TEMPFAIL and "No space left" in result.tempfail_reason
    roomy = tmp_path / "work"
    roomy.mkdir(mode=0o700)
    assert Pipeline(configuration.load(None, values | {"work_base": str(roomy)})) \
        .process(job).verdict == "INFECTED"


def test_a_message_over_max_message_size_is_unchecked_unread(clamd_nodecomp, tmp_path):
    """Also without the daemon (amavisd scan): refused before reading, never CLEAN."""
    path = tmp_path / "big.eml"
    path.write_bytes(hostile_mail.eicar_mail() + b"x" * 4096)
    values = {"clamd": clamd_nodecomp.address, "backup_scanners": [],
              "quarantine_dir": str(tmp_path / "q"), "max_message_size": 1024}
    result = Pipeline(configuration.load(None, values)).process(
        Job(log_id="t-1", mail_path=str(path)))
    assert result.verdict == "UNCHECKED" and result.destiny is Destiny.REJECT
    assert [r.kind for r in result.unchecked] == ["limit"]
    assert result.size == path.stat().st_size and result.tree is None
