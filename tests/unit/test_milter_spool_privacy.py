"""The milter's pooled spools (found by a hostile review): a pooled
spool's file is the same inode for every message it carries, so whoever
holds a way to it (a descriptor opened, or a hard link made, at any time
in its life) reads every later message written into it.

Real parts: the real SpoolPool/SpoolSink on a real sticky temp base, and an
attacker that is a real other user (nobody, in the temp base's group
nogroup) opening the file with the kernel's own permission checks. The one
hook: the attacker is let in at the moment the client's Spool has just given
the file the temp base's group (`share_group`), the window a racing
attacker aims at, so the race is won every run instead of now and then."""

from __future__ import annotations

import os
import socket

import pytest

import amavisd_client.spool as client_spool
from amavisd_client.milter.spool import SpoolPool, SpoolSink
from amavisd_client.spool import MAIL_FILE

NOBODY, NOGROUP = 65534, 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@pytest.fixture
def group_tempbase(short_tmp):
    """The daemon's temp base as installed: sticky, writable by its group."""
    path = short_tmp / "tmp"
    path.mkdir()
    os.chown(path, -1, NOGROUP)
    path.chmod(0o1770)
    return path


def open_as_group_member(path: str) -> int | None:
    """A descriptor for `path` opened by another user of the temp base's
    group (nobody:nogroup, no supplementary groups); None if the kernel
    refused."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the attacker
        code = 0
        try:
            ours.close()
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            fd = os.open(path, os.O_RDONLY)
            socket.send_fds(theirs, [b"fd"], [fd])
        except OSError:
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    try:
        _, code = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(code) != 0:
            return None
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
        return fds[0]
    finally:
        ours.close()


def only_spool_file(tempbase) -> str:
    (name,) = os.listdir(tempbase)
    return os.path.join(tempbase, name, MAIL_FILE)


def test_a_group_member_cannot_open_a_milter_spool_as_it_is_made(group_tempbase, monkeypatch):
    """The milter's spool is closed to the daemon's group (dir 0700, file
    0600), but the client's Spool makes it 0750/0640 first and the milter
    narrows it after: a group member who opens email.txt in between keeps
    that descriptor, and since the pool writes every later message into the
    same inode (pwrite in place), reads all of them. Fails while the modes
    are narrowed after the file exists."""
    stolen: list[int | None] = []
    share_group = client_spool.share_group

    def share_then_race(fd: int, gid: int) -> None:
        share_group(fd, gid)
        if not os.path.isdir(f"/proc/self/fd/{fd}"):  # the file, not the dir
            stolen.append(open_as_group_member(only_spool_file(group_tempbase)))

    monkeypatch.setattr(client_spool, "share_group", share_then_race)
    pool = SpoolPool(str(group_tempbase))
    first = SpoolSink(str(group_tempbase), pool=pool)
    first.write(b"Subject: first\r\n\r\nfirst message\r\n")
    first.open()
    first.release()  # answered: pooled
    second = SpoolSink(str(group_tempbase), pool=pool)
    later = b"Subject: second\r\n\r\nsomeone else's mail\r\n"
    second.write(later)
    second.open()
    try:
        assert len(stolen) == 1  # the spool was made once, then reused
        fd = stolen[0]
        if fd is not None:
            try:
                leaked = os.pread(fd, 4096, 0)
            finally:
                os.close(fd)
            pytest.fail(f"a group member opened the spool as it was made and read a "
                        f"later message through it: {leaked!r}")
    finally:
        second.discard()
        pool.close()


def test_a_pooled_spool_with_a_second_link_does_not_carry_the_next_message(group_tempbase):
    """A hard link to a pooled email.txt (made by anyone who can: the
    milter's own user, root, a backup or quarantine tool of that user) is
    the same inode: the next message written in place would be in it too,
    and it outlives the spool's removal. A pooled spool whose file has a
    second link is not reused."""
    pool = SpoolPool(str(group_tempbase))
    first = SpoolSink(str(group_tempbase), pool=pool)
    first.write(b"Subject: first\r\n\r\nfirst\r\n")
    first.open()
    path = first.path
    first.release()
    link = os.path.join(os.path.dirname(group_tempbase), "kept-link")
    os.link(path, link)
    second = SpoolSink(str(group_tempbase), pool=pool)
    later = b"Subject: second\r\n\r\nsecond\r\n"
    second.write(later)
    second.open()
    try:
        with open(link, "rb") as kept:
            assert kept.read() != later, "the next message landed in a linked pooled file"
    finally:
        second.discard()
        pool.close()
        os.unlink(link)
