"""What ships for monitoring: the alert rules (promtool checks them and runs
them on made-up series: each alert fires when it should, not before), the
scrape snippet (a valid Prometheus config), and the Grafana dashboard (valid
JSON, every expression naming a metric we export: checked here against an
in-process scrape, and against the live daemon in
tests/integration/test_prometheus.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from amavisd import config as configuration
from amavisd import metrics
from amavisd.observe.collect import Scrape
from tests.unit.test_metrics import exposition, in_worker, metrics_on, one_message  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "etc" / "prometheus" / "amavisd-rules.yml"
SCRAPE = REPO / "etc" / "prometheus" / "amavisd-scrape.yml"
DASHBOARD = REPO / "etc" / "grafana" / "amavisd-dashboard.json"
PROMTOOL = shutil.which("promtool")
METRIC_NAME = re.compile(r"\bamavisd_[a-z_]+\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_promtool_accepts_the_rules_and_the_scrape_config():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout
    done = promtool("check", "config", SCRAPE.name, cwd=SCRAPE.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def alert(name: str, at: str, labels: dict | None = None, summary: str = "",
          description: str = "") -> dict:
    expected = []
    if labels is not None:
        annotations = {"summary": summary} | ({"description": description} if description else {})
        expected = [{"exp_labels": labels, "exp_annotations": annotations}]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected}


RULE_TESTS = [
    {   # clamd answers, then every request fails: the alert waits its 5 minutes
        "interval": "1m",
        "input_series": [
            {"series": 'amavisd_scanner_requests_total{instance="a",job="amavisd",scanner="clamd"}',
             "values": "0+10x40"},
            {"series": 'amavisd_scanner_errors_total{instance="a",job="amavisd",scanner="clamd"}',
             "values": "0x10 10+10x30"},
        ],
        "alert_rule_test": [
            alert("AmavisdScannerDown", "10m"),
            alert("AmavisdScannerDown", "13m"),  # failing, but not for 5 minutes yet
            alert("AmavisdScannerDown", "25m", {"instance": "a", "scanner": "clamd",
                                                "severity": "critical"},
                  "scanner clamd on a fails 100% of its requests",
                  "With no scanner answering, mail is tempfailed (when_scanners_fail = "
                  "tempfail)."),
        ],
    },
    {   # 1 message in 10 tempfailed: over 5 %, for 10 minutes
        "interval": "1m",
        "input_series": [
            {"series": 'amavisd_messages_total{instance="a",job="amavisd",ingress="ampdp",'
                       'verdict="CLEAN",destiny="pass"}', "values": "0+90x40"},
            {"series": 'amavisd_messages_total{instance="a",job="amavisd",ingress="ampdp",'
                       'verdict="TEMPFAIL",destiny="tempfail"}', "values": "0x10 0+10x30"},
        ],
        "alert_rule_test": [
            alert("AmavisdTempfailRate", "12m"),
            alert("AmavisdTempfailRate", "30m", {"instance": "a", "severity": "warning"},
                  "amavisd on a tempfails 10% of its mail",
                  "See amavisd_tempfails_total by cause, and the log's tempfail lines."),
        ],
    },
    {   # two workers configured, both busy for long
        "interval": "1m",
        "input_series": [
            {"series": 'amavisd_workers{instance="a",job="amavisd",state="busy"}',
             "values": "0x5 2x40"},
            {"series": 'amavisd_workers{instance="a",job="amavisd",state="idle"}',
             "values": "2x5 0x40"},
            {"series": 'amavisd_workers_configured{instance="a",job="amavisd"}',
             "values": "2x45"},
        ],
        "alert_rule_test": [
            alert("AmavisdWorkersSaturated", "10m"),
            alert("AmavisdNoWorkers", "30m"),  # busy ones are serving
            alert("AmavisdWorkersSaturated", "30m", {"instance": "a", "job": "amavisd",
                                                     "state": "busy", "severity": "warning"},
                  "amavisd on a has 100% of its workers busy",
                  "Raise workers (if CPU allows) or find what makes messages slow "
                  "(amavisd_stage_duration_seconds)."),
        ],
    },
    {   # scrapes fail; workers crash
        "interval": "1m",
        "input_series": [
            {"series": 'up{instance="a",job="amavisd"}', "values": "1x5 0x10"},
            {"series": 'amavisd_worker_exits_total{instance="a",job="amavisd",cause="crash"}',
             "values": "0x5 1 2 3 4 5 6 7 8 9 10"},
            {"series": 'amavisd_worker_exits_total{instance="a",job="amavisd",'
                       'cause="max_requests"}', "values": "0+5x15"},
        ],
        "alert_rule_test": [
            alert("AmavisdDown", "6m"),
            alert("AmavisdDown", "10m", {"instance": "a", "job": "amavisd",
                                         "severity": "critical"},
                  "amavisd on a does not answer scrapes",
                  "Mail waits in the MTA's queue (or is tempfailed) while the filter is down."),
            alert("AmavisdWorkersDying", "15m", {"instance": "a", "severity": "warning"},
                  "amavisd on a: 10 workers crashed or were killed in 15 minutes"),
        ],
    },
]


def test_each_alert_fires_when_it_should_and_not_before(tmp_path):
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": RULE_TESTS}
    path = tmp_path / "amavisd-rules.test.yml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# -- the dashboard -------------------------------------------------------------------


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    found = []
    todo = list(board["panels"])
    while todo:
        panel = todo.pop()
        todo.extend(panel.get("panels", []))
        found += [target["expr"] for target in panel.get("targets", [])]
    return found


def test_the_dashboard_is_valid_json_with_the_panels_the_issue_asks_for():
    board = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Throughput by ingress", "Verdict mix", "Latency percentiles (end to end)",
                   "Worker saturation", "Scanner requests, errors, timeouts",
                   "Tempfail causes"):
        assert wanted in titles
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["gridPos"]["w"] <= 24 for p in board["panels"])
    assert len(dashboard_expressions()) >= 25


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_dashboard_and_alert_expression_names_an_exported_metric(metrics_on):  # noqa: F811
    """An in-process daemon: a worker that saw every kind of event, the
    master's view of its workers; the names a scrape shows must cover every
    name the dashboard and the rules use."""
    def work():
        one_message("d-1", "INFECTED", "Eicar-Test-Signature")
        metrics.banned_hit("deny name ~ \\.exe$")
        metrics.parts_decoded(["zip"])
        metrics.quarantine_write(True)
        metrics.notification(True)
        metrics.scanner_failed("clamd")
        metrics.tempfail("virus scanner unavailable")
    metrics.declare()
    metrics_on.fold(in_worker(work))
    master = types.SimpleNamespace(workers={}, config=configuration.load(None, {}))
    names = exported_names(exposition(Scrape(metrics_on, master)))
    used = {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
    used |= set(METRIC_NAME.findall(RULES.read_text()))
    missing = used - names
    assert not missing, f"not exported: {sorted(missing)}"
    assert len(used) >= 18
