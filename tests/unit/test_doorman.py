"""The doorman with real sockets: who is passed on, who is held, who is hung up on."""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from amavisd.doorman import Doorman, recv_fds_nowait
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


def take(doorman: Doorman, timeout: float) -> tuple[int, socket.socket] | None:
    """What a worker does: one connection from the queue, with its listener index."""
    ready, _, _ = select.select([doorman.queue], [], [], timeout)
    if not ready:
        return None
    try:
        data, fds = recv_fds_nowait(doorman.queue, 16, 1)
    except BlockingIOError:  # another taker was quicker
        return None
    return data[0], socket.socket(fileno=fds[0])


def hung_up(sock: socket.socket, seconds: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(seconds * 1000))


def test_a_client_that_speaks_is_passed_with_its_listener_and_silence_is_not(door):
    doorman, (ampdp, smtp) = door
    silent, speaking = connect(ampdp), connect(ampdp)
    assert take(doorman, 0.3) is None  # nothing said yet: no worker bothered
    speaking.sendall(b"request=AM.PDP\n\n")
    index, conn = take(doorman, 2.0)
    assert index == 0
    assert conn.recv(100, socket.MSG_PEEK) == b"request=AM.PDP\n\n"  # not read by the doorman
    conn.sendall(b"reply\n")
    assert speaking.recv(100) == b"reply\n"  # the very connection
    greeted = connect(smtp)  # the server speaks first: passed at once
    index, conn2 = take(doorman, 2.0)
    assert index == 1
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

    def a_bug(index: int) -> None:  # fault injection: a bug in accept, once
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
    for sock in (lost, client, got[1]):
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
        index, conn = take(doorman, 1.0)
        assert time.monotonic() - started < 0.1  # looked at again within milliseconds
        assert conn.recv(100, socket.MSG_PEEK).endswith(b">\r\n\r\n")
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
    from amavisd.doorman import ampdp_request_complete

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
            order.append(int(got[1].recv(100, socket.MSG_PEEK).split(b"n=")[1].split(b"\n")[0]))
            got[1].close()
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
        index, conn = take(doorman, 3.0)
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
