"""The real daemon's /metrics, /healthz and `amavisd status`: two workers, one
recycled by max_requests and one killed along the way, and exactly the
messages sent in the verdict counters; a slow message (a real clamd behind
the stalling proxy) shows its worker busy on it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs.daemon import ROOT, DaemonInstance
from tests.rigs.faults import StallingClamdProxy
from tests.rigs.postfix import free_port
from tests.unit.test_metrics import promtool_check

pytestmark = pytest.mark.integration


def get(address: str, path: str, timeout: float = 30.0) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(text: str, sample: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples(text).items()
               if n == sample and all(dict(ls).get(k) == want for k, want in labels.items()))


def wait_until(predicate, timeout: float = 30.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def start_daemon(short_tmp: Path, clamd_address: str, **settings) -> tuple[DaemonInstance, str]:
    address = f"127.0.0.1:{free_port()}"
    daemon = DaemonInstance(short_tmp / "daemon", clamd_address, workers=2,
                            metrics_listen=address, **settings).start()
    return daemon, address


def check(daemon: DaemonInstance, path: Path, data: bytes) -> int:
    path.write_bytes(data)
    done = daemon.client(str(path))
    assert done.returncode in (0, 99), done.stdout + done.stderr
    return done.returncode


def test_exactly_the_messages_sent_across_a_recycled_and_a_killed_worker(short_tmp,
                                                                         clamd_nodecomp):
    daemon, address = start_daemon(short_tmp, clamd_nodecomp.address, max_requests=3,
                                   max_requests_jitter=0)
    try:
        first = daemon.wait_for_workers(2)
        sent = {"CLEAN": 0, "INFECTED": 0}
        for n in range(14):
            infected = n % 4 == 1
            code = check(daemon, short_tmp / f"m{n}.eml",
                         eicar_message() if infected else clean_message(subject=f"m{n}"))
            assert code == (99 if infected else 0)
            sent["INFECTED" if infected else "CLEAN"] += 1
            if n == 6:  # between messages: kill a worker outright
                victim = sorted(daemon.worker_pids())[0]
                os.kill(victim, signal.SIGKILL)
                daemon.wait_for_workers(2, exclude={victim})
        assert daemon.worker_pids().isdisjoint(first)  # every first worker was replaced

        def settled():
            status, text = get(address, "/metrics")
            busy = total(text, "amavisd_workers", state="busy")
            idle = total(text, "amavisd_workers", state="idle")
            return text if status == 200 and busy == 0 and idle == 2 else None
        text = wait_until(settled)
        assert text, get(address, "/metrics")[1]
        assert total(text, "amavisd_messages_total") == 14
        assert total(text, "amavisd_messages_total", verdict="CLEAN", destiny="pass",
                     ingress="ampdp") == sent["CLEAN"]
        assert total(text, "amavisd_messages_total", verdict="INFECTED",
                     destiny="discard") == sent["INFECTED"]
        assert total(text, "amavisd_detections_total") == sent["INFECTED"]
        assert total(text, "amavisd_scanner_requests_total", scanner="clamd") == 14
        assert total(text, "amavisd_message_duration_seconds_count") == 14
        assert total(text, "amavisd_stage_duration_seconds_count", stage="scan") == 14
        assert total(text, "amavisd_quarantine_writes_total", outcome="ok") == sent["INFECTED"]
        assert total(text, "amavisd_worker_exits_total", cause="max_requests") >= 3
        assert total(text, "amavisd_worker_exits_total", cause="crash") == 1
        assert total(text, "amavisd_workers_folded_total") >= 4
        promtool_check(text)
        directory = Path(daemon.config.workdir) / "metrics"
        assert (directory.stat().st_mode & 0o777) == 0o700
        live = {int(name.rsplit("_", 1)[1][:-3]) for name in os.listdir(directory)
                if name.endswith(".db") and "archive" not in name}
        assert live <= daemon.worker_pids() | {daemon.pid}, (live, os.listdir(directory))
        status, text = get(address, "/healthz")
        assert (status, text) == (200, "ok: clamd answered\n")
    finally:
        daemon.stop()


def status(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amavisd", "status", "-c", "/dev/null",
                           "--metrics-listen", address, *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_amavisd_status_shows_the_worker_busy_on_a_slow_message(short_tmp, clamd_nodecomp):
    proxy = StallingClamdProxy(short_tmp / "slow-clamd.sock", clamd_nodecomp.socket_path,
                               stall=True).start()
    daemon, address = start_daemon(short_tmp, proxy.address)
    try:
        daemon.wait_for_workers(2)
        mail = short_tmp / "slow.eml"
        mail.write_bytes(clean_message(subject="slow"))
        done: list[subprocess.CompletedProcess] = []
        client = threading.Thread(target=lambda: done.append(daemon.client(str(mail),
                                                                             timeout=120)))
        client.start()
        worker = proxy.wait_for_connection(timeout=60)
        time.sleep(1.2)  # so "for N s" is at least a second

        shown = status(address)
        assert shown.returncode in (0, 1), shown.stderr
        line = next(line for line in shown.stdout.splitlines()
                    if line.split()[:1] == [str(worker)])
        assert line.split()[1] == "busy" and f"{worker}-01 for " in line, shown.stdout
        report = json.loads(status(address, "--json").stdout)
        [busy] = [w for w in report["workers"] if w["state"] == "busy"]
        assert busy["pid"] == worker and busy["message"]["log_id"] == f"{worker}-01"
        assert busy["message"]["seconds"] >= 1.0
        _, text = get(address, "/metrics")
        assert total(text, "amavisd_workers", state="busy") == 1

        proxy.stall = False  # clamd answers at last
        client.join(120)
        assert done and done[0].returncode == 0, done
        report = wait_until(lambda: (r := json.loads(status(address, "--json").stdout))
                            and not any(w["message"] for w in r["workers"]) and r)
        assert report and all(w["state"] == "idle" for w in report["workers"])
        assert report["messages"] == {"CLEAN": 1}
        _, text = get(address, "/metrics")
        assert total(text, "amavisd_workers", state="busy") == 0
        # the doorman's two gauges: held until whole, then queued for a worker
        assert "\namavisd_pending_connections 0.0" in text
        assert "\namavisd_queued_connections 0.0" in text
    finally:
        proxy.stall = False
        daemon.stop()
        proxy.stop()


def test_an_address_in_use_leaves_the_daemon_serving_mail_without_metrics(short_tmp,
                                                                          clamd_nodecomp):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    daemon = DaemonInstance(short_tmp / "daemon", clamd_nodecomp.address, workers=1,
                            metrics_listen=address).start()
    try:
        assert check(daemon, short_tmp / "m.eml", clean_message()) == 0
        assert "metrics off: cannot listen on" in daemon.log_text()
        assert not (Path(daemon.config.workdir) / "metrics").exists() or not any(
            name.endswith(".db") for name in os.listdir(Path(daemon.config.workdir) / "metrics"))
    finally:
        daemon.stop()
        taken.close()


def test_the_smtp_ingress_is_counted_and_a_forward_that_fails_is_a_tempfail(short_tmp,
                                                                           clamd_nodecomp):
    import smtplib

    from tests.rigs.smtpsink import SMTPSink

    with SMTPSink() as sink:
        host, port = sink.address
        smtp_port = free_port()
        daemon, address = start_daemon(short_tmp, clamd_nodecomp.address,
                                       smtp_listen=[f"127.0.0.1:{smtp_port}"],
                                       forward_method=f"smtp:[{host}]:{port}",
                                       forward_timeout=10.0)
        try:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as client:
                client.sendmail("a@example.org", ["b@example.net"], clean_message())
            assert len(sink.messages) == 1
            _, text = get(address, "/metrics")
            assert total(text, "amavisd_messages_total", ingress="smtp", verdict="CLEAN",
                         destiny="pass") == 1
            assert total(text, "amavisd_tempfails_total") == 0
        finally:
            daemon.stop()
    # the next hop gone: the verdict was pass, the answer a tempfail
    dead = free_port()
    smtp_port = free_port()
    daemon, address = start_daemon(short_tmp / "2", clamd_nodecomp.address,
                                   smtp_listen=[f"127.0.0.1:{smtp_port}"],
                                   forward_method=f"smtp:[127.0.0.1]:{dead}",
                                   forward_timeout=10.0)
    try:
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@example.org", ["b@example.net"], clean_message())
        assert refused.value.smtp_code == 451
        _, text = get(address, "/metrics")
        assert total(text, "amavisd_messages_total", ingress="smtp", verdict="CLEAN") == 1
        assert total(text, "amavisd_tempfails_total", cause="relay_tempfail") == 1
    finally:
        daemon.stop()
