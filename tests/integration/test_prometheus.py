"""A real Prometheus server (Debian's) scraping the real daemon with the
shipped alert rules: its HTTP API returns our counters, it loaded the rules
healthy, and every expression of the shipped dashboard evaluates there and
names a metric the live daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from amavisd.testing.messages import clean_message, eicar_message
from tests.integration.test_metrics import check, get, start_daemon, wait_until
from tests.rigs.postfix import free_port
from tests.unit.test_metrics_rules import (
    METRIC_NAME,
    RULES,
    dashboard_expressions,
    exported_names,
)

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    with opener.open(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus(short_tmp):
    """Start a private Prometheus on a free port scraping `targets` every second."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    started = []

    def start(target: str) -> str:
        home = short_tmp / "prometheus"
        home.mkdir()
        shutil.copy(RULES, home / "amavisd-rules.yml")
        (home / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["amavisd-rules.yml"],
            "scrape_configs": [{"job_name": "amavisd", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }))
        port = free_port()
        log = open(home / "prometheus.log", "wb")
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={home / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={home / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}",
                                 "--web.enable-lifecycle"], stdout=log, stderr=log, cwd=home)
        started.append((proc, log))
        base = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return api(base, "/api/v1/targets")["data"]["activeTargets"]
            except OSError:
                return None
        assert wait_until(ready, 60), (home / "prometheus.log").read_text()[-3000:]
        return base

    yield start
    for proc, log in started:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(base: str, expr: str) -> dict:
    return api(base, "/api/v1/query", query=expr)


def test_prometheus_scrapes_the_daemon_and_every_dashboard_expression_works(
        short_tmp, clamd_nodecomp, prometheus):
    daemon, address = start_daemon(short_tmp, clamd_nodecomp.address)
    try:
        base = prometheus(address)
        for n in range(6):
            check(daemon, short_tmp / f"m{n}.eml",
                  eicar_message() if n % 3 == 0 else clean_message(subject=f"m{n}"))

        def counted():
            result = query(base, "sum(amavisd_messages_total)")["data"]["result"]
            return result and float(result[0]["value"][1]) == 6
        assert wait_until(counted, 60), query(base, "amavisd_messages_total")
        result = query(base, 'sum by (verdict) (amavisd_messages_total{job="amavisd"})')
        by_verdict = {r["metric"]["verdict"]: float(r["value"][1])
                      for r in result["data"]["result"]}
        assert by_verdict == {"CLEAN": 4.0, "INFECTED": 2.0}
        [target] = api(base, "/api/v1/targets")["data"]["activeTargets"]
        assert target["health"] == "up", target

        groups = api(base, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
        firing = [r["name"] for r in rules if r.get("state") == "firing"]
        assert firing == []

        # every dashboard expression, with Grafana's variables filled in, evaluates
        for expr in dashboard_expressions():
            concrete = (expr.replace('"$instance"', '".*"')
                        .replace("$__rate_interval", "1m").replace("$__range", "5m"))
            answer = query(base, concrete)
            assert answer["status"] == "success", (expr, answer)

        # and names only what the live daemon exports
        _, text = get(address, "/metrics")
        used = {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
        assert not used - exported_names(text), sorted(used - exported_names(text))
        assert re.search(r"amavisd_build_info\{", text)
    finally:
        daemon.stop()
