"""The master's HTTP listener and `amavisd status`: real forked workers that
report through their slots, the master's own worker table (the real
WorkerProcess records), a real HTTP server on a loopback port, the real
`amavisd status` command, and /healthz against a real clamd (and a dead
one)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd import metrics
from amavisd.heartbeat import Heartbeat
from amavisd.master import WorkerProcess, WorkerState
from amavisd.observe import exporter
from amavisd.observe.collect import Scrape
from amavisd.observe.health import Health
from amavisd.observe.server import REQUEST_TIMEOUT, MetricsServer
from amavisd.observe.slots import RECORD, Slot, read_slot
from tests.rigs.faults import StallingClamdProxy
from tests.unit.test_metrics import metrics_on, promtool_check  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def test_a_slot_says_busy_on_which_message_and_a_torn_record_is_not_believed(tmp_path):
    slot = Slot(str(tmp_path), pid=4242)
    assert read_slot(str(tmp_path), 4242)["busy"] is False
    slot.busy("4242-07", "4XyZ1")
    record = read_slot(str(tmp_path), 4242)
    assert (record["busy"], record["log_id"], record["queue_id"], record["requests"]) == (
        True, "4242-07", "4XyZ1", 1)
    assert time.time() - record["since"] < 5
    slot.busy("4242-08\n\x1b[31m" + "x" * 4000)  # bounded and cleaned: one record still
    assert read_slot(str(tmp_path), 4242)["log_id"].startswith("4242-08??[31m")
    with open(slot.path, "r+b") as f:  # a half-written record: the CRC no longer matches
        f.seek(20)
        f.write(b"#")
    assert read_slot(str(tmp_path), 4242) is None
    assert os.path.getsize(slot.path) == RECORD
    assert read_slot(str(tmp_path), 999) is None


class Workers:
    """Forked children standing for workers, each in the master's table as
    the arbiter keeps it (WorkerProcess), each reporting through its slot."""

    def __init__(self, config):
        self.config = config
        self.workers: dict[int, WorkerProcess] = {}
        self.pids: list[int] = []

    def spawn(self, busy_on: str = "", state: WorkerState = WorkerState.SERVING) -> int:
        ready_r, ready_w = os.pipe()
        heartbeat = Heartbeat()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            try:
                if busy_on:
                    metrics.worker_busy(busy_on, "Q" + busy_on[-2:])
                else:
                    metrics.worker_busy("warm-up")
                    metrics.worker_idle()
                os.write(ready_w, b"x")
                time.sleep(120)
            finally:
                os._exit(0)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)
        self.workers[pid] = WorkerProcess(pid, len(self.workers) + 1, 0, heartbeat,
                                          born=time.time() - 30, booted=True, state=state,
                                          since=time.monotonic())
        self.pids.append(pid)
        return pid

    def stop(self) -> None:
        for pid in self.pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


@pytest.fixture
def master(metrics_on, clamd_nodecomp):  # noqa: F811
    """A master's view (workers and config) with a real clamd as its scanner."""
    config = configuration.load(None, {"clamd": clamd_nodecomp.address,
                                       "primary_scanners": ["clamd"], "workers": 3})
    workers = Workers(config)
    yield workers, metrics_on
    workers.stop()


@pytest.fixture
def serve():
    """Start a MetricsServer on a free loopback port; yields start(scrape, health)."""
    servers = []

    def start(scrape, health) -> tuple[str, MetricsServer]:
        sock = socket.create_server(("127.0.0.1", 0))
        server = MetricsServer(sock, scrape, health)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{sock.getsockname()[1]}", server

    yield start
    for server in servers:
        server.stop()


def get(address: str, path: str, method: str = "GET") -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), \
            response.read().decode()
    finally:
        connection.close()


def test_metrics_healthz_and_status_over_http(master, serve):
    workers, store = master
    busy = workers.spawn(busy_on="1234-07")
    idle = workers.spawn()
    workers.spawn(state=WorkerState.BOOTING)
    scrape = Scrape(store, workers)
    address, _ = serve(scrape, Health(scrape))

    status, content_type, text = get(address, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    promtool_check(text)
    assert 'amavisd_workers{state="busy"} 1.0' in text
    assert 'amavisd_workers{state="idle"} 1.0' in text
    assert 'amavisd_workers{state="starting"} 1.0' in text
    assert "amavisd_workers_configured 3.0" in text

    status, _, text = get(address, "/healthz")
    assert (status, text) == (200, "ok: clamd answered\n")  # the master's probe

    status, content_type, text = get(address, "/status")
    report = json.loads(text)
    assert status == 200 and content_type == "application/json"
    by_pid = {w["pid"]: w for w in report["workers"]}
    assert by_pid[busy]["state"] == "busy"
    assert by_pid[busy]["message"]["log_id"] == "1234-07"
    assert by_pid[busy]["message"]["queue_id"] == "Q07"
    assert by_pid[busy]["requests"] == 1
    assert by_pid[idle]["state"] == "idle" and by_pid[idle]["message"] is None
    assert 25 < by_pid[idle]["age_seconds"] < 120
    assert report["healthy"] is True and report["workers_configured"] == 3
    assert report["scanners"][0]["name"] == "clamd"
    assert report["scanners"][0]["last_answer_seconds_ago"] < 60

    assert get(address, "/nothing")[0] == 404
    assert get(address, "/metrics", method="HEAD")[:2] == (200, "text/plain; charset=utf-8")


def test_amavisd_status_shows_the_worker_busy_on_its_message(master, serve, tmp_path):
    workers, store = master
    busy = workers.spawn(busy_on="777-03")
    workers.spawn()
    scrape = Scrape(store, workers)
    address, _ = serve(scrape, Health(scrape))
    command = [sys.executable, "-m", "amavisd", "status", "-c", "/dev/null",
               "--metrics-listen", address]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.split()[:1] == [str(busy)])
    assert "busy" in line and "777-03 for " in line and "(Queue-ID Q03)" in line
    assert "healthy (ok: clamd answered)" in done.stdout
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)
    report = json.loads(done.stdout)
    assert [w["message"]["log_id"] for w in report["workers"] if w["message"]] == ["777-03"]
    # nobody listening: 69, and one line saying so
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    done = subprocess.run(command[:-1] + [f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert done.returncode == 69
    assert "cannot reach the daemon" in done.stderr


def test_healthz_is_503_without_a_serving_worker_or_a_scanner_answer(metrics_on, serve,  # noqa: F811
                                                                    tmp_path):
    dead = configuration.load(None, {"clamd": f"unix:{tmp_path}/no-clamd.sock",
                                     "primary_scanners": ["clamd"]})
    workers = Workers(dead)
    try:
        scrape = Scrape(metrics_on, workers)
        address, _ = serve(scrape, Health(scrape))
        status, _, text = get(address, "/healthz")
        assert (status, text) == (503, "no worker is serving\n")
        workers.spawn()
        status, _, text = get(address, "/healthz")
        assert status == 503 and "no primary scanner (clamd) answered" in text

        def answered():  # a worker's message shows clamd answering: healthy, no probe needed
            metrics.scanner_request("clamd", 0.01)
        pid = os.fork()
        if pid == 0:
            try:
                answered()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        status, _, text = get(address, "/healthz")
        assert (status, text) == (200, "ok: clamd answered\n")
    finally:
        workers.stop()


def test_a_silent_client_does_not_keep_the_listener_from_others(metrics_on, serve):  # noqa: F811
    scrape = Scrape(metrics_on)
    address, _ = serve(scrape, Health(scrape, configuration.load(None, {})))
    host, port = address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    try:
        started = time.monotonic()
        status, _, _ = get(address, "/metrics")
        assert status == 200
        assert time.monotonic() - started < REQUEST_TIMEOUT  # not after the silent one
    finally:
        silent.close()


def test_a_health_probe_stuck_on_a_hung_clamd_does_not_hold_up_a_scrape(metrics_on, serve,  # noqa: F811
                                                                       short_tmp,
                                                                       clamd_nodecomp):
    proxy = StallingClamdProxy(short_tmp / "hung.sock", clamd_nodecomp.socket_path,
                               stall=True).start()
    workers = Workers(configuration.load(None, {"clamd": proxy.address,
                                                "primary_scanners": ["clamd"]}))
    try:
        workers.spawn()
        scrape = Scrape(metrics_on, workers)
        address, _ = serve(scrape, Health(scrape))
        answers: list = []
        probe = threading.Thread(target=lambda: answers.append(get(address, "/healthz")))
        probe.start()
        assert proxy.wait_for_connection(timeout=30) == os.getpid()  # the master's probe
        started = time.monotonic()
        assert get(address, "/metrics")[0] == 200
        assert time.monotonic() - started < 3
        probe.join(60)
        assert answers[0][0] == 503 and "no primary scanner" in answers[0][2]
    finally:
        workers.stop()
        proxy.stop()


def test_a_forked_worker_closes_the_masters_metrics_socket(tmp_path):
    from prometheus_client import values

    saved = values.ValueClass
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = configuration.load(None, {"workdir": str(tmp_path),
                                    "metrics_listen": f"127.0.0.1:{port}"})
    try:
        assert metrics.setup(cfg)
        exporter.bind(cfg)
        fd = exporter._exporter.sock.fileno()
        pid = os.fork()
        if pid == 0:
            try:
                os.fstat(fd)
                os._exit(1)  # still open in the child
            except OSError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.fstat(fd)  # the master keeps it
    finally:
        exporter.stop()
        metrics.disable()
        values.ValueClass = saved


def test_status_renders_durations_for_people():
    from amavisd.observe.status import duration, render

    assert [duration(s) for s in (0.25, 75, 7300, 200000)] == ["0.2s", "1m15s", "2h01m",
                                                               "2d07h"]
    report = {"version": "0.1.0", "master_pid": 1, "uptime_seconds": 3600, "healthy": False,
              "health": "no worker is serving", "workers_configured": 2, "workers": [],
              "messages": {}, "tempfails": {"scanner_unavailable": 3}, "scanners": []}
    text = render(report)
    assert "UNHEALTHY (no worker is serving)" in text
    assert "messages: none yet" in text and "tempfails: scanner_unavailable 3" in text
