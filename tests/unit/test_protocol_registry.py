"""One way in for every protocol (issue 11, item 1).

Listeners carry a protocol tag; the worker builds the session of that
protocol from `protocol.registry` with itself as the handler, and the one
blocking loop of `protocol.loop` drives it. The proof: a trivial line
protocol, defined here and registered under a new tag, is served by the real
pre-forked workers of a real master, beside AM.PDP, with no edit of
worker.py or master.py. The master's worker bookkeeping is explicit states
with logged transitions, read here from its debug log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd import logs
from amavisd.listeners import AMPDP, Listener, bind_all, bind_unix, describe
from amavisd.master import EXIT_HALTED, Arbiter
from amavisd.protocol import registry
from amavisd.protocol.loop import ConnectionLimits, send_last_words, serve
from amavisd.protocol.session import Session
from amavisd_client.wire.ampdp import Decoder, encode_block


class LineSession(Session):
    """A trivial line protocol: `ECHO x` -> `OK x`, `ID` -> `OK <log id>` (from
    the handler: the worker's pid), `QUIT` -> `BYE` and the end; anything
    else -> `ERR`."""

    label = "LINE"
    max_request_bytes = 64

    def __init__(self, conn, handler):
        super().__init__(conn, handler)
        self.buffer = b""
        self.answering = False

    def greeting(self) -> bytes:
        return b"HELLO line\n"

    def receive(self, data: bytes) -> None:
        self.buffer += data

    def request_ready(self) -> bool:
        return b"\n" in self.buffer

    def mid_request(self) -> bool:
        return bool(self.buffer) and not self.request_ready()

    def answer(self) -> bytes:
        line, _, self.buffer = self.buffer.partition(b"\n")
        verb, _, argument = line.decode().strip().partition(" ")
        if verb == "ECHO":
            return f"OK {argument}\n".encode()
        if verb == "ID":
            return f"OK {self.handler.next_log_id()}\n".encode()
        if verb == "QUIT":
            self.closing = True
            return b"BYE\n"
        return b"ERR unknown\n"

    def oversize(self) -> bytes:
        return b"ERR too long\n"

    def last_words(self, reason: str) -> bytes:
        return f"ERR {reason}\n".encode() if self.answering else b""


@pytest.fixture
def line_protocol(monkeypatch):
    """The registry with "line" added, for this test only."""
    monkeypatch.setattr(registry, "PROTOCOLS", dict(registry.PROTOCOLS))
    registry.register("line", LineSession)
    return "line"


@pytest.fixture
def home():
    """Short (AF_UNIX paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="amdp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings(home: Path) -> dict:
    return {"workdir": str(home), "workers": 2, "socket": str(home / "ampdp.sock"),
            "log_to": [], "log_file": str(home / "amavisd.log"), "log_level": "debug",
            "child_timeout": 30.0, "graceful_timeout": 5.0, "user": "", "group": ""}


def start_master(home: Path, listeners: list[Listener]) -> int:
    """A real master (and its real workers) in a child process; its pid."""
    overrides = settings(home)
    config = configuration.load(None, overrides)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            logs.setup(config, stderr=False)
            code = Arbiter(config, listeners, None, overrides, log_to_stderr=False).run()
        finally:
            os._exit(code)
    for listener in listeners:  # the master holds them now
        listener.close()
    return pid


def stop_master(pid: int, timeout: float = 10.0) -> int | None:
    """TERM the master and reap it; its exit code (None if it had to be killed)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return reap(pid, timeout)


def reap(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def talk(path: str, data: bytes, timeout: float = 15.0) -> bytes:
    """Connect (the connection waits in the backlog until a worker has booted),
    send `data` and EOF, read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def workers_of(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def wait_for_log(home: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log_text = (home / "amavisd.log").read_text(errors="replace")
        if text in log_text:
            return log_text
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{log_text[-3000:]}")


def test_a_new_protocol_is_served_by_the_workers_beside_ampdp(home, line_protocol):
    line_path, ampdp_path = str(home / "line.sock"), str(home / "ampdp.sock")
    master = start_master(home, [Listener(bind_unix(line_path, 0o600), line_protocol),
                                 Listener(bind_unix(ampdp_path, 0o600), AMPDP)])
    try:
        reply = talk(line_path, b"ECHO hello\nID\nQUIT\nECHO never answered\n")
        greeting, echo, log_id, bye = reply.decode().splitlines()
        assert (greeting, echo, bye) == ("HELLO line", "OK hello", "BYE")
        worker_pid = int(log_id.removeprefix("OK ").split("-")[0])
        assert worker_pid in workers_of(master)  # a pre-forked worker, not the master

        (ampdp,) = Decoder().feed(talk(ampdp_path, encode_block([("request", "AM.CL")])))
        assert ampdp.get("return_value") == "tempfail"
        assert "unsupported request 'AM.CL'" in ampdp.get("setreply")

        # Explicit worker states, each change logged (at debug level).
        wait_for_log(home, ": booting -> serving (heartbeat moved)")
        os.kill(master, signal.SIGHUP)
        wait_for_log(home, ": serving -> retiring (HUP: old generation)")
    finally:
        code = stop_master(master)
    assert code == 0
    log_text = (home / "amavisd.log").read_text()
    assert "-> stopping (master stopping)" in log_text
    assert "-> exited (exit status 0)" in log_text
    assert not os.path.exists(line_path)  # removed at stop, like the AM.PDP socket


def test_a_listener_whose_tag_names_no_protocol_halts_the_boot(home):
    path = str(home / "odd.sock")
    master = start_master(home, [Listener(bind_unix(path, 0o600), "nosuch")])
    code = reap(master, 20.0)
    assert code == EXIT_HALTED
    log_text = (home / "amavisd.log").read_text()
    assert (f"listener nosuch:unix:{path}: no protocol registered as 'nosuch' "
            "(known: ampdp, lmtp, smtp)") in log_text


def test_a_tag_is_registered_once(line_protocol):
    with pytest.raises(ValueError, match="'line' is already registered"):
        registry.register("line", LineSession)
    with pytest.raises(ValueError, match="'ampdp' is already registered"):
        registry.register("ampdp", LineSession)
    assert registry.session_class("line") is LineSession
    with pytest.raises(registry.UnknownProtocol):
        registry.session_class("nosuch")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_configured_listeners_all_speak_ampdp(home):
    port = free_port()
    config = configuration.load(None, settings(home) | {"tcp_listen": f"127.0.0.1:{port}"})
    listeners = bind_all(config)
    try:
        assert [listener.protocol for listener in listeners] == ["ampdp", "ampdp"]
        assert registry.session_class(AMPDP) is registry.PROTOCOLS["ampdp"]
        assert describe(listeners[0]) == f"unix:{home / 'ampdp.sock'}"
        assert describe(listeners[1]) == f"tcp:127.0.0.1:{port}"
    finally:
        for listener in listeners:
            listener.close()


class Quiet:
    """A handler with nothing to do: the loop's own behaviour is under test."""

    def __init__(self):
        self.replies = 0

    def next_log_id(self):
        return "1-01"

    def handle_reply_sent(self):
        self.replies += 1

    def keep_going(self):
        return True


def drive(wire: bytes, limits: ConnectionLimits | None = None) -> tuple[bytes, int, Quiet]:
    server, client = socket.socketpair()
    handler = Quiet()
    client.sendall(wire)
    client.shutdown(socket.SHUT_WR)
    answered = serve(LineSession(server, handler), limits or ConnectionLimits(2, 2, 10))
    server.close()
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    client.close()
    return data, answered, handler


def test_the_loop_greets_answers_and_ends_where_the_protocol_says():
    data, answered, handler = drive(b"ECHO a\nNOPE\nQUIT\nECHO b\n")
    assert data == b"HELLO line\nOK a\nERR unknown\nBYE\n"
    assert answered == handler.replies == 3


def test_the_loop_answers_an_oversized_request_and_hangs_up():
    data, answered, _ = drive(b"ECHO " + b"x" * 100)
    assert data == b"HELLO line\nERR too long\n" and answered == 0


def test_the_loop_keeps_to_max_connection_requests():
    data, answered, _ = drive(b"ECHO a\n" * 5, ConnectionLimits(2, 2, max_requests=2))
    assert data == b"HELLO line\nOK a\nOK a\n" and answered == 2


def test_last_words_reach_the_client_only_mid_answer():
    server, client = socket.socketpair()
    session = LineSession(server, Quiet())
    send_last_words(session, "too slow")  # nothing in flight: nothing said
    session.answering = True
    send_last_words(session, "too slow")
    server.close()
    assert client.recv(100) == b"ERR too slow\n"
    client.close()
