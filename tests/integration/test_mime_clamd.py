"""MIME limits through the whole pipeline, with a real clamd that decodes
nothing itself: EICAR at the bottom of a nest too deep to open makes the
message UNCHECKED (kind limit, rejected by default), never CLEAN; EICAR
that the stdlib parser dropped is found.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing.eicar import EICAR
from tests.unit.test_decode_engine import forward_nest
from tests.unit.test_mime_limits import multipart_nest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(clamd_nodecomp):
    return Pipeline(configuration.load(None, {"clamd": clamd_nodecomp.address}))


def scan(pipeline, raw: bytes, tmp_path: Path):
    path = tmp_path / "msg.eml"
    path.write_bytes(raw)
    return pipeline.process(Job(log_id="t-01", mail_path=str(path)))


@pytest.mark.parametrize("nest", [
    pytest.param(lambda: forward_nest(250, EICAR), id="250 message/rfc822"),
    pytest.param(lambda: forward_nest(2000, EICAR), id="2000 message/rfc822"),
    pytest.param(lambda: multipart_nest(1000), id="1000 multiparts"),
    pytest.param(lambda: multipart_nest(100_000), id="100000 multiparts"),
])
def test_eicar_below_a_nest_too_deep_is_unchecked_never_clean(pipeline, tmp_path, nest):
    result = scan(pipeline, nest(), tmp_path)
    assert result.verdict == "UNCHECKED", result.summary()
    assert result.unchecked and {r.kind for r in result.unchecked} == {"limit"}
    assert "nested deeper than" in result.summary()
    assert result.destiny.value == "reject"


def test_eicar_after_an_early_close_delimiter_is_found(pipeline, tmp_path):
    raw = (b'Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n\n'
           b"--B--\n--B\nContent-Type: application/octet-stream\n"
           b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(EICAR) + b"--B--\n")
    assert scan(pipeline, raw, tmp_path).verdict == "INFECTED"
