"""`make check`: the seed's self-test. Sample messages with EICAR hidden in them
are scanned by the real pipeline against a private clamd that does not decode
anything itself (ScanMail/ScanArchive off), so each hit proves our decoding.
Prints a line per sample; exits non-zero if any verdict is wrong.

The last sample is EICAR, base64-attached, inside a nest of archive formats
made by the real archivers (amavisd.testing.archivers); a format whose tool is
missing is left out of the nest, and said so.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from amavisd import config as configuration
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing import archivers, messages
from amavisd.testing.clamd import ClamdInstance, skip_reason
from amavisd.testing.eicar import EICAR

SAMPLES = {
    "clean text": (messages.clean_message(), "CLEAN"),
    "EICAR base64 attachment": (messages.eicar_message(), "INFECTED"),
    "EICAR in a forwarded message/rfc822": (messages.forwarded_eicar_message(), "INFECTED"),
}
# Innermost first: the mail carries a .zst holding an ar holding a .Z ... down to a zip.
NEST = ["zip", "7z", "tar", "gz", "cab", "arj", "cpio", "bz2", "lha", "xz", "arc", "Z", "ar",
        "zst"]


def nested_archive_sample(workdir: Path) -> dict[str, tuple[bytes, str]]:
    """EICAR in as many of NEST as can be made here, as a mail attachment."""
    missing = {fmt: archivers.available(fmt) for fmt in NEST if archivers.available(fmt)}
    for fmt, reason in missing.items():
        print(f"make check: nest without {fmt}: {reason}")
    nest = [fmt for fmt in NEST if fmt not in missing]
    if not nest:
        return {}
    data = archivers.chain(nest, {"eicar.com": EICAR}, workdir)
    name = f"nest.{archivers.EXTENSIONS[nest[-1]]}"
    label = f"EICAR base64 attachment in {len(nest)} nested archives ({' > '.join(reversed(nest))})"
    return {label: (archivers.as_attachment(data, name, subject="nested archives"), "INFECTED")}


def main() -> int:
    if skip_reason():
        print(f"make check: {skip_reason()}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="amchk", dir="/tmp"))
    clamd = ClamdInstance(work / "clamd", mode="nodecomp").start()
    failures = 0
    try:
        pipeline = Pipeline(configuration.load(None, {"clamd": clamd.address}))
        samples = {**SAMPLES, **nested_archive_sample(work)}
        for n, (label, (data, expected)) in enumerate(samples.items(), 1):
            path = work / f"sample{n}.eml"
            path.write_bytes(data)
            result = pipeline.process(Job(log_id=f"check-{n}", mail_path=str(path)))
            ok = result.verdict == expected
            failures += not ok
            print(f"{'ok ' if ok else 'BAD'} {label}: {result.summary()}")
    finally:
        clamd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
