"""The milter through Postfix with the daemon's work dir on ext4 and on tmpfs, side by side.

Two daemons on one private clamd, one with its work dir (temp base: the
milter's spool; work base) under /tmp (this VM: ext4), one under /dev/shm
(tmpfs); `milter_throughput.run_row` drives our milter and a fresh Postfix
through each in turn, alternating which goes first, so load that comes and
goes hits both alike. Prints each run's msgs/s and the medians. (Postfix's
own queue stays on disk in both: only the daemon's directories differ.)

    .venv/bin/python bench/milter_tempbase.py [-n 1500] [-s 4] [--runs 6]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import milter_throughput as mt  # noqa: E402

from amavisd.testing.clamd import ClamdInstance  # noqa: E402
from tests.rigs.daemon import DaemonInstance  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1500, help="messages a run")
    ap.add_argument("-s", "--sessions", type=int, default=4, help="smtp-source sessions = workers")
    ap.add_argument("--runs", type=int, default=6, help="runs a side")
    opts = ap.parse_args()
    args = argparse.Namespace(n=opts.n, sessions=opts.sessions, length=4096,
                              workers=opts.sessions, baseline=None, max_use=None,
                              profile=None, warm=None)
    mt.ensure_user(mt.DAEMON_USER, mt.DAEMON_USER)
    bases = {"ext4": Path(tempfile.mkdtemp(prefix="mtb", dir="/tmp")),
             "tmpfs": Path(tempfile.mkdtemp(prefix="mtb", dir="/dev/shm"))}
    clamd_temp = mt.memory_temp_dir("bench-clamd")
    clamd = ClamdInstance(bases["ext4"] / "clamd", mode="nodecomp", temp_dir=clamd_temp).start()
    args.clamd_pid = clamd.pid
    rates: dict[str, list[float]] = {name: [] for name in bases}
    try:
        daemons = {name: DaemonInstance(base / "d", clamd.address, workers=opts.sessions,
                                        user=mt.DAEMON_USER, group=mt.DAEMON_USER,
                                        admin_notify=[], log_to=[])
                   for name, base in bases.items()}
        for base in bases.values():
            base.chmod(0o755)
        for daemon in daemons.values():
            daemon.start()
        try:
            for run in range(opts.runs):
                order = list(daemons.items())
                for name, daemon in order if run % 2 == 0 else order[::-1]:
                    work = bases["ext4"] / f"{name}-{run}"  # Postfix on disk for both
                    work.mkdir()
                    rates[name].append(opts.n / mt.run_row("ours", work, daemon, args))
                    print(f"run {run + 1}, daemon work dir on {name}: "
                          f"{rates[name][-1]:.0f} msgs/s", flush=True)
        finally:
            for daemon in daemons.values():
                daemon.stop()
    finally:
        clamd.stop()
        shutil.rmtree(clamd_temp, ignore_errors=True)
        for base in bases.values():
            shutil.rmtree(base, ignore_errors=True)
    for name, values in rates.items():
        print(f"{name}: median {statistics.median(values):.0f} msgs/s, "
              f"{min(values):.0f}-{max(values):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
