# SPDX-License-Identifier: MIT
"""A private copy of Debian's real amavisd-new, for interoperability tests.

Our daemon must answer AM.PDP requests the way amavisd-new does, so tests run
the original (``/usr/sbin/amavisd``) side by side with a generated config:
an AM.PDP Unix socket, virus checks only (a given clamd), no SpamAssassin,
DKIM, SQL, LDAP or syslog.  Debian's amavisd starts as root, drops to user
``amavis`` before it binds, and must then read the clients' message files:
this module prepares ownership and permissions for that and kills the whole
daemon (parent and pre-forked children) on ``stop()``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from types import TracebackType

__all__ = ["AMAVISD_PATH", "AmavisdNewInstance", "skip_reason"]

AMAVISD_PATH = "/usr/sbin/amavisd"
AMAVIS_USER = "amavis"


def skip_reason() -> str | None:
    """Why amavisd-new tests cannot run here, or None if they can."""
    if not os.access(AMAVISD_PATH, os.X_OK):
        return f"{AMAVISD_PATH} not installed (Debian package amavisd-new)"
    try:
        pwd.getpwnam(AMAVIS_USER)
    except KeyError:
        return f"user {AMAVIS_USER!r} missing (created by Debian package amavisd-new)"
    if os.geteuid() != 0:
        return "amavisd-new must be started as root (it drops to user amavis)"
    return None


def _encode(value: str) -> str:
    """AM.PDP attribute encoding: %XX for anything but printable ASCII."""
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in b"%=" else f"%{b:02X}"
        for b in value.encode("utf-8")
    )


def _decode(value: str) -> str:
    return urllib.parse.unquote(value, errors="replace")


def _session_members(sid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose session id is ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after "comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _blocking_dir(path: Path, uid: int, gid: int) -> Path | None:
    """First directory on the way to ``path`` that ``uid``/``gid`` cannot traverse."""
    for directory in reversed([path, *path.parents]):
        try:
            st = directory.stat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return directory
    return None


class AmavisdNewInstance:
    """amavisd-new in daemon mode, AM.PDP on ``<workdir>/amavis/amavisd.sock``."""

    def __init__(
        self,
        workdir: Path,
        clamd_socket: str | os.PathLike[str],
        virus_destiny: str = "D_REJECT",
        max_servers: int = 2,
        log_level: int = 0,
        scan_method: str = "CONTSCAN",
    ) -> None:
        if virus_destiny not in ("D_PASS", "D_DISCARD", "D_BOUNCE", "D_REJECT"):
            raise ValueError(f"unknown virus_destiny {virus_destiny!r}")
        if scan_method not in ("CONTSCAN", "INSTREAM"):
            raise ValueError("scan_method must be 'CONTSCAN' or 'INSTREAM'")
        self.workdir = Path(workdir).absolute()
        sock = os.fspath(clamd_socket)
        self.clamd_socket = sock[len("unix:") :] if sock.startswith("unix:") else sock
        self.virus_destiny = virus_destiny
        self.max_servers = max_servers
        self.log_level = log_level
        self.scan_method = scan_method
        self.myhome = self.workdir / "amavis"
        self.tempbase = self.myhome / "tmp"
        self.socket_path = self.myhome / "amavisd.sock"
        self.quarantine_dir = self.workdir / "quarantine"
        self.log_path = self.workdir / "amavisd.log"
        self.conf_path = self.workdir / "amavisd.conf"
        self.stdout_path = self.workdir / "amavisd.stdout"
        self.pid: int | None = None
        pw = pwd.getpwnam(AMAVIS_USER) if skip_reason() is None else None
        self._uid = pw.pw_uid if pw else -1
        self._gid = pw.pw_gid if pw else -1
        if len(os.fsencode(self.socket_path)) > 107:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket_path}")

    @property
    def address(self) -> str:
        return "unix:" + str(self.socket_path)

    # -- set-up ------------------------------------------------------------
    def _config(self) -> str:
        if self.scan_method == "CONTSCAN":
            scanner = f'["CONTSCAN {{}}\\n", "{self.clamd_socket}"]'
        else:  # amavisd's built-in clamd client: IDSESSION + INSTREAM per file
            scanner = f'["{{}}/*", "clamd:{self.clamd_socket}"]'
        q = self.quarantine_dir
        return f"""# generated by tests.rigs.amavisd_new
use strict;
$MYHOME = '{self.myhome}';
$TEMPBASE = "$MYHOME/tmp";
$ENV{{TMPDIR}} = $TEMPBASE;
$db_home = "$MYHOME/db";
$helpers_home = "$MYHOME/var";
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$daemon_user = '{AMAVIS_USER}';
$daemon_group = '{AMAVIS_USER}';
$mydomain = 'example.test';
$myhostname = 'amavisd-new.example.test';
@local_domains_maps = ( ['.example.test'] );
@mynetworks = qw( 127.0.0.0/8 [::1] );

$max_servers = {int(self.max_servers)};
$child_timeout = 5*60;
$inet_socket_port = [];
$unix_socketname = "$MYHOME/amavisd.sock";
$interface_policy{{'SOCK'}} = 'AM.PDP-SOCK';
$policy_bank{{'AM.PDP-SOCK'}} = {{ protocol => 'AM.PDP', auth_required_release => 0 }};
$forward_method = 'smtp:[127.0.0.1]:9';
$notify_method = 'smtp:[127.0.0.1]:9';

$DO_SYSLOG = 0;
$LOGFILE = '{self.log_path}';
$log_level = {int(self.log_level)};

@bypass_spam_checks_maps = (1);
@bypass_banned_checks_maps = (1);
@bypass_header_checks_maps = (1);
$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
$enable_db = 0;
$enable_ldap = 0;
@lookup_sql_dsn = ();
$X_HEADER_TAG = 'X-Virus-Scanned';
$X_HEADER_LINE = 'amavisd-new at example.test';

$ENV{{PATH}} = $path = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/sbin:/usr/bin:/bin';
$file = 'file'; $gzip = 'gzip'; $bzip2 = 'bzip2'; $lzop = 'lzop';
$pax = 'pax'; $cpio = 'cpio'; $ar = 'ar'; $ripole = 'ripole';
$cabextract = 'cabextract'; $uncompress = ['uncompress', 'gzip -d', 'zcat'];
$arc = ['nomarch', 'arc']; $unarj = ['arj', 'unarj']; $unrar = ['unrar-free'];
$zoo = 'zoo'; $lha = undef; $unfreeze = undef; $rpm2cpio = ['rpm2cpio.pl', 'rpm2cpio'];

@av_scanners = (
  ['ClamAV-clamd', \\&ask_daemon, {scanner},
    qr/\\bOK$/m, qr/\\bFOUND$/m, qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ],
);
@av_scanners_backup = ();

$QUARANTINEDIR = '{q}';
$quarantine_subdir_levels = 0;
$virus_quarantine_method = 'local:virus-%m';
$final_virus_destiny = {self.virus_destiny};
$virus_admin = undef;
@virus_admin_maps = ();
$warnvirussender = 0; $warnvirusrecip = 0;
$warnbannedsender = 0; $warnbadhsender = 0;
@viruses_that_fake_sender_maps = (1);
1;
"""

    def _prepare(self) -> None:
        dn = Path("/dev/null").stat()
        if dn.st_mode & 0o666 != 0o666:
            raise RuntimeError(
                f"/dev/null has mode {stat.S_IMODE(dn.st_mode):o}; amavisd (as user "
                "amavis) dies with 'Cannot write /dev/null' unless it is 0666"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        for target in (self.workdir, Path(self.clamd_socket)):
            blocker = _blocking_dir(target, self._uid, self._gid)
            if blocker is not None:
                raise RuntimeError(
                    f"user {AMAVIS_USER} cannot traverse {blocker} (needed for {target}); "
                    "use a work dir outside pytest's 0700 tmp dirs, e.g. "
                    "tempfile.mkdtemp(dir='/tmp') with mode 0755"
                )
        if self.myhome.exists():
            shutil.rmtree(self.myhome)
        for d in (
            self.myhome,
            self.tempbase,
            self.myhome / "db",
            self.myhome / "var",
            self.quarantine_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o750)
            os.chown(d, self._uid, self._gid)
        self.log_path.touch()
        os.chown(self.log_path, self._uid, self._gid)
        self.conf_path.write_text(self._config(), encoding="utf-8")
        os.chmod(self.conf_path, 0o644)  # root-owned, not writable by amavis

    def start(self, timeout: float = 60.0) -> AmavisdNewInstance:
        """Generate the config, run ``amavisd -c CONF start``, wait for the socket."""
        if self.pid is not None:
            raise RuntimeError("amavisd-new already started")
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self._prepare()
        pid_file = self.myhome / "amavisd.pid"
        deadline = time.monotonic() + timeout
        with open(self.stdout_path, "wb") as out:
            # daemonizes: the launcher exits, the daemon writes pid_file
            launcher = subprocess.run(
                [AMAVISD_PATH, "-c", str(self.conf_path), "start"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        if launcher.returncode != 0 and not pid_file.exists():
            raise RuntimeError(
                f"amavisd-new exited with status {launcher.returncode}:\n{self.log_tail()}"
            )
        while time.monotonic() < deadline:
            if self.pid is None:
                try:
                    self.pid = int(pid_file.read_text().strip())
                except (OSError, ValueError):
                    pass
            if self.pid is not None:
                if not _session_members(self.pid):
                    break  # died after writing the pid file
                if self._connectable():
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"amavisd-new did not come up within {timeout}s:\n{self.log_tail()}")

    def _connectable(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(self.socket_path))
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """TERM the daemon (it stops its children), KILL whatever is left of its session."""
        pid, self.pid = self.pid, None
        if pid is None:
            return
        # Net::Server's daemon is a session leader (setsid): its pre-forked
        # children and their helpers share its session id.
        if pid in _session_members(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _session_members(pid):
                return
            time.sleep(0.05)
        for p in _session_members(pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
        left = _session_members(pid)
        if left:
            raise RuntimeError(f"amavisd-new processes survived SIGKILL: {left}")

    def __enter__(self) -> AmavisdNewInstance:
        return self.start() if self.pid is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in (self.stdout_path, self.log_path):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(out) or "(no amavisd-new log)"

    # -- a minimal AM.PDP client, for self-checks --------------------------
    def check_message(
        self,
        message: bytes,
        sender: str = "a@example.test",
        recipients: tuple[str, ...] = ("b@example.test",),
        timeout: float = 60.0,
    ) -> dict[str, list[str]]:
        """Submit ``message`` by AM.PDP; returns the reply attributes
        (name -> values in order), e.g. ``{"return_value": ["continue"], ...}``."""
        tempdir = Path(tempfile.mkdtemp(prefix="amt-", dir=self.tempbase))
        try:
            os.chmod(tempdir, 0o750)
            os.chown(tempdir, self._uid, self._gid)
            mail_file = tempdir / "email.txt"
            mail_file.write_bytes(message)
            os.chmod(mail_file, 0o640)
            os.chown(mail_file, self._uid, self._gid)
            attrs = [
                ("request", "AM.PDP"),
                ("tempdir", str(tempdir)),
                ("tempdir_removed_by", "client"),
                ("mail_file", str(mail_file)),
                ("sender", f"<{sender}>"),
                *(("recipient", f"<{r}>") for r in recipients),
            ]
            request = "".join(f"{_encode(k)}={_encode(v)}\r\n" for k, v in attrs) + "\r\n"
            reply = bytearray()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.socket_path))
                s.sendall(request.encode("ascii"))
                while not (reply.startswith(b"\r\n") or b"\r\n\r\n" in reply):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        finally:
            shutil.rmtree(tempdir, ignore_errors=True)
        result: dict[str, list[str]] = {}
        for line in reply.decode("utf-8", "replace").split("\r\n"):
            if not line:
                break
            name, _, value = line.partition("=")
            result.setdefault(_decode(name), []).append(_decode(value))
        return result
