"""Coverage-guided fuzzing with atheris (libFuzzer) of the readers where
hypothesis' blind mutation finds the shallow paths only: the MIME splitter
with the transfer decoders, the zip reader, TNEF, and any bare file.

    .venv/bin/python -m tests.fuzz.coverage_guided mime -max_total_time=300

Seeds come from the shared corpus; the evolving corpus and any crash file go
under var/fuzz-atheris/<target>/. Each input gets harness' checks, less the
SIGALRM (libFuzzer owns that signal: -timeout, default 40 s here, is the hang
bound) and with libFuzzer's -rss_limit_mb (2048) as the memory bound.
atheris is optional (`pip install atheris`, the `fuzz` extra): without it
this says so and exits 2.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# target -> (corpus folders of seeds, whether an input is a whole message)
TARGETS = {
    "mime": (["../mail/real", "../mail/testvirus", "uuencode", "binhex"], False),
    "zip": (["zip"], True),
    "tnef": (["tnef"], True),
    "bare": (["zip", "tar", "7z", "cpio", "iso", "ole2-office", "rpm", "gzip", "xz"], True),
}
MAX_SEEDS = 300


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]", file=sys.stderr)
        return 2
    try:
        import atheris
    except ImportError:
        print("atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["amavisd"]):
        from tests.fuzz import harness
    name, (folders, bare) = argv[1], TARGETS[argv[1]]
    work = Path("var/fuzz-atheris") / name
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        seeds = [p for f in folders if (harness.ARCHIVES / f).is_dir()
                 for p in sorted((harness.ARCHIVES / f).rglob("*"))
                 if p.is_file() and p.stat().st_size <= harness.MAX_SEED]
        for n, seed in enumerate(seeds[:MAX_SEEDS]):
            shutil.copyfile(seed, corpus / f"seed{n:04d}")

    def one_input(data: bytes) -> None:
        harness.run_checks(data, bare)

    flags = list(argv[2:])
    defaults = {"-timeout=": "40", "-rss_limit_mb=": "2048",
                "-artifact_prefix=": f"{work}{os.sep}"}
    flags += [k + v for k, v in defaults.items() if not any(f.startswith(k) for f in flags)]
    atheris.Setup([argv[0], *flags, str(corpus)], one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
