"""The real daemon (2 workers) with a real clamd, driven by the real client.

clamd runs with ScanMail/ScanArchive off, so every detection here proves that
our MIME decomposition handed it the decoded attachment.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from amavisd.testing import clamd as clamd_testing
from amavisd.testing.messages import clean_message, eicar_message, forwarded_eicar_message
from amavisd_client.wire.ampdp import Decoder, encode_block
from tests.rigs.daemon import DaemonInstance
from tests.rigs.faults import StallingClamdProxy, slow_boot_argv

pytestmark = pytest.mark.integration
# These tests check the mechanics through the MTA-visible reject (exit 69);
# the default, discard after quarantine, has its own tests (test_policy).
REJECTING = {"virus_destiny": "reject"}


@pytest.fixture
def daemon(short_tmp, clamd_nodecomp):
    instance = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2, **REJECTING).start()
    yield instance
    instance.stop()


def deliver_to(path: Path) -> str:
    """A local delivery agent for tests: dd writes stdin to a file (argv, no shell)."""
    return f"dd of={path} status=none"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def ampdp(socket_path: str, attrs, timeout: float = 30.0):
    """One raw AM.PDP request; returns the reply block, or None on EOF without reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(encode_block(attrs))
        decoder = Decoder()
        while True:
            data = sock.recv(65536)
            if not data:
                return None
            blocks = decoder.feed(data)
            if blocks:
                return blocks[0]


def spool(daemon: DaemonInstance, data: bytes, name: str = "job") -> Path:
    job = Path(daemon.tempbase) / name
    job.mkdir()
    return write(job / "email.txt", data)


# -- verdicts through the Sendmail-mailer client ------------------------------------


def test_clean_message_is_delivered_with_x_virus_scanned(daemon, short_tmp):
    out = short_tmp / "delivered.eml"
    proc = daemon.client("-d", deliver_to(out), "-f", "alice@example.test", "--",
                         "bob@example.test", stdin=clean_message())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    delivered = out.read_bytes()
    assert delivered.startswith(b"X-Virus-Scanned: by amavisd ")
    assert b"scanner.example.test" in delivered.split(b"\n")[0]
    assert delivered.endswith(clean_message().split(b"\n\n", 1)[1])
    assert os.listdir(daemon.tempbase) == []  # the client removed its spool


@pytest.mark.parametrize("message", [eicar_message(), forwarded_eicar_message()],
                         ids=["attachment", "forwarded-rfc822"])
def test_infected_message_is_not_delivered(daemon, short_tmp, message):
    out = short_tmp / "delivered.eml"
    proc = daemon.client("-d", deliver_to(out), "-f", "mallory@example.test", "--",
                         "bob@example.test", stdin=message)
    assert proc.returncode == 69  # reject here (REJECTING): the MTA bounces
    assert proc.stdout.decode().startswith("5.7.0 Reject, id=")
    assert "INFECTED: Eicar-Test-Signature" in proc.stdout.decode()
    assert not out.exists()
    assert "Blocked INFECTED" in daemon.log_text()


def test_discard_destiny_accepts_without_delivering(short_tmp, clamd_nodecomp):
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address,
                        virus_destiny="discard") as daemon:
        out = short_tmp / "delivered.eml"
        proc = daemon.client("-d", deliver_to(out), "-f", "m@example.test", "--",
                             "bob@example.test", stdin=eicar_message())
        assert proc.returncode == 0 and not out.exists()
        proc = daemon.client(str(write(short_tmp / "v.eml", eicar_message())))
        assert proc.returncode == 99  # file mode shows the discard


def test_file_mode_prints_verdicts_and_exits_with_the_worst(daemon, short_tmp):
    clean = write(short_tmp / "clean.eml", clean_message())
    infected = write(short_tmp / "infected.eml", eicar_message())
    proc = daemon.client(str(clean), str(infected))
    lines = proc.stdout.decode().splitlines()
    assert proc.returncode == 69
    assert lines[0].startswith(f"{clean}: 250 2.5.0 Ok, id=") and "CLEAN" in lines[0]
    assert lines[1].startswith(f"{infected}: 554 5.7.0 Reject")
    assert clean.exists() and infected.exists()  # never touched


def test_clamd_down_means_tempfail_and_nothing_lost(short_tmp):
    if clamd_testing.skip_reason():
        pytest.skip(clamd_testing.skip_reason())
    clamd = clamd_testing.ClamdInstance(short_tmp / "c").start()
    try:
        with DaemonInstance(short_tmp / "d", clamd.address, **REJECTING) as daemon:
            message = write(short_tmp / "msg.eml", clean_message())
            assert daemon.client(str(message)).returncode == 0
            clamd.stop()
            proc = daemon.client(str(message))
            assert proc.returncode == 75
            assert "451 4.5.0" in proc.stdout.decode()
            assert message.read_bytes() == clean_message()  # still on disk, intact
            out = short_tmp / "delivered.eml"
            proc = daemon.client("-d", deliver_to(out), "-f", "a@example.test", "--",
                                 "bob@example.test", stdin=clean_message())
            assert proc.returncode == 75 and not out.exists()
            assert "cannot connect" in daemon.log_text()
    finally:
        clamd.stop()


def test_daemon_down_means_tempfail(short_tmp):
    import subprocess

    from tests.rigs.daemon import client_argv

    message = write(short_tmp / "msg.eml", clean_message())
    proc = subprocess.run(client_argv() + ["-s", str(short_tmp / "nobody-listens.sock"),
                                           str(message)], capture_output=True, timeout=30)
    assert proc.returncode == 75
    assert "cannot connect" in proc.stderr.decode()


# -- the AM.PDP server ------------------------------------------------------------------------


def test_paths_outside_the_temp_base_are_refused(daemon, short_tmp):
    secret = write(short_tmp / "secret.eml", eicar_message())
    reply = ampdp(daemon.socket_path, [("request", "AM.PDP"), ("mail_file", str(secret)),
                                       ("tempdir", str(short_tmp))])
    assert reply.get("return_value") == "tempfail"
    assert "outside the temp base" in reply.get("setreply")
    assert secret.exists()


def test_several_requests_on_one_connection_and_server_side_tempdir_removal(daemon):
    first = spool(daemon, clean_message(), "one")
    second = spool(daemon, eicar_message(), "two")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket_path)
        decoder, replies = Decoder(), []
        for path, removed_by in ((first, "client"), (second, "server")):
            sock.sendall(encode_block([
                ("request", "AM.PDP"), ("tempdir", str(path.parent)),
                ("tempdir_removed_by", removed_by), ("mail_file", str(path)),
                ("sender", "<a@example.test>"), ("recipient", "<b@example.test>"),
                ("queue_id", "4XyZ1"), ("client_address", "192.0.2.1"),
                ("helo_name", "mx.example.test")]))
            while not (blocks := decoder.feed(sock.recv(65536))):
                pass
            replies.extend(blocks)
    assert [r.get("return_value") for r in replies] == ["continue", "reject"]
    assert replies[0].get("version_server") == "2"
    assert replies[0].fields("insheader", 3)[0][:2] == ["0", "X-Virus-Scanned"]
    deadline = time.monotonic() + 5  # removed right after the reply went out
    while second.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists() and not second.parent.exists()
    assert "Queue-ID: 4XyZ1" in daemon.log_text()


# -- the process model --------------------------------------------------------------------------


def test_worker_killed_mid_scan_client_gets_tempfail_and_is_replaced(short_tmp,
                                                                      clamd_nodecomp):
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path).start()
    try:
        with DaemonInstance(short_tmp / "d", proxy.address, workers=2, **REJECTING) as daemon:
            before = daemon.wait_for_workers(2)
            proxy.stall = True
            message = write(short_tmp / "msg.eml", clean_message())
            result = {}
            thread = threading.Thread(
                target=lambda: result.setdefault("proc", daemon.client(str(message))))
            thread.start()
            victim = proxy.wait_for_connection(timeout=20)  # this worker is mid-scan
            assert victim in before
            os.kill(victim, signal.SIGKILL)
            thread.join(30)
            assert result["proc"].returncode == 75
            assert message.exists()
            after = daemon.wait_for_workers(2, exclude={victim})
            assert victim not in after and len(after) == 2
            proxy.stall = False
            assert daemon.client(str(write(short_tmp / "v.eml", eicar_message()))
                                 ).returncode == 69
            assert "killed by SIGKILL" in daemon.log_text()
    finally:
        proxy.stop()


def test_stuck_worker_is_aborted_and_its_client_hears_tempfail(short_tmp, clamd_nodecomp):
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path,
                               stall=True).start()
    try:
        with DaemonInstance(short_tmp / "d", proxy.address, child_timeout=2.0, **REJECTING) as daemon:
            before = daemon.wait_for_workers(2)
            job = spool(daemon, clean_message())
            started = time.monotonic()
            reply = ampdp(daemon.socket_path, [("request", "AM.PDP"),
                                               ("tempdir", str(job.parent)),
                                               ("tempdir_removed_by", "client")])
            elapsed = time.monotonic() - started
            assert reply is not None, "the connection dropped without a reply"
            assert reply.get("return_value") == "tempfail"
            assert "child_timeout" in reply.get("setreply")
            assert 2.0 <= elapsed < 10.0
            victim = proxy.peer_pids[0]
            assert victim in before
            assert victim not in daemon.wait_for_workers(2, exclude={victim})
            assert "stuck for more than child_timeout" in daemon.log_text()
    finally:
        proxy.stop()


def test_hup_under_a_steady_stream_loses_nothing(short_tmp, clamd_nodecomp):
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=2, **REJECTING) as daemon:
        first_generation = daemon.wait_for_workers(2)
        clean = write(short_tmp / "clean.eml", clean_message())
        infected = write(short_tmp / "infected.eml", eicar_message())
        outcomes: list[tuple[bool, int]] = []
        lock = threading.Lock()

        def sender(count: int, offset: int) -> None:
            for n in range(count):
                is_infected = (n + offset) % 5 == 0
                proc = daemon.client(str(infected if is_infected else clean))
                with lock:
                    outcomes.append((is_infected, proc.returncode))

        threads = [threading.Thread(target=sender, args=(50, i)) for i in range(4)]
        for thread in threads:
            thread.start()
        hups = 0
        while any(t.is_alive() for t in threads) and hups < 4:
            time.sleep(0.3)
            daemon.write_config(workers=2 + hups % 2)  # a real change each time
            daemon.signal(signal.SIGHUP)
            hups += 1
        for thread in threads:
            thread.join(120)
        assert len(outcomes) == 200
        wrong = [o for o in outcomes if o[1] != (69 if o[0] else 0)]
        assert wrong == [], f"{len(wrong)} messages refused or misjudged: {wrong[:5]}"
        assert hups >= 2
        assert not (daemon.worker_pids() & first_generation)  # all replaced
        assert "configuration reloaded, worker generation" in daemon.log_text()


def test_bad_config_on_hup_keeps_the_running_one(daemon, short_tmp):
    workers = daemon.wait_for_workers(2)
    daemon.config_path.write_text("[daemon]\nworkers = -1\n")
    daemon.signal(signal.SIGHUP)
    time.sleep(1.5)
    assert daemon.worker_pids() == workers
    assert "reload failed, keeping the running configuration" in daemon.log_text()
    assert daemon.client(str(write(short_tmp / "m.eml", clean_message()))).returncode == 0


def test_term_lets_the_message_in_flight_finish(short_tmp, clamd_nodecomp):
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path,
                               stall=True).start()
    try:
        daemon = DaemonInstance(short_tmp / "d", proxy.address, **REJECTING).start()
        message = write(short_tmp / "v.eml", eicar_message())
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault("proc", daemon.client(str(message))))
        thread.start()
        proxy.wait_for_connection(timeout=20)
        daemon.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not os.path.exists(daemon.socket_path)  # no new clients during shutdown
        proxy.stall = False  # the scan completes while the master waits
        thread.join(30)
        assert result["proc"].returncode == 69
        assert daemon.proc.wait(15) == 0
        assert daemon.worker_pids() == set()
    finally:
        proxy.stop()


def test_workers_retire_after_max_requests(short_tmp, clamd_nodecomp):
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1, max_requests=3,
                        max_requests_jitter=0, **REJECTING) as daemon:
        (first,) = daemon.wait_for_workers(1)
        message = write(short_tmp / "m.eml", clean_message())
        codes = [daemon.client(str(message)).returncode for _ in range(7)]
        assert codes == [0] * 7
        assert first not in daemon.wait_for_workers(1, exclude={first})
        assert "retiring after 3 requests" in daemon.log_text()


def test_usr1_reopens_the_log_file(daemon, short_tmp):
    rotated = daemon.log_path.with_suffix(".1")
    daemon.log_path.rename(rotated)
    daemon.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while not daemon.log_path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.2)  # the workers reopen on their next loop turn
    assert daemon.client(str(write(short_tmp / "m.eml", clean_message()))).returncode == 0
    assert "Passed CLEAN" in daemon.log_text()
    assert "Passed CLEAN" not in rotated.read_text()


BOOT_DELAY = 1.5  # seconds each worker of the slow_boot fault waits before its handlers


def test_usr1_sent_while_a_worker_boots_is_not_lost(short_tmp, clamd_nodecomp):
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                        python_args=slow_boot_argv(BOOT_DELAY), **REJECTING) as daemon:
        rotated = daemon.log_path.with_suffix(".1")
        daemon.log_path.rename(rotated)
        daemon.signal(signal.SIGUSR1)  # READY=1 came before the worker's handlers
        message = write(short_tmp / "m.eml", clean_message())
        assert daemon.client(str(message)).returncode == 0
        time.sleep(0.2)
        assert "Passed CLEAN" in daemon.log_text()
        assert "Passed CLEAN" not in rotated.read_text()


def test_term_sent_while_a_worker_boots_stops_it_after_boot(short_tmp, clamd_nodecomp):
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            python_args=slow_boot_argv(BOOT_DELAY), graceful_timeout=30.0,
                            **REJECTING).start()
    try:
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0
        # A lost TERM would leave the worker serving until graceful_timeout (30 s).
        assert time.monotonic() - started < BOOT_DELAY + 5
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_root_is_dropped_and_a_worker_boot_failure_halts_the_master(short_tmp,
                                                                   clamd_nodecomp):
    nobody = pwd.getpwnam("nobody")
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, user="nobody",
                            group="nogroup", log_file="", **REJECTING)
    daemon.start()
    try:
        workers = daemon.wait_for_workers(2)
        for pid in workers:
            uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:2]
            assert uids == [str(nobody.pw_uid)] * 2
        sock = os.stat(daemon.socket_path)
        assert oct(sock.st_mode & 0o777) == "0o660" and sock.st_uid == nobody.pw_uid
        # The client run as root (Sendmail's F=S mailer) gives its spool the
        # daemon's group, so the dropped workers can read it.
        message = write(short_tmp / "m.eml", clean_message())
        assert daemon.client(str(message)).returncode == 0
        # A message the daemon's user cannot read is tempfailed, never passed.
        path = spool(daemon, clean_message())
        path.chmod(0o600)  # root's, closed to nobody
        reply = ampdp(daemon.socket_path, [("request", "AM.PDP"), ("mail_file", str(path)),
                                           ("tempdir", str(path.parent))])
        assert reply is not None and reply.get("return_value") == "tempfail", reply
    finally:
        daemon.stop()
    # Now a temp base the workers cannot use: the master must halt, not respawn forever.
    home = short_tmp / "d2" / "home"
    (home / "tmp").mkdir(parents=True)
    (home / "tmp").chmod(0o700)  # root's, closed to nobody
    broken = DaemonInstance(short_tmp / "d2", clamd_nodecomp.address, user="nobody",
                            group="nogroup", log_file="", **REJECTING)
    try:
        broken.start(timeout=15)  # READY=1 comes once listening, maybe before the halt
    except RuntimeError as err:
        assert "exited with 78" in str(err)
    assert broken.proc.wait(15) == 78
    stderr = broken.stderr_text()
    assert "failed to boot: temp base" in stderr and "not respawning" in stderr
    assert stderr.count("failed to boot: temp base") <= 2 * 2
    broken.stop()


def test_socket_is_not_world_accessible_and_stale_socket_is_replaced(short_tmp,
                                                                    clamd_nodecomp):
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, **REJECTING)
    home = Path(daemon.settings["workdir"])
    home.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(home / "amavisd.sock"))
    stale.close()  # a dead daemon's socket file
    with daemon:
        assert os.stat(daemon.socket_path).st_mode & 0o007 == 0
        second = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, **REJECTING)
        with pytest.raises(RuntimeError, match="already listening"):
            second.start(timeout=10)


def test_scan_command_json_and_exit_codes(short_tmp, clamd_nodecomp):
    import json
    import subprocess
    import sys

    clean = write(short_tmp / "c.eml", clean_message())
    infected = write(short_tmp / "i.eml", forwarded_eicar_message())

    def scan(*paths, clamd=clamd_nodecomp.address):
        return subprocess.run([sys.executable, "-m", "amavisd", "scan", "--clamd", clamd,
                               "--json", *map(str, paths)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2])

    proc = scan(clean)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["verdict"] == "CLEAN"
    proc = scan(clean, infected)
    assert proc.returncode == 1
    second = json.loads(proc.stdout.splitlines()[1])
    assert second["verdict"] == "INFECTED"
    assert second["viruses"][0].startswith("Eicar-Test-Signature")
    assert second["findings"][0]["part"].count("/") >= 3  # found deep inside the forward
    assert {"path", "verdict", "viruses", "banned", "unchecked", "parts"} <= set(second)
    assert scan(clean, clamd="unix:/nonexistent.sock").returncode == 75
    assert scan(short_tmp / "missing.eml").returncode == 66


def test_pidfile_and_daemon_mode(short_tmp, clamd_nodecomp):
    import subprocess
    import sys

    pytest.importorskip("daemon")
    pidfile = short_tmp / "amavisd.pid"
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, pidfile=str(pidfile),
                            daemon=True, **REJECTING)
    daemon.workdir.mkdir(parents=True)
    daemon.write_config()
    proc = subprocess.run([sys.executable, "-m", "amavisd", "run", "-c",
                           str(daemon.config_path)], capture_output=True, timeout=20,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0  # the foreground parent leaves once detached
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    try:
        message = write(short_tmp / "m.eml", clean_message())
        for _ in range(50):
            if daemon.client(str(message)).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("detached daemon did not answer")
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not pidfile.exists()
    shutil.rmtree(short_tmp / "d", ignore_errors=True)


def test_loopback_tcp_listener_serves_ampdp_too(short_tmp, clamd_nodecomp):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with DaemonInstance(short_tmp / "d", clamd_nodecomp.address,
                        tcp_listen=f"127.0.0.1:{port}", **REJECTING) as daemon:
        message = write(short_tmp / "v.eml", eicar_message())
        proc = daemon.client("-s", f"127.0.0.1:{port}", "-T", daemon.tempbase, str(message))
        assert proc.returncode == 69, proc.stderr
        assert "tcp:127.0.0.1:" in daemon.log_text()


def test_a_stopping_daemon_leaves_a_newer_daemons_socket_alone(short_tmp, clamd_nodecomp):
    old = DaemonInstance(short_tmp / "old", clamd_nodecomp.address,
                         socket=str(short_tmp / "shared.sock"), **REJECTING).start()
    os.unlink(old.socket_path)  # e.g. an admin or a second start cleaned up the path
    new = DaemonInstance(short_tmp / "new", clamd_nodecomp.address,
                         socket=str(short_tmp / "shared.sock"), **REJECTING).start()
    try:
        assert old.stop() == 0
        assert os.path.exists(new.socket_path)
        message = str(write(short_tmp / "m.eml", clean_message()))
        assert new.client("-T", new.tempbase, message).returncode == 0
    finally:
        new.stop()


def test_the_log_line_reaches_syslog_as_facility_mail(short_tmp, clamd_nodecomp):
    """A real datagram socket stands where syslogd's /dev/log would be."""
    log_socket = short_tmp / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
        syslogd.bind(str(log_socket))
        syslogd.settimeout(0.5)
        with DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            log_to=["syslog"], syslog_socket=str(log_socket),
                            **REJECTING) as daemon:
            clean = write(short_tmp / "clean.eml", clean_message())
            infected = write(short_tmp / "virus.eml", eicar_message())
            assert daemon.client(str(clean)).returncode == 0
            assert daemon.client(str(infected)).returncode == 69
            datagrams = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(b"Blocked" in d for d in datagrams):
                try:
                    datagrams.append(syslogd.recv(65536))
                except TimeoutError:
                    pass
    # <PRI> = facility mail (2) * 8 + severity info (6)
    clean_lines = [d for d in datagrams if b"Passed CLEAN" in d]
    virus_lines = [d for d in datagrams if b"Blocked INFECTED" in d]
    assert len(clean_lines) == 1 and len(virus_lines) == 1, datagrams
    assert clean_lines[0].startswith(b"<22>amavisd[")
    assert virus_lines[0].startswith(b"<22>amavisd[") and b"Eicar" in virus_lines[0]
