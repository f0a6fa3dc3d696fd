"""Run the real amavisd-milter from this checkout, for tests and benchmarks.

Started exactly as a postmaster would (`amavisd-milter --foreground -c
amavisd.toml ...`, here as `python -m amavisd_client.milter.main`) and
considered up when it sends READY=1 on a NOTIFY_SOCKET we own (the systemd
readiness path, exercised on every test). Pointed at a `DaemonInstance`, it
reads the daemon's own TOML file for the socket and the temp base, as in
production; flags add the rest.

    with MilterInstance(tmp / "m", daemon, listen=f"unix:{tmp}/milter.sock") as milter:
        ... the MTA connects to milter.listen ...

Without a daemon (`daemon=None`) it asks a socket path nobody listens on:
the "daemon down" case.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.rigs.daemon import ROOT, DaemonInstance


class MilterInstance:
    def __init__(self, workdir: Path, daemon: DaemonInstance | None, listen: str,
                 *args: str, progress_interval: float | None = None,
                 on_error: str | None = None, quarantine: str | None = None,
                 user: str | None = None):
        self.workdir = Path(workdir)
        self.daemon = daemon
        self.listen = listen
        self.extra = list(args)
        if progress_interval is not None:
            self.extra += ["--progress-interval", str(progress_interval)]
        if on_error is not None:
            self.extra += ["--on-error", on_error]
        if quarantine is not None:
            self.extra += ["--quarantine", quarantine]
        if user is not None:
            self.extra += ["--user", user]
        self.notify_path = self.workdir / "milter-notify.sock"
        self.log_path = self.workdir / "milter.log"
        self.proc: subprocess.Popen | None = None
        self._notify: socket.socket | None = None

    @property
    def socket_path(self) -> str:
        """The Unix socket path of `listen` (unix:/path), for an MTA's config."""
        return self.listen.partition(":")[2]

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "amavisd_client.milter.main", "--foreground",
                "--log", "stderr", "--listen", self.listen]
        if self.daemon is not None:
            argv += ["-c", str(self.daemon.config_path)]
        else:
            argv += ["-c", os.devnull, "--daemon-socket", str(self.workdir / "no-daemon.sock"),
                     "--tempbase", str(self.workdir / "tmp")]
        return argv + self.extra

    def start(self, timeout: float = 20.0) -> MilterInstance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.daemon is None:
            (self.workdir / "tmp").mkdir(exist_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path.unlink(missing_ok=True)
        self._notify.bind(str(self.notify_path))
        self.notify_path.chmod(0o666)  # like systemd's: the milter may have dropped root
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONPATH=ROOT)
        env.pop("AMAVISD_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), env=env, stdout=log, stderr=log, cwd=ROOT)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"amavisd-milter exited with {self.proc.returncode}:\n"
                                       f"{self.log_text()[-3000:]}")
                self._notify.settimeout(0.2)
                try:
                    if b"READY=1" in self._notify.recv(4096).split(b"\n"):
                        return self
                except TimeoutError:
                    continue
            raise RuntimeError(f"amavisd-milter sent no READY=1 within {timeout}s:\n"
                               f"{self.log_text()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> MilterInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
