"""The doorman with real sockets: who is passed on, who is held, who is hung up on."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from typing import NamedTuple

import pytest

from amavisd.doorman import Doorman, handout
from amavisd.listeners import AMPDP, Listener


def listening(path) -> Listener:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@pytest.fixture
def door(tmp_path):
    listeners = [Listener(listening(tmp_path / "ampdp.sock"), AMPDP),
                 Listener(listening(tmp_path / "smtp.sock"), "smtp")]
    doorman = Doorman(listeners, idle_timeout=1.0, cap=4)
    doorman.start()
    yield doorman, [str(tmp_path / "ampdp.sock"), str(tmp_path / "smtp.sock")]
    doorman.stop()
    doorman.close()
    for listener in listeners:
        listener.close()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    return sock


class Taken(NamedTuple):
    index: int
    conn: socket.socket
    first: bytes


def take(doorman: Doorman, timeout: float) -> Taken | None:
    """What a worker does (`handout.take`, its own code): one connection from
    the queue, with its listener's index and what the doorman read of it."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([doorman.queue], [], [], left)[0]:
            got = handout.take(doorman.queue)
            if got is not None:
                return Taken(got.index, got.connection(), got.first)
    return None


def request_of(got: Taken) -> bytes:
    """The first request as the worker's session sees it: what the doorman
    read, then what is still in the socket (a whole request at the first
    look: all of it, unread)."""
    try:
        rest = got.conn.recv(100_000, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        rest = b""
    return got.first + rest


def hung_up(sock: socket.socket, seconds: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(seconds * 1000))


def test_a_client_that_speaks_is_passed_with_its_listener_and_silence_is_not(door):
    doorman, (ampdp, smtp) = door
    silent, speaking = connect(ampdp), connect(ampdp)
    assert take(doorman, 0.3) is None  # nothing said yet: no worker bothered
    speaking.sendall(b"request=AM.PDP\n\n")
    got = take(doorman, 2.0)
    assert got.index == 0 and got.first == b""  # whole at the first look: not read
    conn = got.conn
    assert conn.recv(100, socket.MSG_PEEK) == b"request=AM.PDP\n\n"
    conn.sendall(b"reply\n")
    assert speaking.recv(100) == b"reply\n"  # the very connection
    greeted = connect(smtp)  # the server speaks first: passed at once
    got = take(doorman, 2.0)
    assert got.index == 1
    conn2 = got.conn
    assert take(doorman, 0.2) is None and not hung_up(silent, 0.1)
    for sock in (silent, speaking, conn, greeted, conn2):
        sock.close()


def test_silent_connections_are_closed_after_the_idle_timeout(door):
    doorman, (ampdp, _) = door
    started = time.monotonic()
    silent = connect(ampdp)
    assert hung_up(silent, 3.0)
    assert 0.9 < time.monotonic() - started < 2.0
    assert silent.recv(10) == b""
    assert doorman.held == 0 and take(doorman, 0.1) is None
    silent.close()


def test_at_the_cap_the_oldest_silent_connection_goes(door):
    doorman, (ampdp, _) = door
    first = [connect(ampdp) for _ in range(4)]
    time.sleep(0.2)
    newer = [connect(ampdp) for _ in range(2)]
    assert hung_up(first[0], 0.5) and hung_up(first[1], 0.5)
    assert not any(hung_up(sock, 0.05) for sock in first[2:] + newer)
    assert doorman.held == 4
    for sock in first + newer:
        sock.close()


def test_a_lower_cap_on_reload_holds_at_once(door):
    """The accept path trims only when it holds one more: a reload that
    lowers max_pending_connections closes the oldest there and then, not at
    some later silent client."""
    doorman, (ampdp, _) = door
    held = [connect(ampdp) for _ in range(4)]
    deadline = time.monotonic() + 2.0
    while doorman.held < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    doorman.configure(idle_timeout=1.0, cap=2, request_timeout=30.0)
    assert doorman.held == 2
    assert hung_up(held[0], 0.5) and hung_up(held[1], 0.5)
    assert not any(hung_up(sock, 0.05) for sock in held[2:])
    speaking = connect(ampdp)  # a whole request still goes through at the cap
    speaking.sendall(b"request=AM.PDP\n\n")
    got = take(doorman, 2.0)  # (accepted before its request came, it made room as a silent one)
    assert got is not None and doorman.held <= 2
    for sock in (*held, speaking, got.conn):
        sock.close()


def test_a_worker_forked_meanwhile_keeps_no_copy_of_a_held_connection(door):
    doorman, (ampdp, _) = door
    silent = connect(ampdp)
    time.sleep(0.2)  # held now
    held_fds = [fd for fd in doorman.silent]
    with doorman.forking():
        pid = os.fork()
    if pid == 0:
        doorman.forget_in_child()
        still = [fd for fd in held_fds if _open(fd)]
        time.sleep(2.0)  # outlive the idle timeout: our copy must not keep it open
        os._exit(len(still))
    assert hung_up(silent, 3.0)  # the doorman's close reached the client
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    silent.close()


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_doorman_that_died_of_a_bug_is_replaced(door, monkeypatch):
    doorman, (ampdp, _) = door

    def a_bug(*args: object) -> None:  # fault injection: a bug in accept, once
        monkeypatch.undo()
        raise RuntimeError("injected")

    monkeypatch.setattr(doorman, "_accept", a_bug)
    lost = connect(ampdp)
    doorman.thread.join(2.0)
    assert not doorman.thread.is_alive()
    doorman.watch()  # what the master's loop does every turn
    assert doorman.thread.is_alive()
    client = connect(ampdp)
    client.sendall(b"request=AM.PDP\n\n")
    got = take(doorman, 2.0)
    assert got is not None  # the new thread serves (`lost` too, if it is still queued)
    for sock in (lost, client, got.conn):
        sock.close()


def test_a_request_is_passed_only_once_whole_and_a_trickler_never(tmp_path):
    listener = Listener(listening(tmp_path / "a.sock"), AMPDP)
    doorman = Doorman([listener], idle_timeout=5.0, cap=8, request_timeout=1.0)
    doorman.start()
    try:
        pieces = connect(str(tmp_path / "a.sock"))
        trickler = connect(str(tmp_path / "a.sock"))
        trickler.sendall(b"request=AM.PDP\r\n")
        pieces.sendall(b"request=AM.PDP\r\nsender=<a@b.example>\r\n")
        assert take(doorman, 0.3) is None  # neither is whole
        started = time.monotonic()
        pieces.sendall(b"\r\n")
        got = take(doorman, 1.0)
        assert time.monotonic() - started < 0.1  # read again within milliseconds
        assert request_of(got) == b"request=AM.PDP\r\nsender=<a@b.example>\r\n\r\n"
        conn = got.conn
        assert hung_up(trickler, 1.5)  # request_timeout from its first byte
        assert take(doorman, 0.1) is None
        for sock in (pieces, trickler, conn):
            sock.close()
    finally:
        doorman.stop()
        doorman.close()
        listener.close()


@pytest.mark.parametrize("data, whole", [
    (b"request=AM.PDP\n\n", True), (b"request=AM.PDP\r\n\r\n", True),
    (b"\r\n\r\nrequest=AM.PDP\r\n", False), (b"request=AM.PDP\r\nsender=<a>", False),
    (b"\n\n\n", False),
])
def test_when_an_ampdp_request_is_whole(data, whole):
    from amavisd.doorman.first_request import ampdp_request_complete

    assert ampdp_request_complete(data) is whole


def test_a_full_queue_never_blocks_the_doorman(tmp_path):
    """More whole requests than the queue holds (its send buffer: about 280
    hand-outs) while no worker takes any: the doorman must keep its lock free
    (the master forks under it) and keep the rest, passing them all once the
    workers take again. (Python 3.11's send_fds ignores its flags:
    a blocking send here froze the doorman and, at the next fork, the master.)"""
    listener = Listener(listening(tmp_path / "a.sock"), AMPDP)
    listener.sock.listen(512)
    doorman = Doorman([listener], idle_timeout=30.0, cap=512)
    doorman.start()
    clients = []
    try:
        for n in range(320):
            sock = connect(str(tmp_path / "a.sock"))
            sock.sendall(b"request=AM.PDP\nn=%d\n\n" % n)
            clients.append(sock)
        time.sleep(0.5)
        assert doorman.lock.acquire(timeout=2.0), "the doorman is blocked holding its lock"
        doorman.lock.release()
        assert doorman.held > 0  # what the queue could not take is kept, not closed
        assert doorman.queued + doorman.held == 320  # the queue's depth is seen too
        order = []
        while (got := take(doorman, 2.0)) is not None:
            order.append(int(request_of(got).split(b"n=")[1].split(b"\n")[0]))
            got.conn.close()
        # every one, once (the order is that of whole requests, not of connects)
        assert sorted(order) == list(range(320))
        assert doorman.held == 0
    finally:
        while take(doorman, 0.5) is not None:  # a blocked doorman gets going again
            pass
        for sock in clients:
            sock.close()
        doorman.stop()
        doorman.close()
        listener.close()



def test_the_passed_connection_keeps_the_clients_credentials_and_door(short_tmp):
    """What the worker checks (SO_PEERCRED for the files a request names,
    getsockname for interface_policy) is the connection's own: unchanged by
    the hand-over. The client is a child under another uid."""
    import struct

    from amavisd.policy.banks import listener_keys

    listener = Listener(listening(short_tmp / "a.sock"), AMPDP)
    os.chmod(short_tmp / "a.sock", 0o777)
    doorman = Doorman([listener], idle_timeout=5.0, cap=8)
    doorman.start()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = connect(str(short_tmp / "a.sock"))
            sock.sendall(b"request=AM.PDP\n\n")
            sock.recv(10)
        finally:
            os._exit(0)
    try:
        conn = take(doorman, 3.0).conn
        _, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          12))
        assert (uid, gid) == (65534, 65534)
        assert listener_keys(conn) == ("SOCK", str(short_tmp / "a.sock"))
        conn.sendall(b"ok")
        conn.close()
    finally:
        os.waitpid(pid, 0)
        doorman.stop()
        doorman.close()
        listener.close()


# -- a first request not whole at the first look: read on (issue 17) ----------------


def recipients(size: int, end: bytes = b"\r\n") -> bytes:
    """An AM.PDP request of about `size` bytes, many recipients; `end`: b"" for
    one that never ends."""
    data = bytearray(b"request=AM.PDP\r\n")
    n = 0
    while len(data) < size:
        data += b"recipient=<user%06d@example.test>\r\n" % n
        n += 1
    return bytes(data + end)


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    """sendall in a thread: a client blocked on its full send buffer until
    the doorman reads (an error is the test's to see: the hang-up)."""
    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def big_door(tmp_path):
    """One AM.PDP listener; a small read budget (300 KiB) to see it spent."""
    listener = Listener(listening(tmp_path / "a.sock"), AMPDP)
    doorman = Doorman([listener], idle_timeout=5.0, cap=16, request_timeout=1.5,
                      read_budget=300 * 1024)
    doorman.start()
    yield doorman, str(tmp_path / "a.sock")
    doorman.stop()
    doorman.close()
    listener.close()


def test_a_big_request_is_read_and_handed_out_with_its_bytes(big_door):
    """1 MiB of recipients: far past the first look and the client's send
    buffer. The worker gets the connection and every byte of the request,
    in order, nothing left in the socket; the budget is all given back."""
    doorman, path = big_door
    doorman.reading.budget = 8 << 20
    data = recipients(1 << 20)
    client = connect(path)
    started = time.monotonic()
    sender = send_in_background(client, data)
    got = take(doorman, 3.0)
    waited = time.monotonic() - started
    sender.join(2.0)
    assert got is not None and got.index == 0
    assert got.first == data
    got.conn.setblocking(False)
    with pytest.raises(BlockingIOError):
        got.conn.recv(1)  # the socket has nothing more: the doorman read it all
    got.conn.sendall(b"reply\n")
    assert client.recv(10) == b"reply\n"  # the very connection
    assert waited < 1.0, waited
    with doorman.lock:  # the hand-out's accounting is done (a worker may take it before)
        assert doorman.reading.spent == 0 and doorman.outbox.spilled_now() == 0
        assert doorman.held == 0
    for sock in (client, got.conn):
        sock.close()


def test_a_request_that_stops_past_the_window_holds_no_worker(big_door):
    """64 KiB and a bit, then nothing: never in the queue (a worker would have
    waited request_timeout on it); closed request_timeout after its first byte,
    its bytes given back to the budget. A whole request meanwhile goes at once."""
    doorman, path = big_door
    stalled = [connect(path) for _ in range(3)]
    for sock in stalled:
        sock.sendall(recipients(64 * 1024 + 1000, end=b""))
    started = time.monotonic()
    assert take(doorman, 0.3) is None
    assert len(doorman.reading.held) == 3 and doorman.reading.spent > 3 * 64 * 1024
    real = connect(path)
    real.sendall(b"request=AM.PDP\r\n\r\n")
    got = take(doorman, 0.5)
    assert got is not None and got.first == b""  # a small one: only peeked
    assert all(hung_up(sock, 2.5) for sock in stalled)
    assert 1.4 < time.monotonic() - started < 2.5
    assert doorman.reading.spent == 0 and doorman.held == 0
    assert take(doorman, 0.1) is None
    for sock in (*stalled, real, got.conn):
        sock.close()


def test_a_request_written_a_line_at_a_time_is_handed_out_whole(big_door):
    """2,000 recipients, one write each (70 KiB): each write is a buffer of its
    own in the kernel, so the client's send buffer is full after ~300 of them,
    long before any peek window: only reading lets it finish (peeked, it
    waited for request_timeout and was closed unserved)."""
    doorman, path = big_door
    lines = recipients(70 * 1024).splitlines(keepends=True)
    client = connect(path)

    def write() -> None:
        with contextlib.suppress(OSError):
            for line in lines:
                client.send(line)

    threading.Thread(target=write, daemon=True).start()
    got = take(doorman, 2.0)
    assert got is not None and request_of(got) == b"".join(lines)
    for sock in (client, got.conn):
        sock.close()


def test_a_client_sending_a_byte_at_a_time_costs_the_doorman_little(big_door):
    """Ten clients past their first bytes send one byte per write as fast as
    they can, for 1.5 s, from another process: the doorman reads each at most
    every 50 ms (the bytes wait in the kernel meanwhile), not once a byte."""
    doorman, path = big_door
    conns = [connect(path) for _ in range(10)]
    for sock in conns:
        sock.sendall(b"request=AM.PDP\r\n")
    time.sleep(0.1)
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        with open(f"/proc/self/task/{doorman.thread.native_id}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    before = cpu()
    with doorman.forking():
        pid = os.fork()
    if pid == 0:
        doorman.forget_in_child()  # a copy of a held one would stay open when it is closed
        sent = 0
        with contextlib.suppress(OSError):
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                for sock in conns:
                    sent += sock.send(b"x")
        os._exit(0 if sent > 1000 else 1)
    _, status = os.waitpid(pid, 0)
    spent = cpu() - before
    print(f"\n10 clients writing a byte at a time for 1.5 s: doorman CPU {spent:.2f} s")
    assert os.waitstatus_to_exitcode(status) == 0
    assert spent < 0.3, spent
    assert take(doorman, 0) is None
    for sock in conns:
        sock.close()


def test_when_the_read_budget_is_spent_the_one_idle_longest_goes(big_door):
    """Budget 300 KiB: two stalled requests of 100 KiB, then a real one of
    150 KiB. The older stalled one is closed to make room (not the real one,
    which is sending, nor passed on to a worker); the real one is handed out
    whole."""
    doorman, path = big_door
    older, newer = connect(path), connect(path)
    older.sendall(recipients(100 * 1024, end=b""))
    time.sleep(0.1)
    newer.sendall(recipients(100 * 1024, end=b""))
    time.sleep(0.1)
    data = recipients(150 * 1024)
    real = connect(path)
    sender = send_in_background(real, data)
    got = take(doorman, 1.0)
    sender.join(1.0)
    assert got is not None and got.first == data
    assert hung_up(older, 0.2)
    assert not hung_up(newer, 0.1) and len(doorman.reading.held) == 1
    for sock in (older, newer, real, got.conn):
        sock.close()


def test_bytes_in_the_queue_count_until_a_worker_takes_them(big_door):
    """A whole 200 KiB request waits in the queue (no worker takes it): its
    bytes are still the master's, so a 150 KiB one that stops finds the
    budget spent and is closed; once the first is taken, the next is read."""
    doorman, path = big_door
    first = connect(path)
    first.sendall(recipients(200 * 1024))
    time.sleep(0.2)
    with doorman.lock:
        assert doorman.queued == 1 and doorman.outbox.spilled_now() > 200 * 1024
    second = connect(path)
    send_in_background(second, recipients(150 * 1024, end=b""))
    assert hung_up(second, 1.0)  # no room, and nothing idle to close: this one goes
    got = take(doorman, 0.5)
    assert got is not None and len(got.first) > 200 * 1024
    with doorman.lock:
        assert doorman.outbox.spilled_now() == 0
    third = connect(path)
    data = recipients(150 * 1024)
    send_in_background(third, data)
    again = take(doorman, 1.0)
    assert again is not None and again.first == data
    for sock in (first, second, third, got.conn, again.conn):
        sock.close()


def test_a_request_past_max_request_bytes_is_passed_on_as_read(big_door):
    """4 MiB and more without an end: passed on with max_request_bytes + 1
    bytes (the worker refuses it as too large), not read for ever."""
    from amavisd.protocol.ampdp import MAX_REQUEST_BYTES

    doorman, path = big_door
    doorman.reading.budget = 8 << 20
    client = connect(path)
    send_in_background(client, recipients(MAX_REQUEST_BYTES + 200_000, end=b""))
    got = take(doorman, 3.0)
    assert got is not None and len(got.first) == MAX_REQUEST_BYTES + 1
    for sock in (client, got.conn):
        sock.close()


def test_a_spill_the_worker_cannot_read_closes_the_connection(tmp_path):
    """A hand-out whose second descriptor cannot be read (a directory here):
    the worker serves nothing cut short; its client sees end-of-file."""
    send, queue = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client, server = socket.socketpair()
    directory = os.open(tmp_path, os.O_RDONLY)
    try:
        socket.send_fds(send, [b"\x00"], [server.fileno(), directory])
        server.close()
        assert handout.take(queue) is None
        assert client.recv(10) == b""  # closed: the client tempfails and retries
    finally:
        os.close(directory)
        for sock in (send, queue, client):
            sock.close()


@pytest.mark.parametrize("data", [
    b"request=AM.PDP\n\n", b"request=AM.PDP\r\n\r\n", b"\r\n\r\nrequest=AM.PDP\r\n",
    b"request=AM.PDP\r\nsender=<a>", b"\n\n\n", b"\r\n\r\nrequest=AM.PDP\r\n\r\n",
    b"a=b\r\n\r", b"a=b\r\n\r\n\r\n",
])
def test_read_in_chunks_an_ampdp_request_ends_where_a_peek_says(data):
    from amavisd.doorman.first_request import AmpdpEnd, ampdp_request_complete

    for cut in range(len(data) + 1):
        for step in (1, 2, 3):
            end = AmpdpEnd()
            pieces = [data[:cut]] + [data[i:i + step] for i in range(cut, len(data), step)]
            whole = any([end.feed(piece) for piece in pieces])
            assert whole is ampdp_request_complete(data), (cut, step)
