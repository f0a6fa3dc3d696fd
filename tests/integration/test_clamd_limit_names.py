"""Found by a hostile review: clamd's "gave up at a limit" name was matched by
its prefix, so any signature whose name starts with it -- a third-party
database's, which clamd reports with `.UNOFFICIAL` appended -- is taken
for a part clamd did not read (UNCHECKED: passed where unchecked_destiny
is pass) instead of the virus it found. A real clamd with a real
signature of such a name; the official names are
`Heuristics.Limits.Exceeded.Max<limit>` (before ClamAV 0.103 the bare
prefix), which still mean "missed" (tests/integration/test_scanners.py).
"""

from __future__ import annotations

import base64

import pytest

from amavisd import config as configuration
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing import clamd as clamd_testing

MARKER = b"H5-REVIEW-THIRD-PARTY-SIGNATURE-MARKER"


@pytest.mark.parametrize("by", ["clamd", "clamscan"])
def test_a_third_party_signature_named_like_a_limit_is_a_virus(short_tmp, tmp_path, by):
    """By clamd, and by the backup clamscan (clamd down) whose default
    `unchecked_names` is the same prefix (amavisd/scan/definitions.py)."""
    if clamd_testing.skip_reason():
        pytest.skip(clamd_testing.skip_reason())
    extra = short_tmp / "extra"
    extra.mkdir()
    (extra / "thirdparty.ndb").write_text(
        f"Heuristics.Limits.Exceeded.Dropper:0:*:{MARKER.hex()}\n", encoding="ascii")
    raw = (b"From: a@example.test\nTo: b@example.test\nSubject: x\nMIME-Version: 1.0\n"
           b"Content-Type: application/octet-stream; name=x.bin\n"
           b"Content-Transfer-Encoding: base64\n\n"
           + base64.encodebytes(b"padding " + MARKER + b" padding"))
    (tmp_path / "m.eml").write_bytes(raw)
    with clamd_testing.ClamdInstance(short_tmp / "c", system_db=str(extra)) as clamd:
        assert "Heuristics.Limits.Exceeded.Dropper.UNOFFICIAL FOUND" in \
            clamd.scan_bytes(MARKER)  # what clamd itself says
        if by == "clamscan":
            clamd.stop()
        pipeline = Pipeline(configuration.load(None, {
            "clamd": clamd.address, "scanners": {"clamscan": clamd.clamscan_table()},
            "scanner_retry_after": 0.0, "unchecked_destiny": "pass"}))
        result = pipeline.process(Job(log_id="t", mail_path=str(tmp_path / "m.eml")))
    assert result.scanned_by == [by]
    assert result.verdict == "INFECTED", result.summary()
    assert [f.name for f in result.findings] == ["Heuristics.Limits.Exceeded.Dropper.UNOFFICIAL"]
