"""Our amavisd-milter driven by Debian's `miltertest` (an MTA side nobody here
wrote), in front of the real daemon and a real clamd.

Each case runs a Lua script of tests/integration/miltertest/ with the
milter's address and a message file; the script fails (exit status 1 and
its error on stderr) when the milter answers otherwise. miltertest cannot
read a `y` reply's text except by exact comparison, so for the reject case
a Python MTA of ours (the codec's commands over a socket) reads the bytes.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from amavisd_client.milter import codec
from tests.rigs.daemon import DaemonInstance
from tests.rigs.faults import StallingClamdProxy
from tests.rigs.milter import MilterInstance

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parent / "miltertest"
MILTERTEST = shutil.which("miltertest")


@pytest.fixture
def miltertest(short_tmp):
    if MILTERTEST is None:
        pytest.skip("miltertest not installed (Debian package miltertest)")
    messages = {"clean": clean_message(), "eicar": eicar_message()}
    for name, data in messages.items():
        (short_tmp / f"{name}.eml").write_bytes(data)

    def run(milter: MilterInstance, script: str, message: str = "clean", timeout: float = 90,
            **defines: str) -> subprocess.CompletedProcess:
        argv = [MILTERTEST, "-vvv", "-s", str(SCRIPTS / script),
                "-D", f"sock={milter.listen}", "-D", f"helpers={SCRIPTS / 'common.lua'}",
                "-D", f"msgfile={short_tmp / f'{message}.eml'}"]
        for name, value in defines.items():
            argv += ["-D", f"{name}={value}"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    return run


def ok(proc: subprocess.CompletedProcess, milter: MilterInstance) -> bool:
    """miltertest passed; its output and the milter's log otherwise."""
    assert proc.returncode == 0, (f"miltertest exit {proc.returncode}\n{proc.stderr}\n"
                                  f"{proc.stdout[-2000:]}\n--- milter log:\n"
                                  f"{milter.log_text()[-2000:]}")
    return True


def make_daemon(tmp: Path, clamd: str, **settings) -> DaemonInstance:
    """One worker, so log ids and order are predictable; `with` starts it."""
    return DaemonInstance(tmp / "d", clamd, workers=1, **settings)


@pytest.fixture
def daemon(short_tmp, clamd_nodecomp):
    instance = make_daemon(short_tmp, clamd_nodecomp.address).start()
    yield instance
    instance.stop()


@pytest.fixture
def milter(short_tmp, daemon):
    with MilterInstance(short_tmp / "m", daemon, f"unix:{short_tmp}/milter.sock") as instance:
        yield instance


def test_version_6_negotiation_and_the_header_added(miltertest, milter, daemon):
    assert ok(miltertest(milter, "negotiate_v6.lua"), milter)
    log = daemon.log_text()
    # the request carried the envelope and what the macros and events gave
    assert "Passed CLEAN" in log and "[192.0.2.1] <alice@example.test> -> <bob@example.test>" \
        in log and "Queue-ID: 4MtTest1" in log
    # The answered spool waits in the milter's pool, holding only our file;
    # it goes when the milter stops.
    spools = list(Path(daemon.tempbase).iterdir())
    assert [[p.name for p in spool.iterdir()] for spool in spools] == [["email.txt"]]
    assert milter.stop() == 0
    assert list(Path(daemon.tempbase).iterdir()) == []


def test_version_2_negotiation(miltertest, milter):
    assert ok(miltertest(milter, "negotiate_v2.lua"), milter)


def test_eicar_with_destiny_reject_gets_a_reply_code(miltertest, short_tmp, clamd_nodecomp):
    with make_daemon(short_tmp, clamd_nodecomp.address, virus_destiny="reject") as daemon, \
            MilterInstance(short_tmp / "m", daemon, f"unix:{short_tmp}/milter.sock") as milter:
        assert ok(miltertest(milter, "verdict.lua", "eicar", expect_reply="replycode"), milter)
        assert "Blocked INFECTED" in daemon.log_text()
        assert "reject" in milter.log_text()


def python_mta(path: str, message: bytes) -> list[tuple[str, bytes]]:
    """One message through the milter the way Postfix sends it; the replies."""
    head, _, body = message.replace(b"\r\n", b"\n").partition(b"\n\n")
    fields: list[list[bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b"\n" + line
        else:
            name, _, value = line.partition(b":")
            fields.append([name, value])
    commands = [codec.OptNeg(6, 0x1FF, 0x1FFFFF), codec.Connect("c.example", "4", 25, "192.0.2.9"),
                codec.Mail(("<alice@example.test>",)), codec.Rcpt(("<bob@example.test>",)),
                *(codec.Header(n, v) for n, v in fields), codec.EndOfHeaders(),
                codec.Body(body.replace(b"\n", b"\r\n")), codec.EndOfMessage()]
    framer, got = codec.Framer(), []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.sendall(b"".join(codec.encode_command(c) for c in commands))
        while not got or got[-1][0] not in b"cayrtd":
            data = sock.recv(65536)
            assert data, got
            got += framer.feed(data)
    return [(chr(code), payload) for code, payload in got]


def test_the_reject_reply_carries_the_daemons_code_and_text(short_tmp, clamd_nodecomp):
    with make_daemon(short_tmp, clamd_nodecomp.address, virus_destiny="reject") as daemon, \
            MilterInstance(short_tmp / "m", daemon, f"unix:{short_tmp}/milter.sock") as milter:
        replies = python_mta(milter.socket_path, eicar_message())
    code, text = replies[-1]
    assert code == "y", replies
    assert re.fullmatch(rb"554 5\.7\.0 Reject, id=\d+-\d+ - INFECTED: Eicar-Test-Signature\S*\0",
                        text), text


def test_eicar_with_the_default_destiny_is_discarded(miltertest, milter, daemon):
    assert ok(miltertest(milter, "verdict.lua", "eicar", expect_reply="discard"), milter)
    assert "Blocked INFECTED" in daemon.log_text()


def test_quarantine_in_the_mta_when_configured(miltertest, short_tmp, daemon):
    with MilterInstance(short_tmp / "m", daemon, f"unix:{short_tmp}/milter.sock",
                        quarantine="discard") as milter:
        assert ok(miltertest(milter, "verdict.lua", "eicar", expect_reply="continue",
                             quarantined="yes"), milter)
        assert ok(miltertest(milter, "verdict.lua", "clean", expect_reply="continue"), milter)


@pytest.mark.parametrize("how", ["never-started", "stopped"])
def test_tempfail_when_the_daemon_is_down(miltertest, short_tmp, clamd_nodecomp, how):
    daemon = None
    if how == "stopped":
        daemon = make_daemon(short_tmp, clamd_nodecomp.address).start()
    with MilterInstance(short_tmp / "m", daemon, f"unix:{short_tmp}/milter.sock") as milter:
        if daemon is not None:
            daemon.stop()
        proc = miltertest(milter, "verdict.lua", "clean", expect_reply="replycode",
                          smtp_code="451", smtp_xcode="4.3.0",
                          smtp_text="Virus scanner unavailable, try again later")
        assert ok(proc, milter)
        assert "cannot connect to amavisd" in milter.log_text()


def test_inet_listener_in_sendmail_spelling(miltertest, short_tmp, daemon):
    port = free_port()
    with MilterInstance(short_tmp / "m", daemon, f"inet:{port}@127.0.0.1") as milter:
        assert ok(miltertest(milter, "negotiate_v6.lua"), milter)


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- a slow scan: progress packets keep the MTA waiting ---------------------------------

STALL = 6.0  # seconds the fault holds clamd's answer
READ_TIMEOUT = 3  # miltertest's read timeout: shorter than the scan


@pytest.fixture
def slow_clamd(short_tmp, clamd_nodecomp):
    """The named fault: a relay in front of the real clamd that holds every
    scan for STALL seconds, then lets it through."""
    proxy = StallingClamdProxy(short_tmp / "slow-clamd.sock", clamd_nodecomp.socket_path,
                               stall=True).start()

    def release_after_stall():
        try:
            proxy.wait_for_connection(60)
        except TimeoutError:
            return
        time.sleep(STALL)
        proxy.stall = False

    thread = threading.Thread(target=release_after_stall, daemon=True)
    thread.start()
    yield proxy
    proxy.stall = False
    thread.join(STALL + 5)
    proxy.stop()


@pytest.mark.parametrize("interval,passes", [(0.5, True), (30.0, False)],
                         ids=["progress", "no-progress"])
def test_a_slow_scan_outlasts_the_mta_timeout_thanks_to_progress(
        miltertest, short_tmp, slow_clamd, interval, passes):
    with make_daemon(short_tmp, slow_clamd.address, virus_destiny="reject") as daemon, \
            MilterInstance(short_tmp / "m", daemon, f"unix:{short_tmp}/milter.sock",
                           progress_interval=interval) as milter:
        started = time.monotonic()
        proc = miltertest(milter, "verdict.lua", "eicar", expect_reply="replycode",
                          read_timeout=str(READ_TIMEOUT))
        progress = proc.stdout.count("cmd p,")
        if passes:
            assert ok(proc, milter)
            assert time.monotonic() - started >= STALL - 1
            assert progress >= int(STALL / interval) - 4, proc.stdout[-2000:]
        else:  # the control: without progress, the MTA gives up before the verdict
            assert proc.returncode != 0 and progress == 0, proc.stdout[-2000:]
