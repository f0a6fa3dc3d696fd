"""Issue 10's acceptance: `amavisd scan` on a set of hostile mails, each
hiding EICAR where only a decoder that fails open would miss it, never says
CLEAN; and the real-mail corpus keeps its verdicts (no false UNCHECKED)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from amavisd.decode.engine import decompose
from amavisd.decode.limits import Limits
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
