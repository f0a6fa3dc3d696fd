"""cProfile our milter through bench/milter_throughput.py (H1, session 25).

Runs the `baseline` row from `--baseline DIR` under cProfile; the stats go
to $H1_PROF (default /tmp/h1-cprof/milter.prof, a dir the milter's user may
write) when the milter exits. Function call counts a message come from
`pstats` on that file divided by -n.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import milter_throughput as bench  # noqa: E402

OUT = os.environ.get("H1_PROF", "/tmp/h1-cprof/milter.prof")


def argv(self) -> list[str]:
    argv = bench.MilterInstance.argv(self)
    return [argv[0], "-c", "import sys, runpy, cProfile, atexit; "
            f"sys.path.insert(0, {self.root!r}); p = cProfile.Profile(); "
            f"atexit.register(lambda: (p.disable(), p.dump_stats({OUT!r}))); p.enable(); "
            "runpy.run_module('amavisd_client.milter.main', run_name='__main__')", *argv[3:]]


bench.MilterFrom.argv = argv
sys.exit(bench.main())
