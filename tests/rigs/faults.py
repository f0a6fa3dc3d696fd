# SPDX-License-Identifier: MIT
"""Fault injection: a clamd that hangs on demand, workers slow to boot.

A real clamd cannot be told to stop answering mid-scan, yet timeouts and
worker-kill paths must be tested against exactly that.  ``StallingClamdProxy``
is the one named fake allowed in the test suite: a Unix-socket relay in front
of a real clamd.  While ``stall`` is False it forwards every connection byte
for byte; while ``stall`` is True it accepts and reads but never answers, and
reports the connecting process's PID (``SO_PEERCRED``) so that a test knows
exactly which worker is stuck.

``Filler`` keeps a (small, real) filesystem full on demand.

``slow_boot_argv`` starts the real daemon with every worker pausing before it
installs its signal handlers: the window just after fork() in which a signal
from the master must not be lost, widened from microseconds to a fixed delay
so that a test hits it every time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = ["Filler", "StallingClamdProxy", "slow_boot_argv"]

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_POLL = 0.1  # seconds between checks of the stop flag


_SLOW_BOOT = """\
import sys, time
from amavisd import worker
boot = worker.Worker.boot
def slow_boot(self):
    time.sleep({delay!r})
    boot(self)
worker.Worker.boot = slow_boot
from amavisd.cli import main
sys.exit(main())
"""


def slow_boot_argv(delay: float) -> list[str]:
    """Interpreter arguments running `amavisd` with workers `delay` s slow to boot."""
    return ["-c", _SLOW_BOOT.format(delay=delay)]


def _unix_path(address: str | os.PathLike[str]) -> str:
    text = os.fspath(address)
    return text[len("unix:") :] if text.startswith("unix:") else text


def _peer_pid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid: int = _UCRED.unpack(raw)[0]
    return pid


class StallingClamdProxy:
    """Relay ``path`` -> ``upstream`` (both Unix sockets) that can play dead."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        upstream: str | os.PathLike[str],
        stall: bool = False,
    ) -> None:
        self.path = Path(_unix_path(path))
        self.upstream = _unix_path(upstream)
        self.stall = stall
        self.peer_pids: list[int] = []
        self._stalled: queue.Queue[int] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    @property
    def address(self) -> str:
        return "unix:" + str(self.path)

    # -- life cycle --------------------------------------------------------
    def start(self) -> StallingClamdProxy:
        if self._listener is not None:
            raise RuntimeError("proxy already started")
        self._stop.clear()
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o666)
        listener.listen(64)
        listener.settimeout(_POLL)
        self._listener = listener
        self._spawn(self._accept_loop, "stall-proxy-accept")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every socket and join every thread.  Safe to call twice."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            self._threads.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StallingClamdProxy:
        return self.start() if self._listener is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for_connection(self, timeout: float = 10.0) -> int:
        """PID of the peer of the next connection that got stalled.

        Raises TimeoutError if none arrives within ``timeout`` seconds."""
        try:
            return self._stalled.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no stalled connection within {timeout}s") from None

    # -- internals ---------------------------------------------------------
    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack_close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        sock.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._track(conn)
            try:
                pid = _peer_pid(conn)
            except OSError:
                pid = 0
            with self._lock:
                self.peer_pids.append(pid)
            self._spawn(self._serve, f"stall-proxy-{pid}", conn, pid)

    def _serve(self, client: socket.socket, pid: int) -> None:
        """Relay one connection; while ``stall`` is set, hold what the client sends.

        Setting ``stall`` back to False releases the held bytes upstream, so a
        stall can also stand for a slow scanner that finally answers.
        """
        upstream: socket.socket | None = None
        stalled = False
        held = bytearray()
        sel = selectors.DefaultSelector()

        def connect_upstream() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._track(sock)
            sock.connect(self.upstream)
            sel.register(sock, selectors.EVENT_READ, "up")
            return sock

        try:
            if self.stall:
                stalled = True
                self._stalled.put(pid)
            else:
                upstream = connect_upstream()
            sel.register(client, selectors.EVENT_READ, "client")
            open_dirs = {"client", "up"}
            while open_dirs and not self._stop.is_set():
                if stalled and not self.stall:  # released: forward what was held
                    stalled = False
                    if upstream is None:
                        upstream = connect_upstream()
                    upstream.sendall(bytes(held))
                    held.clear()
                    if "client" not in open_dirs:
                        upstream.shutdown(socket.SHUT_WR)
                for key, _ in sel.select(_POLL):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if key.data == "client" and data and self.stall and not stalled:
                        stalled = True  # stall began mid-connection
                        self._stalled.put(pid)
                    if not data:
                        sel.unregister(src)
                        open_dirs.discard(key.data)
                        if key.data == "client" and stalled:
                            continue  # keep holding until released or stopped
                        dst = upstream if key.data == "client" else client
                        if dst is not None:
                            with contextlib.suppress(OSError):
                                dst.shutdown(socket.SHUT_WR)
                        continue
                    if stalled and key.data == "client":
                        held += data  # read, never answer, never forward (yet)
                        continue
                    dst = upstream if key.data == "client" else client
                    assert dst is not None
                    dst.sendall(data)
        except OSError:
            pass  # a peer went away: drop the connection
        finally:
            sel.close()
            self._untrack_close(client)
            if upstream is not None:
                self._untrack_close(upstream)


class Filler:
    """Keeps a filesystem full: writes until ENOSPC, and again whenever the
    daemon's removed temp files free some blocks, until `empty()`."""

    def __init__(self, directory: str):
        self.path = Path(directory) / "filler"
        self._stop = threading.Event()
        self._full = threading.Event()
        self._thread = threading.Thread(target=self._keep_full, daemon=True)

    def fill(self) -> None:
        self._thread.start()
        assert self._full.wait(10), "the disk did not fill up"

    def _keep_full(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 4096
        try:
            while not self._stop.is_set():
                try:
                    while os.write(fd, block):
                        pass
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    self._full.set()
                self._stop.wait(0.005)
        finally:
            os.close(fd)

    def empty(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.path.unlink()
