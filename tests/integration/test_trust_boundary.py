"""The local socket is a trust boundary: attacks by another user of the daemon's group.

The real daemon runs as `amavisd-test` (started as root, dropping privileges
as in production), with a real clamd. Every attack runs in a child process
that has become `amavisd-evil`, a separate uid in the socket's group
`amavisd-test`, with what such a user has: the socket and the group-writable
temp base. Race tests swap a directory of a path for a symlink with
renameat2(RENAME_EXCHANGE) for AMAVISD_RACE_SECONDS (default 3) and must see
ZERO reads of a 0600 canary outside the temp base and ZERO removals outside it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest

from amavisd.testing import archivers
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message
from amavisd_client import client as amavisd_client
from amavisd_client.wire.ampdp import Decoder, encode_block
from tests.rigs.daemon import DaemonInstance
from tests.rigs.mailboxes import ensure_user

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")]

RACE_SECONDS = float(os.environ.get("AMAVISD_RACE_SECONDS", "3"))
GROUP = "amavisd-test"
DAEMON_USER = "amavisd-test"
ATTACKER = "amavisd-evil"
REJECTING = {"virus_destiny": "reject"}


# -- accounts and running code as the attacker --------------------------------------------


@pytest.fixture(scope="session")
def accounts():
    """The daemon's user and an attacker, both in the socket's group (idempotent)."""
    return {"daemon": ensure_user(DAEMON_USER, GROUP), "evil": ensure_user(ATTACKER, GROUP)}


class AsUser:
    """Run `fn(*args)` in a forked child that has become `user` (its primary group
    only); the JSON-able result comes back through a pipe."""

    def __init__(self, user: pwd.struct_passwd, fn, *args):
        self.read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest, whatever happens
            try:
                os.close(self.read_end)
                try:
                    os.setgroups([])
                    os.setgid(user.pw_gid)
                    os.setuid(user.pw_uid)
                    os.umask(0o022)
                    payload = {"result": fn(*args)}
                except BaseException as err:
                    payload = {"error": describe(err)}
                data = json.dumps(payload).encode()
                while data:
                    data = data[os.write(write_end, data):]
            finally:
                os._exit(0)
        os.close(write_end)

    def join(self, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError("the attacker process did not finish")
            ready, _, _ = select.select([self.read_end], [], [], remaining)
            if ready:
                chunk = os.read(self.read_end, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        os.close(self.read_end)
        os.waitpid(self.pid, 0)
        payload = json.loads(b"".join(chunks) or b'{"error": "no result"}')
        if "error" in payload:
            raise AssertionError("attacker failed:\n" + payload["error"])
        return payload["result"]


def describe(err: BaseException) -> str:
    """The traceback if it can be formatted: as another uid, modules that are
    not loaded yet may not be importable (the interpreter may live in /root)."""
    try:
        return traceback.format_exc()
    except BaseException:
        return f"{type(err).__name__}: {err}"


def as_user(user, fn, *args, timeout: float = 120.0):
    return AsUser(user, fn, *args).join(timeout)


def scan_as(user, daemon: DaemonInstance, message: Path, timeout: float = 60.0) -> int:
    """The real client (in a forked child: the interpreter may not be executable
    by `user`) checks `message` as `user`; its exit status."""
    return as_user(user, amavisd_client.main, ["-s", daemon.socket_path, str(message)],
                   timeout=timeout)


_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a: str, b: str) -> None:
    """renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE): both names swap atomically."""
    if _libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def swapper(a: Path, b: Path) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            exchange(str(a), str(b))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return stop, thread


def request(socket_path: str, attrs, timeout: float = 30.0) -> dict | None:
    """One raw AM.PDP request; the reply's attributes, or None without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(encode_block(attrs))
        decoder = Decoder()
        while True:
            data = sock.recv(65536)
            if not data:
                return None
            for block in decoder.feed(data):
                return {k: v[0] for k, v in block.as_dict().items()}


def outcome(reply: dict | None) -> str:
    if reply is None:
        return "no reply"
    if "INFECTED" in reply.get("setreply", ""):
        return "infected"
    return reply.get("return_value", "?")


def own_dir(tempbase: str) -> Path:
    path = Path(tempbase) / f"evil-{os.getpid()}-{os.urandom(3).hex()}"
    path.mkdir(mode=0o750)
    return path


# -- the daemon --------------------------------------------------------------------------


def daemon_as_user(short_tmp: Path, clamd, **settings) -> DaemonInstance:
    return DaemonInstance(short_tmp / "d", clamd.address, user=DAEMON_USER, group=GROUP,
                          **(REJECTING | settings)).start()


@pytest.fixture
def daemon(short_tmp, clamd_nodecomp, accounts):
    instance = daemon_as_user(short_tmp, clamd_nodecomp)
    yield instance
    instance.stop()


def quarantine_canary(daemon: DaemonInstance, accounts) -> Path:
    """An EICAR message, 0600, in the quarantine (0700): the daemon may read it, nobody
    else; a verdict INFECTED for a request that named a clean file means it did."""
    quarantine = Path(daemon.settings["quarantine_dir"])
    canary = quarantine / "canary.eml"
    canary.write_bytes(eicar_message())
    os.chown(canary, accounts["daemon"].pw_uid, accounts["daemon"].pw_gid)
    canary.chmod(0o600)
    return canary


# -- 7. check-then-use races on paths -----------------------------------------------------


def attack_read_race(socket_path: str, tempbase: str, target: str, seconds: float) -> dict:
    """evil/x is a dir holding a clean canary.eml, or (swapped) a link to `target`,
    which holds the EICAR one."""
    mine = own_dir(tempbase)
    (mine / "x").mkdir()
    (mine / "x" / "canary.eml").write_bytes(clean_message())
    (mine / "y").symlink_to(target)
    stop, thread = swapper(mine / "x", mine / "y")
    counts: Counter = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        counts[outcome(request(socket_path, [
            ("request", "AM.PDP"), ("mail_file", str(mine / "x" / "canary.eml")),
            ("sender", "<evil@example.test>"), ("recipient", "<v@example.test>")]))] += 1
    stop.set()
    thread.join()
    return dict(counts)


def test_race_a_swapped_dir_never_makes_the_daemon_read_outside(daemon, accounts):
    canary = quarantine_canary(daemon, accounts)
    counts = as_user(accounts["evil"], attack_read_race, daemon.socket_path, daemon.tempbase,
                     str(canary.parent), RACE_SECONDS)
    assert counts.get("infected", 0) == 0, counts
    assert counts.get("continue", 0) > 0 and counts.get("tempfail", 0) > 0, counts


def attack_remove_race(socket_path: str, tempbase: str, target: str, seconds: float) -> dict:
    """tempdir=evil/x/virusmails, removed by the server; evil/x is a dir, or (swapped)
    a link to `target`, the dir holding the real quarantine `virusmails`."""
    mine = own_dir(tempbase)
    (mine / "x").mkdir()
    (mine / "y").symlink_to(target)
    stop, thread = swapper(mine / "x", mine / "y")
    counts: Counter = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for parent in (mine / "x", mine / "y"):  # whichever is the real dir just now
            try:
                (parent / "virusmails").mkdir(exist_ok=True)
                (parent / "virusmails" / "email.txt").write_bytes(clean_message())
            except OSError:
                pass
        counts[outcome(request(socket_path, [
            ("request", "AM.PDP"), ("tempdir", str(mine / "x" / "virusmails")),
            ("tempdir_removed_by", "server")]))] += 1
    stop.set()
    thread.join()
    return dict(counts)


def test_race_a_swapped_dir_never_makes_the_daemon_remove_outside(daemon, accounts):
    canary = quarantine_canary(daemon, accounts)
    beside = Path(daemon.settings["workdir"]) / "canary-dir"  # beside the temp base
    beside.mkdir()
    (beside / "keep").write_bytes(b"x")
    os.chown(beside, accounts["daemon"].pw_uid, accounts["daemon"].pw_gid)
    counts = as_user(accounts["evil"], attack_remove_race, daemon.socket_path,
                     daemon.tempbase, str(canary.parent.parent), RACE_SECONDS)
    assert canary.exists(), f"the quarantine was emptied: {counts}"
    assert (beside / "keep").exists()
    assert counts.get("continue", 0) > 0, counts


def test_the_temp_base_is_sticky_and_the_work_base_private(daemon, accounts):
    tempbase, work = os.stat(daemon.tempbase), os.stat(daemon.config.work_base_path)
    assert stat.S_IMODE(tempbase.st_mode) == 0o1770
    assert stat.S_IMODE(work.st_mode) == 0o700
    assert work.st_uid == tempbase.st_uid == accounts["daemon"].pw_uid
    victim = Path(daemon.tempbase) / "client-victim"
    victim.mkdir()
    os.chown(victim, accounts["daemon"].pw_uid, accounts["daemon"].pw_gid)

    def rename_it(path: str) -> str:
        try:
            os.rename(path, path + "-mine")
        except OSError as err:
            return err.strerror
        return "renamed"

    assert as_user(accounts["evil"], rename_it, str(victim)) == "Operation not permitted"


def test_an_existing_temp_base_gets_the_sticky_bit(short_tmp, clamd_nodecomp, accounts):
    home = short_tmp / "d" / "home"
    (home / "tmp").mkdir(parents=True)
    for path in (home, home / "tmp"):
        os.chown(path, accounts["daemon"].pw_uid, accounts["daemon"].pw_gid)
    (home / "tmp").chmod(0o770)  # as an older version made it
    daemon = daemon_as_user(short_tmp, clamd_nodecomp)
    try:
        assert stat.S_IMODE(os.stat(home / "tmp").st_mode) == 0o1770
    finally:
        daemon.stop()


# -- 8. a tempdir that is not the client's --------------------------------------------------


EXTERNAL_FORMATS = ["cab", "lha", "arj", "arc", "7z"]


def archive_message(fmt: str, data: bytes) -> bytes:
    name = f"files.{archivers.EXTENSIONS[fmt]}"
    body = base64.encodebytes(data).decode()
    return ("From: mallory@example.test\nTo: bob@example.test\nSubject: archive\n"
            'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n'
            "--b\nContent-Type: text/plain\n\nSee attached.\n"
            f'--b\nContent-Type: application/octet-stream; name="{name}"\n'
            f"Content-Transfer-Encoding: base64\n\n{body}--b--\n").encode()


def victim_client(socket_path: str, messages: list[str], seconds: float) -> list[str]:
    """The real client, over and over: its exit status and verdict line each time."""
    verdicts: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(verdicts) < len(messages):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = amavisd_client.main(["-s", socket_path,
                                        messages[len(verdicts) % len(messages)]])
        verdicts.append(f"{code} {out.getvalue().strip()}")
    return verdicts


def attack_remove_others(socket_path: str, tempbase: str, seconds: float) -> dict:
    """Ask the server to remove every dir in the temp base that is not ours,
    the daemon's own work dirs (amavisd-*) first."""
    counts: Counter = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        entries = sorted(os.scandir(tempbase), key=lambda e: not e.name.startswith("amavisd-"))
        for entry in entries:
            if entry.name.startswith("evil-"):
                continue
            counts[outcome(request(socket_path, [
                ("request", "AM.PDP"), ("tempdir", entry.path),
                ("tempdir_removed_by", "server")]))] += 1
        time.sleep(0.001)
    return dict(counts)


def test_a_request_cannot_have_another_clients_or_the_daemons_dirs_removed(
        short_tmp, clamd_nodecomp, accounts):
    formats = [fmt for fmt in EXTERNAL_FORMATS if archivers.available(fmt) is None]
    if not formats:
        pytest.skip("none of the external-tool archivers is installed")
    messages = []
    for fmt in formats:
        path = short_tmp / f"m.{fmt}.eml"
        path.write_bytes(archive_message(fmt, archivers.build(fmt, {"eicar.com": EICAR},
                                                              short_tmp)))
        messages.append(path)
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=3)  # one victim, two attackers
    try:
        attackers = [AsUser(accounts["evil"], attack_remove_others, daemon.socket_path,
                            daemon.tempbase, RACE_SECONDS + 1) for _ in range(2)]
        # The victim: the real client as the daemon's user (Sendmail's U=amavis:amavis),
        # in a forked child: the interpreter may not be executable by that user.
        verdicts = as_user(accounts["daemon"], victim_client, daemon.socket_path,
                           [str(m) for m in messages], RACE_SECONDS)
        counts = [attacker.join() for attacker in attackers]
        wrong = [v for v in verdicts if not (v.startswith("69 ") and "INFECTED" in v)]
        assert wrong == [], f"{len(wrong)} of {len(verdicts)}: {wrong[:5]}"
        assert all(c.get("tempfail", 0) > 0 for c in counts), counts  # they did try
        assert not [n for n in os.listdir(daemon.tempbase) if n.startswith("amavisd-")]
    finally:
        daemon.stop()


def test_over_tcp_the_server_never_removes_a_tempdir(short_tmp, clamd_nodecomp, accounts):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=1,
                            tcp_listen=f"127.0.0.1:{port}")
    try:
        for n in range(2):
            job = Path(daemon.tempbase) / f"job{n}"
            job.mkdir()
            (job / "email.txt").write_bytes(clean_message())
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(encode_block([("request", "AM.PDP"), ("tempdir", str(job)),
                                           ("tempdir_removed_by", "server")]))
                (reply,) = Decoder().feed(sock.recv(65536))
            assert reply.get("return_value") == "continue"
            assert (job / "email.txt").exists()
        assert daemon.log_text().count("over TCP: left to the client") == 1
    finally:
        daemon.stop()


# -- 9. what a mail_file may be -------------------------------------------------------------


def attack_odd_files(socket_path: str, tempbase: str) -> dict:
    mine = own_dir(tempbase)
    os.mkfifo(mine / "fifo", 0o660)
    (mine / "zero").symlink_to("/dev/zero")
    (mine / "dev").symlink_to("/dev")
    (mine / "adir").mkdir()
    with open(mine / "big", "wb") as fh:  # sparse: 200 MB that cost no disk
        fh.write(clean_message())
        fh.truncate(200 * 1024 * 1024)
    (mine / "big").chmod(0o640)
    replies = {}
    for name in ("fifo", "zero", "dev/zero", "adir", "big"):
        started = time.monotonic()
        try:
            reply = request(socket_path, [("request", "AM.PDP"),
                                          ("mail_file", str(mine / name))], timeout=10)
        except TimeoutError:
            reply = None
        replies[name] = {"seconds": time.monotonic() - started,
                         "return_value": (reply or {}).get("return_value"),
                         "setreply": (reply or {}).get("setreply", "")}
    return replies


def test_fifos_devices_dirs_and_oversized_files_are_not_read(short_tmp, clamd_nodecomp,
                                                             accounts):
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, max_message_size=1024 * 1024,
                            child_timeout=60.0)
    try:
        replies = as_user(accounts["evil"], attack_odd_files, daemon.socket_path,
                          daemon.tempbase)
        for name in ("fifo", "adir"):
            assert replies[name]["return_value"] == "tempfail", replies
            assert "not a regular file" in replies[name]["setreply"], replies
        for name in ("zero", "dev/zero"):
            assert replies[name]["return_value"] == "tempfail", replies
            assert "symlink" in replies[name]["setreply"], replies
        assert replies["big"]["return_value"] == "reject", replies  # unchecked_destiny
        assert "UNCHECKED: message larger than max_message_size (1048576 bytes)" \
            in replies["big"]["setreply"]
        assert all(r["seconds"] < 5 for r in replies.values()), replies
        for pid in daemon.worker_pids():  # the 200 MB were never read
            status = Path(f"/proc/{pid}/status").read_text()
            assert int(status.split("VmHWM:")[1].split()[0]) < 150 * 1024, status
    finally:
        daemon.stop()


# -- 11. pinning a worker ----------------------------------------------------------------------


PINNING = {"workers": 1, "client_idle_timeout": 1.0, "request_timeout": 2.0,
           "max_connection_requests": 5, "child_timeout": 60.0, "client_timeout": 60.0}


def hung_up(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection within `seconds`, without reading
    a byte of what it sent (POLLRDHUP: the peer shut down its side)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(seconds * 1000))


def pin_silently(socket_path: str, seconds: float) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(socket_path)
        return "hung up on" if hung_up(sock, seconds) else "held"


def pin_by_trickling(socket_path: str, seconds: float) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(socket_path)
        deadline = time.monotonic() + seconds
        for byte in (b"request=AM.PDP\r\nsender=<" + b"a" * 1000):
            if time.monotonic() > deadline:
                return "held"
            if hung_up(sock, 0.3):
                return "hung up on"
            sock.send(bytes([byte]))
    return "held"


def pin_by_requests(socket_path: str, seconds: float) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                sock.sendall(b"request=AM.CL\r\n\r\n")
                if not sock.recv(65536):
                    return "hung up on"
                time.sleep(0.3)
        except OSError:
            return "hung up on"
    return "held"


def pin_by_pipelining(socket_path: str, seconds: float) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(socket_path)
        try:
            sock.sendall(b"garbage\r\n\r\n" * 20_000)  # and never read a reply
        except OSError:
            return "hung up on"
        return "hung up on" if hung_up(sock, seconds) else "held"


@pytest.mark.parametrize("pin, settings", [
    (pin_silently, {}),
    (pin_by_trickling, {}),
    (pin_by_requests, {}),
    (pin_by_pipelining, {"max_connection_requests": 100_000}),  # only the send timeout helps
], ids=["silent", "trickling", "a-request-every-0.3s", "20000-pipelined-unread"])
def test_a_client_cannot_pin_the_only_worker(short_tmp, clamd_nodecomp, accounts, pin,
                                             settings):
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, **(PINNING | settings))
    try:
        message = short_tmp / "m.eml"
        message.write_bytes(clean_message())
        message.chmod(0o644)
        attacker = AsUser(accounts["evil"], pin, daemon.socket_path, 10.0)
        time.sleep(0.5)  # the worker is now the attacker's
        started = time.monotonic()
        code = scan_as(accounts["daemon"], daemon, message, timeout=15)
        waited = time.monotonic() - started
        assert code == 0
        assert waited < 5.0, f"the worker was held {waited:.1f}s"
        assert attacker.join(60) == "hung up on"
        log = daemon.log_text()
        assert log.count("AM.PDP request refused") <= 1  # one line a connection
    finally:
        daemon.stop()


def test_megabytes_of_bad_lines_do_not_bloat_the_worker(short_tmp, clamd_nodecomp, accounts):
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=1)
    try:
        (worker,) = daemon.wait_for_workers(1)

        def peak() -> int:
            status = Path(f"/proc/{worker}/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0])  # kB

        def flood(socket_path: str) -> str | None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(60)
                sock.connect(socket_path)
                sock.sendall(b"request=AM.PDP\r\n" + b"x\n" * (1950 * 1024) + b"\r\n")
                (reply,) = Decoder().feed(sock.recv(65536))
                return reply.get("setreply")

        before = peak()
        setreply = as_user(accounts["evil"], flood, daemon.socket_path)
        assert "protocol error" in setreply
        grown = peak() - before
        assert grown < 40 * 1024, f"the worker grew by {grown} kB"
    finally:
        daemon.stop()


# -- 12. the temp base removed under a running daemon ---------------------------------------------


def test_a_removed_temp_base_is_recreated_and_the_master_stays_up(daemon, accounts, short_tmp):
    message = short_tmp / "m.eml"
    message.write_bytes(clean_message())
    message.chmod(0o644)
    workers = daemon.wait_for_workers(2)
    home = Path(daemon.settings["workdir"])
    shutil.rmtree(daemon.tempbase)
    shutil.rmtree(daemon.config.work_base_path)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)  # its replacement boots without the dirs
    daemon.wait_for_workers(2, exclude={victim})
    time.sleep(1.5)
    assert daemon.proc.poll() is None, daemon.stderr_text()[-2000:]
    tempbase, work = os.stat(daemon.tempbase), os.stat(daemon.config.work_base_path)
    assert stat.S_IMODE(tempbase.st_mode) == 0o1770
    assert stat.S_IMODE(work.st_mode) == 0o700
    assert tempbase.st_uid == work.st_uid == accounts["daemon"].pw_uid
    assert scan_as(accounts["daemon"], daemon, message) == 0

    # Now the dirs cannot be made at all: requests tempfail, the master stays up.
    home.chmod(0o550)
    try:
        shutil.rmtree(daemon.tempbase)
        workers = daemon.wait_for_workers(2)
        os.kill(min(workers), signal.SIGKILL)
        daemon.wait_for_workers(2, exclude={min(workers)})
        time.sleep(1.5)
        assert daemon.proc.poll() is None, daemon.stderr_text()[-2000:]
        reply = request(daemon.socket_path, [("request", "AM.PDP"),
                                             ("tempdir", f"{daemon.tempbase}/job")])
        assert reply["return_value"] == "tempfail"
        assert "temp base" in daemon.log_text()
    finally:
        home.chmod(0o750)
    deadline = time.monotonic() + 5
    while not os.path.isdir(daemon.tempbase) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert scan_as(accounts["daemon"], daemon, message) == 0
