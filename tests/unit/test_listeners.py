"""The Unix sockets root binds in a directory the dropped-to user owns.

The daemon (amavisd.listeners) and amavisd-milter share one way of making
them (amavisd_client.socket_file): mode at birth, then owner and mode set on
the inode bound, never through the path, which the directory's owner may
have swapped for a link to root's file between bind() and the chown.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import time
from pathlib import Path

import pytest

from amavisd import listeners
from amavisd_client.milter import server as milter_server
from amavisd_client.socket_file import SocketFileError, clear_stale
from amavisd_client.wire.address import Address

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
EVIL = "amavisd-evil"  # the attacker: owns the socket's directory, as amavis owns /var/lib/amavis
GROUP = "amavisd-test"


def daemon_bind(path: Path) -> object:
    try:
        return listeners.bind_unix(str(path), 0o660, EVIL, GROUP)
    except listeners.ListenerError as err:
        return str(err)


def milter_bind(path: Path) -> object:
    try:
        return milter_server.bind(Address("unix", path=str(path)), 0o660, GROUP,
                                  owner=pwd.getpwnam(EVIL).pw_uid)
    except milter_server.ListenError as err:
        return str(err)


BINDERS = {"daemon": daemon_bind, "milter": milter_bind}


def attacker_dir(short_tmp: Path) -> Path:
    folder = short_tmp / "evil-dir"
    folder.mkdir()
    os.chown(folder, pwd.getpwnam(EVIL).pw_uid, -1)
    return folder


_REAL_BIND = socket.socket.bind  # the fault below wraps socket.socket.bind


def their_socket(path: str) -> None:
    """The attacker's own socket at the path (made here as root, then given to them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        _REAL_BIND(sock, path)
    os.chown(path, pwd.getpwnam(EVIL).pw_uid, -1)


@ROOT_ONLY
@pytest.mark.parametrize("binder", BINDERS)
@pytest.mark.parametrize("swap", ["symlink", "hardlink", "their socket"])
def test_a_path_swapped_between_bind_and_chown_is_refused_and_left_alone(
        short_tmp, monkeypatch, binder, swap):
    """Named fault: the attacker wins the race every time (a wrapper around
    bind() swaps the fresh socket as soon as it exists), which a real race
    would only do now and then. Before the fix the daemon chmod-ed and
    chown-ed the path: root's file became the attacker's, mode 0660."""
    victim = short_tmp / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    path = attacker_dir(short_tmp) / "amavisd.sock"

    def bind_then_swap(sock: socket.socket, address) -> None:
        _REAL_BIND(sock, address)
        if sock.family != socket.AF_UNIX or address != str(path):
            return
        os.unlink(address)
        if swap == "symlink":
            os.symlink(victim, address)
        elif swap == "hardlink":
            os.link(victim, address)
        else:
            their_socket(address)

    monkeypatch.setattr(socket.socket, "bind", bind_then_swap)
    outcome = BINDERS[binder](path)
    if isinstance(outcome, socket.socket):
        outcome.close()
    info = os.stat(victim)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o600)
    assert isinstance(outcome, str) and "replaced" in outcome, outcome
    assert os.lstat(path).st_ino != 0  # what the attacker put there is not removed by us
    if swap == "their socket":
        theirs = os.lstat(path)  # not given our group
        assert (theirs.st_uid, theirs.st_gid) == (pwd.getpwnam(EVIL).pw_uid, 0)


@ROOT_ONLY
@pytest.mark.parametrize("binder", BINDERS)
def test_an_unswapped_socket_gets_mode_owner_and_group(short_tmp, binder):
    path = attacker_dir(short_tmp) / "amavisd.sock"
    sock = BINDERS[binder](path)
    assert isinstance(sock, socket.socket), sock
    try:
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
        assert (info.st_uid, info.st_gid) == (pwd.getpwnam(EVIL).pw_uid,
                                             grp.getgrnam(GROUP).gr_gid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
    finally:
        sock.close()


def test_the_daemon_removes_at_exit_only_the_socket_it_bound(short_tmp):
    """Not by inode number alone: the one an unlinked socket freed is given
    to the next file made there (it was, every time, here)."""
    path = short_tmp / "amavisd.sock"
    listeners.bind_unix(str(path), 0o600).close()
    os.unlink(path)
    time.sleep(0.05)  # file times tick by the kernel's coarse clock (a few ms)
    with socket.socket(socket.AF_UNIX) as newer:  # a newer daemon's, the inode number reused
        newer.bind(str(path))
    listeners.unlink_if_ours(str(path))
    assert path.exists()
    os.unlink(path)
    listeners.bind_unix(str(path), 0o600).close()
    listeners.unlink_if_ours(str(path))
    assert not path.exists()


@pytest.mark.parametrize("what, refused", [("file", "not a socket"), ("live", "another test"),
                                           ("stale", "")])
def test_what_stands_at_the_path_before_bind(short_tmp, what, refused):
    path = short_tmp / "x.sock"
    keep: list[socket.socket] = []
    if what == "file":
        path.write_text("x")
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        if what == "live":
            sock.listen(1)
            keep.append(sock)
        else:
            sock.close()
    try:
        if refused:
            with pytest.raises(SocketFileError, match=refused):
                clear_stale(str(path), "test")
            assert path.exists()
        else:
            clear_stale(str(path), "test")
            assert not path.exists()
    finally:
        for sock in keep:
            sock.close()
