"""What a worker no longer does per message must still hold (issue 16, H5).

The temp base stays open across requests (`beneath.held`), the dirs are
checked by one stat while nothing changed, the mail file is opened in the
tempdir that was checked, the tempdir is removed through its held
descriptor, the loop reads and writes without socket timeouts, heartbeat
touches a few microseconds apart are one. Each test shows the property the
cheaper path must keep: a base made again is found, a changed dir is
checked in full, a swapped tempdir name is not followed, a reply is sent
whole to a slow reader.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from amavisd.beneath import Base, OutsideBase, held
from amavisd.listeners import Listener
from amavisd.protocol.handover import HandOver
from amavisd.protocol.loop import ConnectionLimits, _send, serve
from amavisd.worker import BEAT_SLACK, Worker, ensure_dir, fixed_address


@pytest.fixture
def base(tmp_path):
    """tmp/ (the temp base) with job/email.txt; work/ beside it."""
    root = tmp_path / "tmp"
    (root / "job").mkdir(parents=True)
    (root / "job" / "email.txt").write_bytes(b"inside")
    (tmp_path / "work").mkdir(mode=0o700)
    return root


def read(fd: int) -> bytes:
    try:
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def test_the_held_base_is_reused_and_reopened_when_made_again(base, tmp_path):
    work = str(tmp_path / "work")
    first = held(str(base), (work,))
    assert held(str(base), (work,)) is first  # one stat each, no new open
    renamed = tmp_path / "old-tmp"
    base.rename(renamed)
    (base / "job").mkdir(parents=True)
    (base / "job" / "email.txt").write_bytes(b"new")
    again = held(str(base), (work,))
    assert again is not first and first.fd == -1  # the old one closed
    assert read(again.open(str(base / "job" / "email.txt"))) == b"new"


def test_a_work_base_made_again_inside_the_held_base_is_still_avoided(base):
    """An admin's work base inside the temp base: re-created (a new inode), it
    must not become reachable through a Base that still knew the old one."""
    work = base / "work"
    work.mkdir(mode=0o700)
    first = held(str(base), (str(work),))
    work.rename(base.parent / "old-work")  # its inode stays taken: the new one differs
    work.mkdir(mode=0o700)
    (work / "part").write_bytes(b"ours")
    again = held(str(base), (str(work),))
    assert again is not first
    with pytest.raises(OutsideBase):
        again.open(str(work / "part"))


def test_the_mail_file_is_opened_in_the_tempdir_that_was_checked(base, tmp_path):
    """The tempdir's name swapped for another dir after it was opened: the
    mail file still comes from the checked dir, not from the new one."""
    with Base(str(base)) as trusted:
        handed = HandOver(trusted, os.getuid())
        job = str(base / "job")
        handed.tempdir_fd, _ = trusted.open_stat(job, os.O_RDONLY | os.O_DIRECTORY)
        (base / "job").rename(tmp_path / "moved")
        (base / "job").mkdir()
        (base / "job" / "email.txt").write_bytes(b"swapped in")
        fd, _ = handed._open(job + "/email.txt", os.O_RDONLY, "mail_file",
                             handed._below_tempdir(job, job + "/email.txt"))
        assert read(fd) == b"inside"
        handed.close()


def test_removal_through_the_held_tempdir_spares_a_dir_swapped_in_by_name(base, tmp_path):
    with Base(str(base)) as trusted:
        handed = HandOver(trusted, os.getuid())
        job = str(base / "job")
        (base / "job" / "sub").mkdir()
        (base / "job" / "sub" / "f").write_bytes(b"x")
        handed.open(job, None, job + "/email.txt")
        handed.remove_tempdir(job)  # the usual case: gone, contents and all
        assert not (base / "job").exists()
        handed.close()

        (base / "job").mkdir()
        (base / "job" / "email.txt").write_bytes(b"again")
        handed = HandOver(trusted, os.getuid())
        handed.open(job, None, job + "/email.txt")
        (base / "job").rename(tmp_path / "moved")
        (base / "job").mkdir()
        (base / "job" / "email.txt").write_bytes(b"someone's")
        handed.remove_tempdir(job)
        handed.close()
    assert (base / "job" / "email.txt").read_bytes() == b"someone's"  # not the checked dir
    assert not (tmp_path / "moved" / "email.txt").exists()  # the checked one was emptied


def test_an_unchanged_dir_costs_one_stat_and_a_changed_one_a_full_check(tmp_path):
    seen: dict = {}
    work = tmp_path / "work"
    assert ensure_dir(str(work), 0o700, "work base", private=True, seen=seen) is None
    assert work.is_dir() and str(work) in seen  # made, then remembered
    assert ensure_dir(str(work), 0o700, "work base", private=True, seen=seen) is None
    work.chmod(0o755)  # the mode changed: checked in full again
    problem = ensure_dir(str(work), 0o700, "work base", private=True, seen=seen)
    assert problem and "must be ours alone" in problem and str(work) not in seen
    work.chmod(0o700)
    assert ensure_dir(str(work), 0o700, "work base", private=True, seen=seen) is None
    work.rmdir()
    assert ensure_dir(str(work), 0o700, "work base", private=True, seen=seen) is None
    assert work.is_dir()  # removed under us: made again


class CountingBeat:
    """Stands in for the master's heartbeat file: counts the touches."""

    def __init__(self):
        self.touches = 0

    def notify(self) -> None:
        self.touches += 1


def test_heartbeat_touches_a_moment_apart_are_one_and_later_ones_are_not(tmp_path):
    from amavisd import config as configuration

    config = configuration.load(None, {"workdir": str(tmp_path), "clamd": "unix:/nonexistent"})
    beat = CountingBeat()
    worker = Worker(1, 1, os.getppid(), config, [], heartbeat=beat)
    worker.beat()
    assert beat.touches == 1  # the first one always touches
    worker.beat_at = time.monotonic() + 60  # as if touched a moment ago (however slow we are)
    for _ in range(5):
        worker.beat()
    assert beat.touches == 1
    worker.beat_at = time.monotonic() - BEAT_SLACK  # the slack has passed
    worker.beat()
    assert beat.touches == 2
    time.sleep(BEAT_SLACK * 2)
    worker.beat()  # and on the real clock
    assert beat.touches == 3


def test_a_taken_connection_keeps_its_listeners_family(short_tmp):
    from amavisd import config as configuration

    path = str(short_tmp / "l.sock")
    door = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    door.bind(path)
    door.listen()
    listener = Listener(door, "ampdp")
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    config = configuration.load(None, {"workdir": str(short_tmp), "clamd": "unix:/nonexistent"})
    worker = Worker(1, 1, os.getppid(), config, [listener], CountingBeat(), queue=worker_end)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    accepted, _ = door.accept()
    with client, accepted, master_end, worker_end, door:
        assert fixed_address(door)  # a Unix listener: its keys are found once
        socket.send_fds(master_end, [b"\0"], [accepted.fileno()])
        conn, got, first = worker.take()
        with conn:
            assert got is listener and first == b""
            assert (conn.family, conn.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
            assert not conn.get_inheritable()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"


def test_only_a_wildcard_tcp_listener_needs_keys_per_connection():
    for host, fixed in (("127.0.0.1", True), ("0.0.0.0", False)):
        with socket.socket() as sock:
            sock.bind((host, 0))
            assert fixed_address(sock) is fixed


class Reader:
    """The client end of a connection, reading slowly in a thread."""

    def __init__(self, sock: socket.socket):
        self.sock, self.data = sock, b""
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while chunk := self.sock.recv(4096):
            self.data += chunk
            time.sleep(0.001)


class Quiet:
    label, closing = "test", False

    def __init__(self, conn):
        self.conn = conn
        import logging
        self.log = logging.getLogger("test")


def test_a_reply_larger_than_the_buffers_reaches_a_slow_reader_whole():
    server, client = socket.socketpair()
    reply = os.urandom(3 * 1024 * 1024)
    reader = Reader(client)
    assert _send(Quiet(server), reply, ConnectionLimits(idle_timeout=5))
    server.close()
    reader.thread.join(10)
    client.close()
    assert reader.data == reply


def test_a_socket_with_a_timeout_is_served_without_one():
    """A socket timeout would poll before every call and turn MSG_DONTWAIT
    into a wait: serve() clears it."""
    from amavisd.protocol.ampdp import Session

    class Handler:
        from amavisd import config as configuration
        config = configuration.load(None, {})

        def next_log_id(self) -> str:
            return "3-01"

        def handle_reply_sent(self) -> None:
            pass

        def keep_going(self) -> bool:
            return True

    server, client = socket.socketpair()
    server.settimeout(30.0)
    client.sendall(b"request=AM.CL\r\n\r\n")
    client.shutdown(socket.SHUT_WR)
    with server, client:
        assert serve(Session(server, Handler()), ConnectionLimits(2, 2, 10)) == 1
        assert server.gettimeout() is None
        assert b"unsupported%20request" in client.recv(65536)
