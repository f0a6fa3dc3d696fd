"""The master's HTTP listener: /metrics, /healthz and /status.

Threads beside the master's loop (which only sleeps on its signal pipe
between turns): one accepts, and each request gets its own, at most
`MAX_REQUESTS` at once (more are closed at once), each with a short socket
timeout, so a slow or silent client holds one thread for `REQUEST_TIMEOUT`
at most, a health probe waiting on a hung clamd does not hold up a
Prometheus scrape, and nothing holds the master's loop. Only the master
listens; its workers close the inherited socket right after the fork.

What the thread must never do: touch the metric objects (a lock the
library takes here could be inherited, held, by a worker forked meanwhile),
or import lazily (the daemon may no longer read its own code after it
dropped root). It reads files, and the master's worker table.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from amavisd.observe.collect import Scrape
from amavisd.observe.health import Health
from amavisd.observe.status import report

log = logging.getLogger("amavisd.observe")

REQUEST_TIMEOUT = 5.0
MAX_REQUESTS = 8  # served at once
INDEX = b"amavisd: /metrics (Prometheus), /healthz, /status (JSON, amavisd status)\n"


class MetricsServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """socketserver's loop over a socket bound before privileges dropped."""

    daemon_threads = True  # a request in flight never holds up the master's exit
    block_on_close = False

    def __init__(self, sock: socket.socket, scrape: Scrape, health: Health):
        super().__init__(sock.getsockname()[:2], _Handler)
        self.socket = sock
        self.scrape = scrape
        self.health = health
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(scrape)
        self.thread: threading.Thread | None = None
        self.slots = threading.BoundedSemaphore(MAX_REQUESTS)

    def process_request(self, request: socket.socket, client_address) -> None:  # noqa: ANN001
        if not self.slots.acquire(blocking=False):  # too many at once: this one waits not
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    # socketserver.TCPServer's socket plumbing, without its bind()
    def fileno(self) -> int:
        return self.socket.fileno()

    def get_request(self):  # noqa: ANN201 (socketserver's hook)
        conn, address = self.socket.accept()
        conn.settimeout(REQUEST_TIMEOUT)
        return conn, address

    def shutdown_request(self, request: socket.socket) -> None:
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()

    def close_request(self, request: socket.socket) -> None:
        request.close()

    def server_close(self) -> None:
        self.socket.close()

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        log.exception("metrics: error serving %s", client_address)

    # -- life --------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="amavisd-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and free the port; waits for a request in flight
        (REQUEST_TIMEOUT, or a health probe) at most a few seconds."""
        if self.thread is not None and self.thread.is_alive():
            stopper = threading.Thread(target=self.shutdown, daemon=True)
            stopper.start()
            stopper.join(REQUEST_TIMEOUT + 1)
        self.server_close()

    def forget(self) -> None:
        """In a forked worker: close the inherited socket, nothing more (the
        serving thread does not exist in the child)."""
        try:
            self.socket.close()
        except OSError:
            pass


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    server_version = "amavisd"
    protocol_version = "HTTP/1.0"  # one request a connection: nothing to hold open

    def do_GET(self) -> None:  # noqa: N802 (http.server's hook)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self.reply(200, encoder(self.server.registry), content_type)
        elif path == "/healthz":
            healthy, why = self.server.health.check()
            self.reply(200 if healthy else 503, why.encode() + b"\n")
        elif path == "/status":
            body = json.dumps(report(self.server.scrape, self.server.health), indent=1)
            self.reply(200, body.encode() + b"\n", "application/json")
        elif path == "/":
            self.reply(200, INDEX)
        else:
            self.reply(404, b"not found\n")

    def do_HEAD(self) -> None:  # noqa: N802
        self.reply(200 if self.path in ("/", "/metrics", "/healthz", "/status") else 404, b"",
                   length=False)

    def reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              length: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        log.debug("metrics: %s %s", self.address_string(), format % args)
