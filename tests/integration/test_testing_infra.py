# SPDX-License-Identifier: MIT
"""Proves the test infrastructure in amavisd.testing and tests.rigs against the real software.

Every later integration test trusts these helpers: a private clamd that does
(or, in "nodecomp" mode, deliberately does not) look inside containers, a
proxy that makes clamd hang on demand, and Debian's real amavisd-new as the
reference AM.PDP server.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from amavisd.testing import clamd
from amavisd.testing.clamd import ClamdInstance
from amavisd.testing.eicar import CLAM_EXE_PATH, EICAR
from tests.rigs import amavisd_new
from tests.rigs.amavisd_new import AmavisdNewInstance
from tests.rigs.faults import StallingClamdProxy

pytestmark = pytest.mark.integration

needs_clamd = pytest.mark.skipif(clamd.skip_reason() is not None, reason=str(clamd.skip_reason()))
needs_amavisd_new = pytest.mark.skipif(
    (clamd.skip_reason() or amavisd_new.skip_reason()) is not None,
    reason=str(clamd.skip_reason() or amavisd_new.skip_reason()),
)


def _mime_with_attachment(payload: bytes) -> bytes:
    return (
        b"From: <a@example.test>\r\nTo: <b@example.test>\r\nSubject: attachment\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BOUNDARY\r\n\r\n"
        b"--BOUNDARY\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
        b"--BOUNDARY\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=test.com\r\n\r\n"
        + base64.encodebytes(payload)
        + b"--BOUNDARY--\r\n"
    )


CLEAN_MESSAGE = (
    b"From: <a@example.test>\r\nTo: <b@example.test>\r\nSubject: hello\r\n\r\nJust text.\r\n"
)


def _deflated_zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def _clamd_command(path: str, command: bytes, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command)
        return s.recv(4096)


def _instream(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(path)
        s.sendall(b"zINSTREAM\0")
        for i in range(0, len(data), 8192):
            chunk = data[i : i + 8192]
            s.sendall(struct.pack("!L", len(chunk)) + chunk)
        s.sendall(struct.pack("!L", 0))
        reply = b""
        while not reply.endswith(b"\0"):
            more = s.recv(4096)
            if not more:
                break
            reply += more
        return reply


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short, world-traversable dir in /tmp.

    pytest's tmp_path lives under /tmp/pytest-of-root (mode 0700), which user
    amavis cannot enter, and its paths can get long for AF_UNIX sockets."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="amt"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_eicar_is_the_standard_test_file() -> None:
    assert len(EICAR) == 68
    assert hashlib.md5(EICAR).hexdigest() == "44d88612fea8a8f36de82e1278abb02f"
    import amavisd.testing.eicar as module

    assert EICAR not in Path(module.__file__).read_bytes()


@needs_clamd
def test_clamd_nodecomp_detects_only_exact_bytes(tmp_path: Path) -> None:
    with ClamdInstance(tmp_path / "clamd", mode="nodecomp") as c:
        assert c.ping()
        assert c.address == "unix:" + str(c.socket_path)
        assert c.pid is not None and _alive(c.pid)
        pid = c.pid
        assert c.scan_bytes(EICAR).endswith("FOUND")
        assert "Eicar-Test-Signature" in c.scan_bytes(EICAR)
        assert c.scan_bytes(EICAR + b"\r\ntrailing bytes\r\n").endswith("FOUND")
        assert "ClamAV-Test-File" in c.scan_bytes(Path(CLAM_EXE_PATH).read_bytes())
        assert c.scan_bytes(b"nothing to see here\n") == "stream: OK"
        assert c.scan_bytes(_deflated_zip("eicar.com", EICAR)) == "stream: OK"
        assert c.scan_bytes(_mime_with_attachment(EICAR)) == "stream: OK"
    assert not c.ping()
    assert not _alive(pid)


@needs_clamd
def test_clamd_full_mode_finds_the_same_samples_inside_containers(tmp_path: Path) -> None:
    # The negative results above are due to "nodecomp", not to broken samples.
    with ClamdInstance(tmp_path / "clamd", mode="full") as c:
        assert c.scan_bytes(_deflated_zip("eicar.com", EICAR)).endswith("FOUND")
        assert c.scan_bytes(_mime_with_attachment(EICAR)).endswith("FOUND")


@needs_clamd
def test_clamd_start_failure_shows_the_log(tmp_path: Path) -> None:
    c = ClamdInstance(tmp_path / "clamd", stream_max_length="not-a-size")
    with pytest.raises(RuntimeError, match="StreamMaxLength"):
        c.start(timeout=10)
    assert c.pid is None


@needs_clamd
def test_proxy_relays_to_clamd(tmp_path: Path, short_dir: Path) -> None:
    with (
        ClamdInstance(tmp_path / "clamd") as c,
        StallingClamdProxy(short_dir / "proxy.sock", c.address) as proxy,
    ):
        assert proxy.address == "unix:" + str(short_dir / "proxy.sock")
        path = str(proxy.path)
        assert _clamd_command(path, b"zPING\0", 5.0) == b"PONG\0"
        # a multi-chunk INSTREAM goes through byte for byte
        assert _instream(path, b"x" * 200_000 + EICAR).endswith(b"FOUND\0")
        assert proxy.peer_pids == [os.getpid(), os.getpid()]
    assert not (short_dir / "proxy.sock").exists()


@needs_clamd
def test_proxy_stall_hangs_the_client_and_names_it(tmp_path: Path, short_dir: Path) -> None:
    with ClamdInstance(tmp_path / "clamd") as c:
        proxy = StallingClamdProxy(short_dir / "proxy.sock", c.address).start()
        try:
            path = str(proxy.path)
            # stalled from the start: the client gets nothing and times out
            proxy.stall = True
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                _clamd_command(path, b"zPING\0", 0.5)
            assert time.monotonic() - t0 >= 0.45
            assert proxy.wait_for_connection(timeout=5) == os.getpid()

            # a connection opened while healthy, stalled before its request
            proxy.stall = False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(path)
                s.sendall(b"zPING\0")
                assert s.recv(16) == b"PONG\0"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(path)
                time.sleep(0.2)  # the relay is connected upstream by now
                proxy.stall = True
                s.sendall(b"zPING\0")
                with pytest.raises(TimeoutError):
                    s.recv(16)
            assert proxy.wait_for_connection(timeout=5) == os.getpid()

            # healthy again
            proxy.stall = False
            assert _clamd_command(path, b"zPING\0", 5.0) == b"PONG\0"
            with pytest.raises(TimeoutError):
                proxy.wait_for_connection(timeout=0.1)
            assert proxy.peer_pids == [os.getpid()] * 4
        finally:
            proxy.stop()
    leftover = [t for t in threading.enumerate() if t.name.startswith("stall-proxy")]
    assert leftover == []


@pytest.fixture(scope="module")
def amavisd_new_reject() -> Iterator[AmavisdNewInstance]:
    """One amavisd-new (D_REJECT) + nodecomp clamd shared by the tests below."""
    reason = clamd.skip_reason() or amavisd_new.skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="amt"))  # see short_dir
    os.chmod(base, 0o755)
    try:
        with (
            ClamdInstance(base / "clamd") as c,
            AmavisdNewInstance(base / "amavisd-new", c.address, virus_destiny="D_REJECT") as amavis,
        ):
            yield amavis
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_amavisd_new
def test_amavisd_new_clean_message_continues(amavisd_new_reject: AmavisdNewInstance) -> None:
    reply = amavisd_new_reject.check_message(CLEAN_MESSAGE)
    assert reply["return_value"] == ["continue"], reply
    assert reply["exit_code"] == ["0"]
    assert reply["insheader"] == ["0 X-Virus-Scanned amavisd-new at example.test"]
    assert reply["setreply"][0].startswith("250 2.5.0 Ok")


@needs_amavisd_new
def test_amavisd_new_eicar_attachment_is_rejected(
    amavisd_new_reject: AmavisdNewInstance,
) -> None:
    amavis = amavisd_new_reject
    reply = amavis.check_message(_mime_with_attachment(EICAR))
    assert reply["return_value"] == ["reject"], reply
    assert reply["exit_code"] == ["69"]
    assert reply["setreply"][0].startswith("554 5.7.0 Reject")
    assert "INFECTED: Eicar-Test-Signature" in reply["setreply"][0]
    assert any(p.name.startswith("virus-") for p in amavis.quarantine_dir.iterdir())
    assert amavis.tempbase == amavis.socket_path.parent / "tmp"
    assert "Blocked INFECTED" in amavis.log_path.read_text()


@needs_amavisd_new
def test_amavisd_new_stop_leaves_no_process(short_dir: Path) -> None:
    with ClamdInstance(short_dir / "clamd") as c:
        amavis = AmavisdNewInstance(
            short_dir / "amavisd-new", c.address, virus_destiny="D_DISCARD", max_servers=2
        ).start()
        try:
            assert amavis.check_message(_mime_with_attachment(EICAR))["return_value"] == ["discard"]
            master = amavis.pid
            assert master is not None
            family = [master] + [
                int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == master
            ]
            assert len(family) >= 3  # master + 2 pre-forked children
        finally:
            amavis.stop()
        assert amavis.pid is None
        assert [p for p in family if _alive(p)] == []


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
