"""accept() without socket.accept's wrapper: making the socket object for an
accepted descriptor can fail, and then, as with socket.accept, nothing is
left open and the doorman goes on.

CPython's socket object fails in two ways: with OSError once it holds the
descriptor (setting it non-blocking), and then closes it itself as it is
freed; or with MemoryError before it holds it (allocating the object), and
then nobody closes it but us."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest

from amavisd.doorman import Doorman
from amavisd.doorman import door as door_module
from amavisd.listeners import AMPDP, Listener


def hung_up(sock: socket.socket, seconds: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP)
    return bool(poller.poll(seconds * 1000))


@pytest.fixture
def waiting_client(tmp_path):
    """A doorman (its thread not started: the test turns it) and a client in its backlog."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "ampdp.sock"))
    server.listen(8)
    server.setblocking(False)
    listener = Listener(server, AMPDP)
    doorman = Doorman([listener], idle_timeout=5.0, cap=4)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "ampdp.sock"))
    client.sendall(b"request=AM.PDP\r\n\r\n")
    yield doorman, client
    client.close()
    doorman.close()
    listener.close()


def test_an_oserror_making_the_socket_is_handled_as_accepts_was(waiting_client, monkeypatch):
    """socket.accept() raised it from accept(): out of resources, the
    listeners rest; the doorman thread must not die of it."""
    doorman, client = waiting_client

    class NoMemory(socket.SocketType):
        def __init__(self, family: int, kind: int, proto: int, fd: int) -> None:
            os.close(fd)  # what CPython's object does with the descriptor it held
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(door_module.socket, "SocketType", NoMemory)
    doorman._accept(0, time.monotonic())
    monkeypatch.undo()
    assert doorman.accept_failures == 1
    assert hung_up(client, 1.0)
    assert doorman.held == 0 and doorman.queued == 0


def test_a_memoryerror_making_the_socket_leaves_no_descriptor_open(waiting_client,
                                                                   monkeypatch):
    doorman, client = waiting_client

    class NoObject(socket.SocketType):
        def __new__(cls, *args: object) -> None:
            raise MemoryError

    monkeypatch.setattr(door_module.socket, "SocketType", NoObject)
    with pytest.raises(MemoryError):  # a bug's fate: the thread is replaced (watch)
        doorman._accept(0, time.monotonic())
    monkeypatch.undo()
    assert hung_up(client, 1.0)  # the client sees end-of-file and retries
