"""Run the real amavisd daemon in a private directory, for tests and benchmarks.

The daemon is started exactly as a postmaster would (`amavisd run -c FILE`,
foreground) and is considered up when it sends READY=1 on a NOTIFY_SOCKET we
own, so the systemd readiness path is exercised on every test. Helpers list
the worker processes (children of the master) and run the real client.
Started as root with `user=`/`group=`, the daemon drops privileges exactly
as in production; its log file is made beforehand for that user.

It runs the daemon and the client from this checkout (PYTHONPATH and cwd
are the repository, the client launcher puts it on sys.path as `make deps`
does), which is why it lives under tests/ and is not installed.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from amavisd import config as configuration

ROOT = str(Path(__file__).resolve().parents[2])

# How `make deps` installs the client: python -I -S, no site-packages scan.
CLIENT_LAUNCHER = (
    f"import sys; sys.path.insert(0, {ROOT!r}); "
    "from amavisd_client.client import main; sys.exit(main())"
)


def client_argv() -> list[str]:
    return [sys.executable, "-I", "-S", "-c", CLIENT_LAUNCHER]


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(p) for p in text.split()}


class DaemonInstance:
    def __init__(self, workdir: Path, clamd_address: str, workers: int = 2,
                 python_args: list[str] | None = None, python: str | None = None,
                 **settings: Any):
        self.workdir = Path(workdir)
        # what follows the interpreter: `-m amavisd`, or a fault's launcher
        self.python_args = python_args or ["-m", "amavisd"]
        self.python = python or sys.executable  # e.g. a sealed one (rigs/sealed.py)
        self.settings: dict[str, Any] = {
            "workdir": str(self.workdir / "home"),
            "clamd": clamd_address,
            "workers": workers,
            "log_to": ["stderr"],
            "log_file": str(self.workdir / "amavisd.log"),
            "quarantine_dir": str(self.workdir / "virusmails"),
            "myhostname": "scanner.example.test",
            "child_timeout": 60.0,
            "graceful_timeout": 10.0,
            # no backup unless a test asks: "clamd down" must mean "no scanner"
            "backup_scanners": [],
            # notices go nowhere unless a test gives them a sink: never to
            # 127.0.0.1:10025, where a real MTA or amavisd may listen (port 9 refuses)
            "notify_method": "smtp:[127.0.0.1]:9",
            # no metrics port unless a test asks: parallel daemons would race for 9825
            "metrics_listen": "",
        }
        self.settings.update(settings)
        self.config_path = self.workdir / "amavisd.toml"
        self.notify_path = self.workdir / "notify.sock"
        self.proc: subprocess.Popen | None = None
        self._notify: socket.socket | None = None
        self._stderr = None
        self._config: configuration.Config | None = None

    # -- configuration --------------------------------------------------------

    def write_config(self, **changes: Any) -> Path:
        self.settings.update(changes)
        values = configuration.defaults() | self.settings
        self.config_path.write_text(configuration.render(values, commented=False))
        return self.config_path

    @property
    def config(self) -> configuration.Config:
        return configuration.load(str(self.config_path))

    @property
    def socket_path(self) -> str:
        return self._started_config().socket_path

    @property
    def tempbase(self) -> str:
        return self._started_config().tempbase_path

    def _started_config(self) -> configuration.Config:
        """The config the daemon started with: tests may break the file later."""
        if self._config is None:
            self._config = self.config
        return self._config

    @property
    def log_path(self) -> Path:
        return Path(self.settings["log_file"])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- life cycle ------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> DaemonInstance:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self._config = self.config
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self.notify_path.exists():
            self.notify_path.unlink()
        self._notify.bind(str(self.notify_path))
        self.notify_path.chmod(0o666)  # like systemd's: the master may have dropped root
        self._prepare_log_for_user()
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONPATH=ROOT)
        self._stderr = open(self.workdir / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            [self.python, *self.python_args, "run", "-c", str(self.config_path)],
            env=env, stdout=self._stderr, stderr=self._stderr, cwd=ROOT,
        )
        try:
            self.wait_notify("READY=1", timeout)
        except BaseException:
            self.stop()  # never leave a half-started daemon behind
            raise
        return self

    def _prepare_log_for_user(self) -> None:
        """A daemon that drops root still writes (and on USR1 reopens) its log file."""
        user, log_file = self.settings.get("user"), self.settings.get("log_file")
        if not user or not log_file or os.geteuid() != 0:
            return
        path = Path(log_file)
        path.touch(exist_ok=True)
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)

    def wait_notify(self, state: str, timeout: float = 20.0) -> None:
        assert self._notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"amavisd exited with {self.proc.returncode}:\n"
                                   f"{self.stderr_text()[-3000:]}")
            self._notify.settimeout(0.2)
            try:
                message = self._notify.recv(4096).decode()
            except TimeoutError:
                continue
            if state in message.split("\n"):
                return
        raise RuntimeError(f"amavisd sent no {state} within {timeout}s:\n"
                           f"{self.stderr_text()[-3000:]}")

    def stderr_text(self) -> str:
        try:
            return (self.workdir / "stderr.log").read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> set[int]:
        return children(self.pid)

    def wait_for_workers(self, count: int, exclude: set[int] = frozenset(),
                         timeout: float = 10.0) -> set[int]:
        """Wait until `count` workers run that are not in `exclude`; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.worker_pids() - set(exclude)
            if len(pids) >= count:
                return pids
            time.sleep(0.05)
        raise TimeoutError(f"wanted {count} new workers, have {self.worker_pids()}")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        if self._notify is not None:
            self._notify.close()
        if self._stderr is not None:
            self._stderr.close()
        return self.proc.returncode

    def __enter__(self) -> DaemonInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------

    def client(self, *args: str, stdin: bytes | None = None, timeout: float = 60.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the real amavisd-client against this daemon."""
        full_env = dict(os.environ, AMAVISD_SOCKET=self.socket_path)
        full_env.update(env or {})
        return subprocess.run(client_argv() + list(args), input=stdin, capture_output=True,
                              timeout=timeout, env=full_env)
