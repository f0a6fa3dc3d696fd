# SPDX-License-Identifier: MIT
"""A private, real clamd for tests.

There is no internet (so no freshclam) and the system clamd is not ours to
touch, so tests start their own clamd with a tiny signature database written
at run time: whole-file MD5s of EICAR and ClamAV's ``clam.exe`` plus a body
signature that finds EICAR anywhere in a file.  In mode ``"nodecomp"`` clamd
does not look inside archives, mail, OLE2 or PDF, so a hit proves that the
code under test handed clamd the decoded part itself.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .eicar import CLAM_EXE_PATH, EICAR

__all__ = ["CLAMD_PATH", "ClamdInstance", "skip_reason"]

CLAMD_PATH = "/usr/sbin/clamd"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

_NODECOMP_OPTIONS = (
    "ScanArchive no",
    "ScanMail no",
    "ScanOLE2 no",
    "ScanPDF no",
    "ScanHTML no",
)


def skip_reason() -> str | None:
    """Why the clamd-based tests cannot run here, or None if they can."""
    if not os.access(CLAMD_PATH, os.X_OK):
        return f"{CLAMD_PATH} not installed (Debian package clamav-daemon)"
    if not os.path.isfile(CLAM_EXE_PATH):
        return f"{CLAM_EXE_PATH} missing (Debian package clamav-testfiles)"
    return None


def _recv_until_nul(sock: socket.socket) -> str:
    """Read one NUL-terminated clamd reply (or up to EOF)."""
    buf = bytearray()
    while not buf.endswith(b"\0"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.rstrip(b"\0").decode("utf-8", "replace")


class ClamdInstance:
    """Runs ``clamd -c <workdir>/clamd.conf`` in the foreground as a child."""

    def __init__(
        self,
        workdir: Path,
        mode: str = "nodecomp",
        stream_max_length: str = "100M",
        max_threads: int = 4,
        tcp_port: int | None = None,
        system_db: str | None = None,
        read_timeout: int = 120,
        options: tuple[str, ...] = (),
        temp_dir: str | None = None,
    ) -> None:
        if mode not in ("nodecomp", "full"):
            raise ValueError(f"mode must be 'nodecomp' or 'full', not {mode!r}")
        self.workdir = Path(workdir).absolute()
        self.mode = mode
        self.stream_max_length = stream_max_length
        self.max_threads = max_threads
        self.tcp_port = tcp_port
        # `make run`: also load the system's signatures (e.g. /var/lib/clamav), if any.
        self.system_db = system_db
        # ReadTimeout also closes an idle IDSESSION (clamd says `COMMAND READ
        # TIMED OUT`); IdleTimeout is its threads' and does not.
        self.read_timeout = read_timeout
        self.options = tuple(options)  # more clamd.conf lines, e.g. "MaxQueue 4"
        # clamd writes every INSTREAM to a temp file and makes a scan dir per
        # request there: on tmpfs that costs half as much CPU as on ext4.
        self.temp_dir = temp_dir
        self.socket_path = self.workdir / "clamd.sock"
        self.conf_path = self.workdir / "clamd.conf"
        self.log_path = self.workdir / "clamd.log"
        self.db_dir = self.workdir / "db"
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise ValueError(
                f"socket path too long for AF_UNIX ({len(str(self.socket_path))} bytes): "
                f"{self.socket_path}; use a shorter workdir"
            )
        self._proc: subprocess.Popen[bytes] | None = None

    # -- public properties -------------------------------------------------
    @property
    def address(self) -> str:
        return "unix:" + str(self.socket_path)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def clamscan_table(self) -> dict:
        """A [scanners.clamscan] table that reads this instance's signatures:
        the real clamscan as a backup scanner in tests."""
        db = f"--database={self.db_dir}"
        return {"type": "command",
                "argv": ["clamscan", "--stdout", "--no-summary", "--infected",
                         "--alert-exceeds-max=yes", db, "{files}"],
                "version_argv": ["clamscan", db, "--version"]}

    # -- set-up ------------------------------------------------------------
    def _write_database(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.db_dir, 0o755)
        for old in self.db_dir.iterdir():
            if old.is_file() or old.is_symlink():
                old.unlink()
        clam_exe = Path(CLAM_EXE_PATH).read_bytes()
        hdb = "".join(
            f"{hashlib.md5(data).hexdigest()}:{len(data)}:{name}\n"
            for data, name in ((EICAR, "Eicar-Test-Signature"), (clam_exe, "ClamAV-Test-File"))
        )
        # name:target(0 = any file):offset(* = anywhere):hex body
        ndb = f"Eicar-Test-Signature-ndb:0:*:{EICAR.hex()}\n"
        for fname, text in (("testing.hdb", hdb), ("testing.ndb", ndb)):
            path = self.db_dir / fname
            path.write_text(text, encoding="ascii")
            os.chmod(path, 0o644)
        if self.system_db and os.path.isdir(self.system_db):
            for entry in Path(self.system_db).iterdir():
                if entry.suffix in (".cvd", ".cld", ".hdb", ".ndb", ".ldb", ".hsb", ".cdb"):
                    (self.db_dir / entry.name).symlink_to(entry)

    def _write_config(self) -> None:
        lines = [
            f"# generated by amavisd.testing.clamd (mode {self.mode})",
            f"LocalSocket {self.socket_path}",
            "LocalSocketMode 666",
            "FixStaleSocket yes",
            "Foreground yes",
            f"DatabaseDirectory {self.db_dir}",
            f"LogFile {self.log_path}",
            "LogTime yes",
            "Bytecode no",
            "DisableCache yes",
            "SelfCheck 3600",
            f"StreamMaxLength {self.stream_max_length}",
            f"MaxThreads {self.max_threads}",
            f"ReadTimeout {self.read_timeout}",
            "CommandReadTimeout 30",
            # as the README asks of every clamd we use: a part clamd gives up
            # on at a limit is named (UNCHECKED), not answered "OK"
            "AlertExceedsMax yes",
        ]
        if self.temp_dir is not None:
            lines.append(f"TemporaryDirectory {self.temp_dir}")
        if self.tcp_port is not None:
            lines += [f"TCPSocket {self.tcp_port}", "TCPAddr 127.0.0.1"]
        if self.mode == "nodecomp":
            lines += list(_NODECOMP_OPTIONS)
        lines += list(self.options)
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="ascii")
        os.chmod(self.conf_path, 0o644)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of clamd's log and captured stdout, for error messages."""
        out = []
        for path in (self.log_path, self.workdir / "clamd.stdout"):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(out) or "(no clamd log)"

    def start(self, timeout: float = 30.0) -> ClamdInstance:
        """Write DB and config, start clamd, wait for PONG; returns self."""
        if self._proc is not None:
            raise RuntimeError("clamd already started")
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # clamd (whatever user it runs as) and other users connecting to the
        # socket (e.g. amavis) must be able to traverse the work dir.
        os.chmod(self.workdir, 0o755)
        self._write_database()
        self._write_config()
        self.log_path.unlink(missing_ok=True)
        self.socket_path.unlink(missing_ok=True)
        with open(self.workdir / "clamd.stdout", "wb") as out:
            self._proc = subprocess.Popen(
                [CLAMD_PATH, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"clamd exited with status {code}:\n{self.log_tail()}")
            if self.ping(timeout=1.0):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"clamd did not answer PING within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """TERM clamd, wait, then KILL it if needed.  Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> ClamdInstance:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- talking to it -----------------------------------------------------
    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        return sock

    def ping(self, timeout: float = 2.0) -> bool:
        """True if clamd answers ``zPING`` with ``PONG``."""
        try:
            with self._connect(timeout) as sock:
                sock.sendall(b"zPING\0")
                return _recv_until_nul(sock) == "PONG"
        except OSError:
            return False

    def scan_bytes(self, data: bytes, timeout: float = 30.0) -> str:
        """Scan ``data`` with ``zINSTREAM``; returns clamd's raw reply line,
        e.g. ``stream: OK`` or ``stream: Eicar-Test-Signature.UNOFFICIAL FOUND``."""
        with self._connect(timeout) as sock:
            try:
                sock.sendall(b"zINSTREAM\0")
                view = memoryview(data)
                for i in range(0, len(view), 1 << 16):
                    chunk = view[i : i + (1 << 16)]
                    sock.sendall(struct.pack("!L", len(chunk)) + chunk)
                sock.sendall(struct.pack("!L", 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # e.g. size limit exceeded: clamd has replied and closed
            return _recv_until_nul(sock)


def memory_temp_dir(prefix: str = "clamd-tmp") -> str | None:
    """A fresh 0700 directory on a tmpfs (/dev/shm) for clamd's temp files, or
    None where there is none (then clamd keeps its default, /tmp). The caller
    removes it."""
    shm = "/dev/shm"
    try:
        with open("/proc/self/mounts", encoding="ascii", errors="replace") as mounts:
            on_tmpfs = any(line.split()[1:3] == [shm, "tmpfs"] for line in mounts)
    except OSError:
        return None
    return tempfile.mkdtemp(prefix=prefix, dir=shm) if on_tmpfs else None
