"""The calls `amavisd run` and the master make, one line each:

    metrics.setup(cfg)        # cmd_run, before the preload (metrics.py)
    exporter.bind(cfg)        # cmd_run, after detaching, before dropping root
    exporter.start(self)      # Arbiter.run, before the first worker
    exporter.reaped(w, code)  # Arbiter.reap_workers, for each worker reaped
    exporter.stop()           # Arbiter.stop

Mail comes first: a metrics dir that cannot be made or an address that
cannot be bound is logged as an error and the daemon runs without metrics
(a load balancer's /healthz then fails, which says as much).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from amavisd import failures, metrics
from amavisd.observe.collect import Scrape
from amavisd.observe.health import Health
from amavisd.observe.server import MetricsServer
from amavisd.observe.store import MetricsDirError, Store, prepare
from amavisd.privileges import PrivilegeError, resolve
from amavisd.worker import EXIT_ABORTED, EXIT_BOOT_ERROR
from amavisd_client.wire.address import AddressError, parse_host_port

log = logging.getLogger("amavisd.observe")


class Exporter:
    def __init__(self, config: Any, sock: socket.socket, directory: str):
        self.config = config
        self.sock = sock
        self.store = Store(directory)
        self.scrape: Scrape | None = None
        self.server: MetricsServer | None = None

    def start(self, master: Any) -> None:
        metrics.declare()  # in the master's own files: the series at zero
        self.scrape = Scrape(self.store, master)
        self.server = MetricsServer(self.sock, self.scrape, Health(self.scrape))
        self.server.start()
        log.info("metrics: /metrics, /healthz and /status on %s", self.config.metrics_listen)

    def reaped(self, pid: int, cause: str) -> None:
        metrics.worker_exit(cause)
        if cause == "child_timeout":  # its last words told its client "tempfail"
            metrics.tempfail(failures.TIME_EXCEEDED)
        try:
            self.store.fold(pid, self.scrape.top.shrink if self.scrape else None)
        except Exception:  # the master's loop must go on; the counts stay unfolded
            log.exception("metrics: cannot fold the counts of worker %d", pid)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        else:
            self.sock.close()


_exporter: Exporter | None = None


def bind(config: Any) -> None:
    """Make the metrics dir and bind metrics_listen, as root, before the drop."""
    global _exporter
    if not metrics.enabled():
        return
    directory = metrics.metrics_dir(config)
    try:
        prepare(directory, _owner(config))
        sock = listen(config.metrics_listen)
    except (MetricsDirError, OSError, AddressError, PrivilegeError) as err:
        log.error("metrics off: %s", err)
        metrics.disable()
        return
    _exporter = Exporter(config, sock, directory)


def start(master: Any) -> None:
    """Serve from the master (never raises: without its thread, mail goes on)."""
    global _exporter
    if _exporter is not None:
        try:
            _exporter.start(master)
        except Exception:
            log.exception("metrics off: cannot start the listener")
            _exporter.stop()
            _exporter = None


def reaped(worker: Any, code: int) -> None:
    """A worker was reaped: count its exit and fold its counts."""
    if _exporter is not None:
        _exporter.reaped(worker.pid, exit_cause(worker.state.value, code))


def stop() -> None:
    global _exporter
    if _exporter is not None:
        _exporter.stop()
        _exporter = None


def exit_cause(state: str, code: int) -> str:
    """Why a worker left, from the master's state for it and its exit status
    (`state` is the one it was in when reaped, before EXITED)."""
    if code == EXIT_BOOT_ERROR:
        return "boot_error"
    if state == "aborting" or code == EXIT_ABORTED:
        return "child_timeout"
    if state == "killed":
        return "killed"  # past graceful_timeout, an ignored ABRT, the end of a stop
    if state == "retiring":
        return "reload"  # HUP's new generation, or fewer workers configured
    if state == "stopping":
        return "stop"
    if code == 0:
        return "max_requests"  # it retired itself
    return "crash"  # an exception, or a signal the master did not send


def listen(address: str) -> socket.socket:
    host, port = parse_host_port(address)
    family, kind, proto, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(16)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {address}: {err.strerror}") from None
    return sock


def _owner(config: Any) -> tuple[int, int] | None:
    if not config["user"] or os.geteuid() != 0:
        return None
    uid, gid, _ = resolve(config["user"], config["group"])  # PrivilegeError: the start fails
    return uid, gid


def _forget_in_child() -> None:
    """A forked worker closes the master's metrics socket."""
    global _exporter
    if _exporter is not None:
        if _exporter.server is not None:
            _exporter.server.forget()
        else:
            _exporter.sock.close()
        _exporter = None


os.register_at_fork(after_in_child=_forget_in_child)
