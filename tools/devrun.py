"""`make run`: the daemon in the foreground on a default config under ./var.

Writes var/amavisd.toml on first use (edit it freely afterwards), starts a
private clamd in var/clamd (the system's signatures if present, plus the
test signatures) unless the configured clamd already answers, then runs
`amavisd run` and stops that clamd again when the daemon exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from amavisd import config as configuration
from amavisd.scan.clamd import ClamdScanner
from amavisd.testing.clamd import ClamdInstance

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
CONFIG = VAR / "amavisd.toml"
SYSTEM_DB = "/var/lib/clamav"


def write_default_config() -> None:
    values = configuration.defaults() | {
        "workdir": str(VAR / "lib"),
        "quarantine_dir": str(VAR / "virusmails"),
        "clamd": f"unix:{VAR / 'clamd' / 'clamd.sock'}",
        "log_to": ["stderr"],
        "client_timeout": 60.0,
        # the backup clamscan reads the private clamd's signatures
        "scanners": {"clamscan": {
            "type": "command",
            "argv": ["clamscan", "--stdout", "--no-summary", "--infected",
                     "--alert-exceeds-max=yes", f"--database={VAR / 'clamd' / 'db'}",
                     "{files}"],
            "version_argv": ["clamscan", f"--database={VAR / 'clamd' / 'db'}", "--version"],
        }},
    }
    CONFIG.write_text("# written by `make run`; edit freely\n"
                      + configuration.render(values, commented=True))


def main() -> int:
    VAR.mkdir(exist_ok=True)
    if not CONFIG.exists():
        write_default_config()
    cfg = configuration.load(str(CONFIG))
    clamd = None
    if not ClamdScanner(cfg.clamd).ping():
        kind, target = configuration.parse_address(cfg.clamd)
        if kind != "unix":
            print(f"make run: clamd at {cfg.clamd} does not answer", file=sys.stderr)
            return 75
        clamd = ClamdInstance(Path(target).parent, mode="full", system_db=SYSTEM_DB)
        print(f"make run: starting a private clamd at {target} (signatures: test set"
              f"{' + ' + SYSTEM_DB if os.path.isdir(SYSTEM_DB) else ''})", file=sys.stderr)
        clamd.start(timeout=300)
    print(f"make run: amavisd on {cfg.socket_path}; try:\n"
          f"  .venv/bin/amavisd-client -s {cfg.socket_path} some-message.eml", file=sys.stderr)
    daemon = subprocess.Popen([sys.executable, "-m", "amavisd", "run", "-c", str(CONFIG)])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _: daemon.send_signal(signum))
    try:
        return daemon.wait()
    finally:
        if clamd is not None:
            clamd.stop()


if __name__ == "__main__":
    sys.exit(main())
