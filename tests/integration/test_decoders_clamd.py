"""Every mail encoding, with EICAR (or clam.exe) at the bottom, found by a real
clamd that decodes nothing itself (ScanMail/ScanArchive/ScanOLE2/ScanPDF off):
each detection is our decoder's doing. Plus the corpus acceptance runs.
"""

from __future__ import annotations

import base64
import gzip
import os
import quopri
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing.eicar import CLAM_EXE_PATH, EICAR
from amavisd.testing.messages import forwarded_eicar_message

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline(clamd_nodecomp):
    return Pipeline(configuration.load(None, {"clamd": clamd_nodecomp.address}))


def scan(pipeline, raw: bytes, tmp_path: Path):
    path = tmp_path / "msg.eml"
    path.write_bytes(raw)
    return pipeline.process(Job(log_id="t-01", mail_path=str(path)))


def mime(body_headers: str, body: bytes, text: str = "See attached.") -> bytes:
    return (b"From: a@example.test\nTo: b@example.test\nSubject: t\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="=_b"\n\n--=_b\nContent-Type: text/plain\n\n'
            + text.encode() + b"\n--=_b\n" + body_headers.encode() + b"\n\n" + body
            + b"\n--=_b--\n")


def test_clamd_really_does_not_decode(clamd_nodecomp):
    assert "FOUND" in clamd_nodecomp.scan_bytes(EICAR)
    assert "OK" in clamd_nodecomp.scan_bytes(mime(
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
        base64.encodebytes(EICAR)))


def test_base64_attachment(pipeline, tmp_path):
    result = scan(pipeline, mime("Content-Type: application/octet-stream; name=e.com\n"
                                 "Content-Transfer-Encoding: base64",
                                 base64.encodebytes(EICAR)), tmp_path)
    assert result.verdict == "INFECTED"
    assert result.findings[0].part == "p001/p002/p004"


def test_quoted_printable_attachment(pipeline, tmp_path):
    result = scan(pipeline, mime("Content-Type: text/plain\n"
                                 "Content-Transfer-Encoding: quoted-printable",
                                 quopri.encodestring(EICAR.replace(b"!", b"=") + b"\n"
                                                     ).replace(b"=3D", b"=21")), tmp_path)
    assert result.verdict == "INFECTED"


def test_x_uuencode_transfer_encoding(pipeline, tmp_path):
    body = b"begin 644 e.com\n" + b"".join(
        __import__("binascii").b2a_uu(EICAR[i:i + 45]) for i in range(0, 68, 45)) + b"`\nend\n"
    result = scan(pipeline, mime("Content-Type: application/octet-stream\n"
                                 "Content-Transfer-Encoding: x-uuencode", body), tmp_path)
    assert result.verdict == "INFECTED"


@pytest.mark.skipif(not shutil.which("uuencode"), reason="sharutils not installed")
def test_uuencode_pasted_in_a_text_body(pipeline, tmp_path):
    (tmp_path / "e.com").write_bytes(EICAR)
    block = subprocess.run(["uuencode", str(tmp_path / "e.com"), "e.com"], capture_output=True,
                           check=True).stdout
    raw = b"From: a@example.test\nSubject: uu\n\nHi,\n\n" + block + b"\nbye\n"
    result = scan(pipeline, raw, tmp_path)
    assert result.verdict == "INFECTED"
    (part,) = [p for p in result.parts if p.name == "e.com"]
    assert part.read() == EICAR


def binhexed(tmp_path: Path, data: bytes, name: str) -> bytes:
    if not shutil.which("binhex"):
        pytest.skip("macutils not installed")
    (tmp_path / name).write_bytes(data)
    return subprocess.run(["binhex", "-d", name], cwd=tmp_path, capture_output=True,
                          check=True).stdout


def test_binhex_attachment_and_pasted_in_text(pipeline, tmp_path):
    hqx = binhexed(tmp_path, EICAR, "e.com")
    as_attachment = mime("Content-Type: application/mac-binhex40; name=e.hqx", hqx)
    assert scan(pipeline, as_attachment, tmp_path).verdict == "INFECTED"
    pasted = b"From: a@example.test\nSubject: hqx\n\nThe file:\n\n" + hqx + b"\nregards\n"
    result = scan(pipeline, pasted, tmp_path)
    assert result.verdict == "INFECTED"
    assert any(p.name == "e.com" and p.read() == EICAR for p in result.parts)


def test_tnef_winmail_dat(pipeline, tmp_path, corpus):
    sample = corpus / "archives" / "tnef" / "clamav__clam.tnef"
    if not sample.exists() or not os.path.exists(CLAM_EXE_PATH):
        pytest.skip("needs the corpus TNEF sample and clamav-testfiles")
    raw = mime("Content-Type: application/ms-tnef; name=winmail.dat\n"
               "Content-Transfer-Encoding: base64", base64.encodebytes(sample.read_bytes()))
    result = scan(pipeline, raw, tmp_path)
    assert result.verdict == "INFECTED"
    assert "ClamAV-Test-File" in result.viruses[0]


def test_forwarded_message_and_gzip_in_disguise(pipeline, tmp_path):
    assert scan(pipeline, forwarded_eicar_message(), tmp_path).verdict == "INFECTED"
    disguised = mime("Content-Type: image/jpeg; name=holiday.jpg\n"
                     "Content-Transfer-Encoding: base64", base64.encodebytes(gzip.compress(EICAR)))
    assert scan(pipeline, disguised, tmp_path).verdict == "INFECTED"


def test_too_deep_is_unchecked_not_clean(pipeline, tmp_path):
    from tests.unit.test_decode_engine import forward_nest

    result = scan(pipeline, forward_nest(25, EICAR), tmp_path)
    assert result.verdict == "UNCHECKED"
    assert "nested deeper than 20 levels" in result.summary()
    assert result.destiny.value == "reject"


def test_testvirus_corpus_is_all_infected(pipeline, tmp_path, corpus):
    folder = corpus / "mail" / "testvirus"
    files = sorted(folder.glob("*.eml"))
    assert files, f"no messages in {folder}"
    verdicts = {f.name: pipeline.process(Job(log_id="tv", mail_path=str(f))) for f in files}
    missed = {name: r.summary() for name, r in verdicts.items() if r.verdict != "INFECTED"}
    assert missed == {}


def test_real_corpus_decomposes_and_nothing_is_infected(pipeline, corpus):
    files = sorted(p for p in (corpus / "mail" / "real").rglob("*") if p.is_file())
    assert len(files) >= 1400
    started = time.monotonic()
    infected, tempfailed, unchecked = [], [], []
    for path in files:
        result = pipeline.process(Job(log_id="real", mail_path=str(path)))
        if result.verdict == "INFECTED":
            infected.append((path.name, result.viruses))
        elif result.verdict == "TEMPFAIL":
            tempfailed.append((path.name, result.tempfail_reason))
        elif result.verdict == "UNCHECKED":
            unchecked.append((path.name, result.unchecked))
    elapsed = time.monotonic() - started
    print(f"\n{len(files)} real messages scanned in {elapsed:.1f}s; unchecked: {unchecked}")
    assert infected == [] and tempfailed == []
    assert len(unchecked) <= 3  # message/partial fragments and the like, each with a reason
    assert elapsed < 120


def test_scan_tree_shows_where(clamd_nodecomp, tmp_path):
    path = tmp_path / "fwd.eml"
    path.write_bytes(forwarded_eicar_message())
    proc = subprocess.run([sys.executable, "-m", "amavisd", "scan", "--clamd",
                           clamd_nodecomp.address, "--tree", str(path)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 1
    marked = [line for line in proc.stdout.splitlines() if "<-- Eicar-Test-Signature" in line]
    assert len(marked) == 1 and "'eicar.com'" in marked[0]
    assert marked[0].startswith("      ")  # indented: found two layers down
