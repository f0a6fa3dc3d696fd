"""The seeded message set of `make bench`, and messages shaped for the memory ladder.

Every benchmark row must see the same bytes, and a re-run next month must
see them again: the synthetic kinds are made from a fixed seed with the real
archivers (`amavisd.testing.archivers`), never stored (EICAR is built at run
time), and the real-mail corpus is sampled by position, not at random.
"""

from __future__ import annotations

import base64
import os
import random
from pathlib import Path

from ampdp_throughput import Message, _attachment, _mail, corpus_messages

from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message
from tests.rigs.daemon import ROOT

CORPUS = Path(os.environ.get("AMAVISD_CORPUS", Path(ROOT).parent / "shared" / "corpus"))
SEED = 16
WORDS = "mail scanner virus quota header archive message policy worker relay".split()


def _text(rng: random.Random, size: int) -> str:
    """About `size` bytes of 72-column prose."""
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(10))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def synthetic(workdir: Path) -> tuple[list[Message], list[str]]:
    """The six kinds of issue 16 (plain 2 KB, HTML 20 KB, 100 KB attachment, zip of
    five files, zip in tar.gz, EICAR in a zip); the kinds the archivers here cannot
    make are named in the second list instead."""
    rng = random.Random(SEED)
    plain = _text(rng, 2000)
    html = "<html><body>" + "".join(
        f"<p>{line}</p>\n" for line in _text(rng, 19000).splitlines()) + "</body></html>\n"
    messages = [
        Message("gen/plain-2k", clean_message("plain", plain)),
        Message("gen/html-20k", _mail("html", "text/html; charset=us-ascii", html)),
        Message("gen/attachment-100k", _attachment(
            "attachment", b"%PDF-1.4\n" + rng.randbytes(100 * 1024), "report.pdf",
            "application/pdf")),
    ]
    missing = []
    five = archivers.mixed_files(count=5, total=50 * 1024, seed=SEED)
    archives = {
        "gen/zip-of-5": lambda: archivers.build("zip", five, workdir),
        "gen/zip-in-tgz": lambda: archivers.chain(["zip", "tgz"], five, workdir),
        "gen/eicar-in-zip": lambda: archivers.build("zip", {"eicar.com": EICAR}, workdir),
    }
    suffix = {"gen/zip-in-tgz": ("files.tar.gz", "application/gzip")}
    for name, make in archives.items():
        reason = archivers.available("zip") or (
            archivers.available("tgz") if "tgz" in name else None)
        if reason:
            missing.append(f"{name}: {reason}")
            continue
        filename, mime = suffix.get(name, ("files.zip", "application/zip"))
        messages.append(Message(name, _attachment(name.split("/")[1], make(), filename, mime)))
    return messages, missing


def real(sample: int | None) -> list[Message]:
    """`sample` messages spread over the shared corpus's mail/real/ (all if None);
    none when the corpus is absent."""
    folder = CORPUS / "mail" / "real"
    return corpus_messages([folder], sample) if folder.is_dir() else []


# -- the memory and cost ladder ---------------------------------------------------


def sized_attachment(size: int, seed: int = SEED) -> bytes:
    """One base64 attachment of `size` random bytes: the 50 MB attachment case."""
    data = random.Random(seed).randbytes(size)
    return _attachment(f"bin-{size}", data, "blob.bin", "application/octet-stream")


def sized_text(size: int) -> bytes:
    """`size` bytes of short (20-column) text lines in one text/plain body: the
    64 MB-of-short-lines case that once cost 1 GB."""
    line = "short line of text\n"
    return clean_message(f"text-{size}", line * max(1, size // len(line)))


def many_parts(count: int, seed: int = SEED) -> bytes:
    """multipart/mixed with `count` small attachments (1 KiB random each)."""
    rng = random.Random(seed)
    body = []
    for n in range(count):
        payload = base64.encodebytes(rng.randbytes(1024)).decode()
        body.append(f'--=_p\nContent-Type: application/octet-stream; name="p{n}.bin"\n'
                    f"Content-Transfer-Encoding: base64\n\n{payload}")
    return _mail(f"parts-{count}", 'multipart/mixed; boundary="=_p"',
                 "".join(body) + "--=_p--\n")
