"""The doorman under attack, in a real daemon: descriptors run out, floods, a stop.

What a postmaster needs: no message lost (every client gets a reply, or
end-of-file it tempfails on, never a hang), no master spinning or flooding
the log, no descriptor leaked by the master. Figures are printed (-s).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message
from amavisd_client.wire.ampdp import Decoder, encode_block
from tests.rigs.daemon import DaemonInstance

pytestmark = pytest.mark.integration

TICK = os.sysconf("SC_CLK_TCK")
CLEAN = "continue"  # return_value for a clean message, delivery_care_of client


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included, its children not)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def open_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def spool(daemon: DaemonInstance, name: str) -> Path:
    job = Path(daemon.tempbase) / name
    job.mkdir(mode=0o750)
    (job / "email.txt").write_bytes(clean_message())
    return job


def block(job: Path) -> bytes:
    """The AM.PDP request for a spooled message."""
    return encode_block([
        ("request", "AM.PDP"), ("tempdir", str(job)), ("tempdir_removed_by", "server"),
        ("mail_file", str(job / "email.txt")), ("sender", "<a@example.test>"),
        ("recipient", "<b@example.test>"), ("delivery_care_of", "client")])


def request(socket_path: str, job: Path, timeout: float = 30.0) -> str | None:
    """One raw AM.PDP request: its return_value, None if the server hung up
    first (a real client tempfails then), or raises on a hang (timeout)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(block(job))
        decoder = Decoder()
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            for reply in decoder.feed(data):
                return reply.get("return_value")


class Clients:
    """`count` requests in threads, each on its own connection."""

    def __init__(self, daemon: DaemonInstance, count: int, tag: str, timeout: float = 30.0):
        self.results: list[str | None | Exception] = [None] * count
        self.done: list[float] = [0.0] * count
        jobs = [spool(daemon, f"{tag}-{n}") for n in range(count)]
        self.threads = [threading.Thread(target=self._one, args=(n, daemon.socket_path, job,
                                                                 timeout))
                        for n, job in enumerate(jobs)]
        for thread in self.threads:
            thread.start()

    def _one(self, n: int, path: str, job: Path, timeout: float) -> None:
        try:
            self.results[n] = request(path, job, timeout)
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.results[n] = err
        self.done[n] = time.monotonic()

    def join(self, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a client hangs"
        return self.results


@pytest.fixture
def daemon(short_tmp, clamd_nodecomp):
    instance = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                              max_requests=0)
    instance.start()
    instance.wait_for_workers(1)
    yield instance
    instance.stop()


def settled_fds(pid: int, expected: set[int], seconds: float = 5.0) -> set[int]:
    """The master's descriptors once what it held is gone (or after `seconds`)."""
    deadline = time.monotonic() + seconds
    while (now := open_fds(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def test_out_of_descriptors_the_doorman_rests_instead_of_spinning(daemon):
    """EMFILE on accept with nothing of ours to close: the listeners are left
    alone for a back-off (not polled at once again), one log line now and then,
    and every client waiting in the backlog is served once descriptors free up."""
    master = daemon.pid
    assert request(daemon.socket_path, spool(daemon, "warm")) == CLEAN
    before = settled_fds(master, open_fds(master))
    lowest_free = min(set(range(len(before) + 1)) - before)
    soft, hard = resource.prlimit(master, resource.RLIMIT_NOFILE)
    resource.prlimit(master, resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        clients = Clients(daemon, 12, "emfile")
        time.sleep(0.5)  # all in the backlog: accept() fails for each
        cpu = cpu_seconds(master)
        time.sleep(3.0)
        spent = cpu_seconds(master) - cpu
    finally:
        resource.prlimit(master, resource.RLIMIT_NOFILE, (soft, hard))
    restored = time.monotonic()
    results = clients.join(30)
    waited = max(clients.done) - restored
    log = daemon.log_text()
    lines = log.count("cannot accept")
    print(f"\nEMFILE for 3 s, 12 clients in the backlog: master CPU {spent:.2f} s, "
          f"{lines} log line(s); all served {waited:.2f} s after the limit was restored")
    assert results == [CLEAN] * 12, results  # none lost
    assert spent < 0.3, f"the master spun: {spent:.2f} CPU seconds in 3 s"
    assert 1 <= lines <= 3, lines
    assert "Too many open files" in log
    assert settled_fds(master, before) == before  # no descriptor leaked


def test_a_flood_leaks_no_descriptor_in_the_master(short_tmp, clamd_nodecomp):
    """Silent, trickling, half-closed and vanishing connections past the cap:
    once they are gone, the master holds exactly what it held before."""
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            max_pending_connections=16, client_idle_timeout=1.0,
                            request_timeout=1.0)
    daemon.start()
    try:
        daemon.wait_for_workers(1)
        master = daemon.pid
        assert request(daemon.socket_path, spool(daemon, "warm")) == CLEAN
        before = settled_fds(master, open_fds(master))
        socks = []
        for n in range(60):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(daemon.socket_path)
            kind = n % 4
            try:
                if kind == 1:
                    sock.send(b"request=AM.PDP\r\n")  # trickling: never whole
                elif kind == 2:
                    sock.send(b"request=AM.PDP\r\n")
                    sock.shutdown(socket.SHUT_WR)  # half-closed mid-request
            except (BrokenPipeError, ConnectionResetError):
                pass  # past the cap the oldest are dropped: this one already was
            if kind == 3:
                sock.close()  # gone before a word
                continue
            socks.append(sock)
        time.sleep(0.3)
        assert len(open_fds(master) - before) <= 16  # the cap holds
        for sock in socks:
            sock.close()
        assert request(daemon.socket_path, spool(daemon, "after")) == CLEAN
        assert settled_fds(master, before) == before
    finally:
        daemon.stop()


def test_recycled_workers_lose_no_queued_connection(short_tmp, clamd_nodecomp):
    """max_requests 1: every worker leaves after one message while others
    wait in the queue; each client gets its reply from the next worker."""
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            max_requests=1, max_requests_jitter=0)
    daemon.start()
    try:
        daemon.wait_for_workers(1)
        results = Clients(daemon, 6, "recycle").join(60)
        assert results == [CLEAN] * 6, results
    finally:
        daemon.stop()


def test_a_stop_hangs_up_at_once_on_connections_no_worker_will_take(daemon):
    """TERM: the workers finish what they serve and take nothing more; the
    connections waiting in the queue get end-of-file at once (their clients
    tempfail and retry), not after graceful_timeout (10 s here)."""
    (worker,) = daemon.wait_for_workers(1)
    os.kill(worker, signal.SIGSTOP)  # idle, taking nothing: the requests queue up
    try:
        clients = Clients(daemon, 3, "stop")
        time.sleep(1.0)  # whole and queued
        stopped = time.monotonic()
        daemon.signal(signal.SIGTERM)
        results = clients.join(15)
        waited = max(clients.done) - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed after graceful_timeout
            os.kill(worker, signal.SIGCONT)
    print(f"\nTERM with 3 queued connections: hung up after {waited:.2f} s")
    assert results == [None] * 3, results  # end-of-file: the client tempfails
    assert waited < 3.0, waited



def test_pipelined_requests_with_a_half_close_each_get_their_reply(daemon):
    """Two requests in one write, then SHUT_WR at once: the doorman passes the
    connection on the first, the worker answers both (end-of-file after a
    whole request is no reason to drop the second)."""
    blocks = [block(spool(daemon, f"pipe{n}")) for n in range(2)]
    replies = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(daemon.socket_path)
        sock.sendall(b"".join(blocks))
        sock.shutdown(socket.SHUT_WR)
        decoder = Decoder()
        while data := sock.recv(65536):
            replies += [reply.get("return_value") for reply in decoder.feed(data)]
    assert replies == [CLEAN, CLEAN], replies


def test_a_reload_keeps_what_the_doorman_holds(daemon):
    """HUP with the doorman running: a connection held (silent) across the
    reload is served by the new generation once it speaks; none is dropped."""
    (old,) = daemon.wait_for_workers(1)
    job = spool(daemon, "hup")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(daemon.socket_path)
        time.sleep(0.3)  # held by the doorman, silent
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_workers(1, exclude={old})
        sock.sendall(block(job))
        decoder = Decoder()
        replies = []
        while not replies and (data := sock.recv(65536)):
            replies = [reply.get("return_value") for reply in decoder.feed(data)]
    assert replies == [CLEAN], replies


def big_block(job: Path, size: int, end: bytes = b"\r\n") -> bytes:
    """An AM.PDP request for a spooled message, with recipients up to `size`
    bytes; `end`: b"" for one that never ends."""
    head = block(job)[:-2]  # without its empty line
    lines = [head]
    total, n = len(head), 0
    while total < size:
        line = b"recipient=<recipient-%06d@a-rather-long-domain-name.example.test>\r\n" % n
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines) + end


def test_requests_that_stop_past_the_peek_window_hold_no_worker(short_tmp, clamd_nodecomp):
    """Issue 17: more clients than workers each send 64 KiB and a bit of a
    request, then nothing. A peek cannot tell them from a big request whose
    client waits for us to read; passed on, each held the one worker for
    request_timeout. The doorman reads on and holds them itself: a real
    request meanwhile is answered at once, and they are closed
    request_timeout after their first byte."""
    timeout = 3.0
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            max_requests=0, request_timeout=timeout)
    daemon.start()
    try:
        daemon.wait_for_workers(1)
        stalled = []
        for n in range(4):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(daemon.socket_path)
            sock.sendall(big_block(spool(daemon, f"stall{n}"), 64 * 1024 + 1000, end=b""))
            stalled.append(sock)
        sent = time.monotonic()
        time.sleep(0.3)
        started = time.monotonic()
        assert request(daemon.socket_path, spool(daemon, "real"), timeout=30) == CLEAN
        waited = time.monotonic() - started
        closed = []
        for sock in stalled:
            sock.settimeout(timeout + 3)
            assert sock.recv(100) == b""  # end-of-file, no reply: the client tempfails
            closed.append(time.monotonic() - sent)
        print(f"\n4 requests stopped past 64 KiB, 1 worker: a real request answered in "
              f"{waited * 1000:.0f} ms; the 4 closed after {min(closed):.1f}-{max(closed):.1f} s")
        assert waited < 1.0, waited
        assert max(closed) < timeout + 1.5, closed
        for sock in stalled:
            sock.close()
    finally:
        daemon.stop()


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """sendall, for a thread: the server may hang up before the end."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_a_one_mib_request_is_answered(daemon):
    """15,000 recipients (1 MiB, far past the peek window and the client's
    send buffer): read by the doorman, answered by the worker from the bytes
    it was given; a request past max_request_bytes gets a clear refusal, at
    once (not request_timeout later)."""
    data = big_block(spool(daemon, "big"), 1 << 20)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket_path)
        started = time.monotonic()
        sock.sendall(data)
        decoder = Decoder()
        replies = []
        while not replies and (chunk := sock.recv(65536)):
            replies = list(decoder.feed(chunk))
        took = time.monotonic() - started
    print(f"\n1 MiB request ({data.count(b'recipient=')} recipients): answered in {took:.2f} s")
    assert [reply.get("return_value") for reply in replies] == [CLEAN], replies
    huge = big_block(spool(daemon, "huge"), 4 * 1024 * 1024 + 100_000, end=b"")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket_path)
        started = time.monotonic()
        threading.Thread(target=send_quietly, args=(sock, huge), daemon=True).start()
        decoder = Decoder()
        replies = []
        while not replies and (chunk := sock.recv(65536)):
            replies = list(decoder.feed(chunk))
        took = time.monotonic() - started
    assert [reply.get("return_value") for reply in replies] == ["tempfail"], replies
    assert "too large" in replies[0].get("setreply", ""), replies
    assert took < 5.0, took


def test_clients_silent_after_one_request_do_not_hold_the_workers(daemon):
    """Review of issue 17: the doorman holds first requests, but a client
    that sends one cheap request and then keeps silent held the worker for
    client_idle_timeout (10 s here), again and again; two of them, one
    worker: a real request waited 10-20 s. Between requests a worker now
    gives its silent client up once others wait: the real request is
    answered at once, and the silent clients see end-of-file (ours reconnect)."""
    squatters = []
    for n in range(2):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(20)
        sock.connect(daemon.socket_path)
        sock.sendall(block(spool(daemon, f"squat{n}")))
        squatters.append(sock)
    assert [Decoder().feed(sock.recv(65536))[0].get("return_value")
            for sock in squatters[:1]] == [CLEAN]  # answered: now silent, holding the worker
    started = time.monotonic()
    assert request(daemon.socket_path, spool(daemon, "real"), timeout=30) == CLEAN
    waited = time.monotonic() - started
    print(f"\n2 clients silent after a request, 1 worker: a real request answered in "
          f"{waited * 1000:.0f} ms (client_idle_timeout 10 s)")
    assert waited < 2.0, waited
    for sock in squatters:
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass  # the second one's reply, then end-of-file
        sock.close()


def memfds(pid: int) -> list[str]:
    links = []
    for fd in open_fds(pid):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [link for link in links if link.startswith("/memfd:")]


def test_requests_read_by_the_doorman_leak_nothing_whatever_their_end(short_tmp,
                                                                      clamd_nodecomp):
    """Review of issue 17: first requests past the peek window that vanish
    half-read, expire, or end whole with a client that leaves before its
    reply, across a HUP: once they are gone the master holds exactly the
    descriptors it held before (no connection, no memfd), and a real
    request is still answered."""
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1,
                            max_requests=0, request_timeout=1.5)
    daemon.start()
    try:
        (old,) = daemon.wait_for_workers(1)
        master = daemon.pid
        assert request(daemon.socket_path, spool(daemon, "warm")) == CLEAN
        before = settled_fds(master, open_fds(master))
        kept = []
        for n in range(12):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(daemon.socket_path)
            whole = n % 3 == 2
            data = big_block(spool(daemon, f"read{n}"), 100 * 1024, b"\r\n" if whole else b"")
            send_quietly(sock, data)
            if n % 3 == 0:
                sock.close()  # vanishes half-read
            else:
                kept.append(sock)  # expires at request_timeout, or whole: to a worker
        daemon.signal(signal.SIGHUP)  # with reads in progress
        daemon.wait_for_workers(1, exclude={old})
        time.sleep(2.5)  # past request_timeout
        for sock in kept:
            sock.close()  # the whole ones leave before their reply
        assert request(daemon.socket_path, spool(daemon, "after")) == CLEAN
        # the new generation's heartbeat file may take another number: count them
        deadline = time.monotonic() + 10.0
        while len(open_fds(master)) != len(before) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(open_fds(master)) == len(before), (open_fds(master), before)
        assert not memfds(master)
    finally:
        daemon.stop()


def test_a_silent_smtp_client_gives_way_with_a_421(short_tmp, clamd_nodecomp):
    """SMTP connections go to a worker at once: a local user of the filter
    port, silent after EHLO, held it for smtp_idle_timeout (300 s). While
    others wait it now gets a 421 after a second of silence."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = DaemonInstance(short_tmp / "d", clamd_nodecomp.address, workers=1, max_requests=0,
                            smtp_listen=[f"127.0.0.1:{port}"])
    daemon.start()
    try:
        daemon.wait_for_workers(1)
        with socket.create_connection(("127.0.0.1", port)) as squat:
            squat.settimeout(10)
            assert squat.recv(200).startswith(b"220")
            squat.sendall(b"EHLO x\r\n")
            time.sleep(0.3)
            started = time.monotonic()
            assert request(daemon.socket_path, spool(daemon, "real")) == CLEAN
            assert time.monotonic() - started < 2.5  # was smtp_idle_timeout (300 s)
            said = b""
            while chunk := squat.recv(4096):
                said += chunk
        assert b"\r\n421 4.3.2 " in said, said
    finally:
        daemon.stop()


def test_a_stop_does_not_wait_for_a_silent_kept_client(daemon):
    """A worker told to leave (TERM, a stop or a restart) while its client is
    silent between requests hung up only at client_idle_timeout (10 s here),
    so every stop took that long with a kept connection open (the milter
    keeps its connections). It now gives the client up as when others wait."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket_path)
        sock.sendall(block(spool(daemon, "kept")))
        assert Decoder().feed(sock.recv(65536))[0].get("return_value") == CLEAN
        started = time.monotonic()
        assert daemon.stop() == 0
        took = time.monotonic() - started
        assert sock.recv(65536) == b""  # hung up on, no half reply
    print(f"\nstop with a silent kept client: {took:.2f} s (client_idle_timeout 10 s)")
    assert took < 3.0, took
