"""`make check`: the seed's self-test. Sample messages with EICAR hidden in them
are scanned by the real pipeline against a private clamd that does not decode
anything itself (ScanMail/ScanArchive off), so each hit proves our decoding.
Prints a line per sample; exits non-zero if any verdict is wrong.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from amavisd import config as configuration
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.testing import messages
from amavisd.testing.clamd import ClamdInstance, skip_reason

SAMPLES = {
    "clean text": (messages.clean_message(), "CLEAN"),
    "EICAR base64 attachment": (messages.eicar_message(), "INFECTED"),
    "EICAR in a forwarded message/rfc822": (messages.forwarded_eicar_message(), "INFECTED"),
}


def main() -> int:
    if skip_reason():
        print(f"make check: {skip_reason()}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="amchk", dir="/tmp"))
    clamd = ClamdInstance(work / "clamd", mode="nodecomp").start()
    failures = 0
    try:
        pipeline = Pipeline(configuration.load(None, {"clamd": clamd.address}))
        for n, (label, (data, expected)) in enumerate(SAMPLES.items(), 1):
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
