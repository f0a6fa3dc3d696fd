# SPDX-License-Identifier: MIT
"""The soak's messages: real corpus mail mixed with generated clean, infected and banned.

Each message gets its own Message-ID, `<soak-N@soak.test>` (calibration sends
`<cal-N@soak.test>`), put first in its header block in place of any it had, so
the sink and the quarantine can be counted by it. Messages are built when sent,
never held all at once: 20,000 would cost the sender the memory we measure.

What a generated message must become is known (clean: delivered; EICAR, plain
or zipped: rejected INFECTED; an `.exe` name: rejected BANNED). What a real
one must become is what it became in calibration, sent once with no fault:
a kill must never change a verdict.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.rigs.smtptalk import banned, clean, crlf, eicar, eicar_zipped

__all__ = ["Mix", "Planned", "EXPECTED", "PATTERN"]

# One in ten of each kind per ten messages; "real" becomes "clean" without a corpus.
PATTERN = ("real", "clean", "real", "eicar", "real", "banned", "real", "clean", "real",
           "eicar-zip")
MAKERS: dict[str, Callable[[str], bytes]] = {
    "clean": clean, "eicar": eicar, "eicar-zip": eicar_zipped, "banned": banned}
EXPECTED = {"clean": "delivered", "eicar": "rejected:INFECTED",
            "eicar-zip": "rejected:INFECTED", "banned": "rejected:BANNED"}
# A Message-ID header, folded continuation lines included (header block only).
_MID_FIELD = re.compile(rb"(?im)^Message-ID[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*")


@dataclass(frozen=True)
class Planned:
    mid: str  # the Message-ID we gave it, without <>
    kind: str  # real, clean, eicar, eicar-zip, banned
    source: str  # the corpus path of a real one, else the kind


def with_id(data: bytes, mid: str) -> bytes:
    """`data` (CRLF) with `mid` as its only top-level Message-ID."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:  # no body: all of it is header
        head, body = data, b""
    head = _MID_FIELD.sub(b"", head + b"\r\n")
    return f"Message-ID: <{mid}>\r\n".encode() + head + (b"\r\n" + body if sep else b"")


def corpus_files(corpus: Path | None) -> list[Path]:
    """The real mail of the corpus, in a fixed shuffled order (a short run
    still sees every source of the corpus, not one directory)."""
    if corpus is None or not (corpus / "mail" / "real").is_dir():
        return []
    files = sorted(p for p in (corpus / "mail" / "real").rglob("*") if p.is_file())
    random.Random(17).shuffle(files)
    return files


class Mix:
    """Message `n` of the run: its plan and its bytes."""

    def __init__(self, corpus: Path | None, count: int):
        files = corpus_files(corpus)
        self.plan: list[Planned] = []
        reals = 0
        for n in range(count):
            kind = PATTERN[n % len(PATTERN)]
            if kind == "real" and not files:
                kind = "clean"
            if kind == "real":
                source = str(files[reals % len(files)])
                reals += 1
            else:
                source = kind
            self.plan.append(Planned(f"soak-{n}@soak.test", kind, source))
        self._bytes: dict[str, bytes] = {}

    @property
    def real_sources(self) -> list[str]:
        """Each corpus file the run sends, once, in order."""
        return list(dict.fromkeys(p.source for p in self.plan if p.kind == "real"))

    def source_bytes(self, source: str) -> bytes:
        if source not in self._bytes:  # a race only reads a file twice
            self._bytes[source] = crlf(Path(source).read_bytes())
        return self._bytes[source]

    def build(self, planned: Planned) -> bytes:
        if planned.kind == "real":
            return with_id(self.source_bytes(planned.source), planned.mid)
        return with_id(MAKERS[planned.kind](planned.mid.split("@")[0]), planned.mid)

    def calibration(self) -> list[Planned]:
        """Each corpus file once, under a Message-ID of its own."""
        return [Planned(f"cal-{i}@soak.test", "real", source)
                for i, source in enumerate(self.real_sources)]
