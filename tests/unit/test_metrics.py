"""The metrics seam (amavisd.metrics) in multiprocess mode, with real forked
processes standing for workers and the master's own fold and scrape
(amavisd.observe): exact counts across recycled workers, an exposition
promtool accepts, bounded labels whatever a message holds, a scrape that
stays cheap after 1,000 recycled workers, and a metrics dir made safely."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from amavisd import config as configuration
from amavisd import metrics
from amavisd.observe import collect, exporter, store
from amavisd.observe.collect import TOP_NAMES, Scrape, TopNames
from amavisd.observe.labels import MAX_LENGTH, OTHER
from amavisd.verdict import Category, Destiny, Finding, Result, Unchecked

PROMTOOL = shutil.which("promtool")


@pytest.fixture
def metrics_on(tmp_path):
    """Metrics on in this process (as `amavisd run` turns them on in the
    master), in a private dir; off again, and the library's storage as it
    was, afterwards."""
    from prometheus_client import values

    saved = values.ValueClass
    cfg = configuration.load(None, {"workdir": str(tmp_path),
                                    "metrics_listen": "127.0.0.1:9825"})
    directory = metrics.metrics_dir(cfg)
    store.prepare(directory)
    assert metrics.setup(cfg)
    yield store.Store(directory)
    metrics.disable()
    values.ValueClass = saved


def in_worker(work) -> int:
    """Run `work` in a forked child (a worker), wait for it; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def exposition(scrape: Scrape) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(scrape)
    return generate_latest(registry).decode()


def values(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(text: str, sample: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values(text).items()
               if n == sample and all(dict(ls).get(k) == want for k, want in labels.items()))


def promtool_check(text: str) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def one_message(log_id: str, verdict: str = "CLEAN", virus: str = "") -> None:
    """What a worker's verbs do for one message (in the order the worker and
    the pipeline call them)."""
    metrics.connected("ampdp")
    metrics.worker_busy(log_id, "4XyZ1")
    for stage in ("spool", "decode", "scan", "act"):
        metrics.lap(stage)
    metrics.scanner_request("clamd", 0.002)
    result = Result(log_id=log_id, category=Category[verdict],
                    destiny=Destiny.DISCARD if virus else Destiny.PASS, size=1234)
    if virus:
        result.findings.append(Finding(part="p001", name=virus, scanner="clamd"))
    metrics.finished(result)
    metrics.worker_idle()


# -- off ---------------------------------------------------------------------------


def test_the_verbs_do_nothing_while_metrics_are_off(tmp_path):
    metrics.disable()
    cfg = configuration.load(None, {"workdir": str(tmp_path), "metrics_listen": ""})
    assert not metrics.setup(cfg)  # empty metrics_listen: off
    one_message("1-01", "INFECTED", "Eicar-Test-Signature")
    metrics.worker_exit("crash")
    assert not (tmp_path / "metrics").exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


# -- counting across processes -----------------------------------------------------


def test_counts_from_recycled_workers_add_up_exactly_and_the_files_are_folded(metrics_on):
    """Five workers come and go; the master folds each one it reaps. The
    scrape has every message once, and the dir holds the archive and the
    master's files only, not one set per dead worker."""
    metrics.declare()
    for worker in range(5):
        def work(worker=worker):
            for n in range(3):
                one_message(f"{worker}-{n}", "INFECTED" if n == 0 else "CLEAN",
                            "Eicar-Test-Signature" if n == 0 else "")
        pid = in_worker(work)
        metrics_on.fold(pid)
    text = exposition(Scrape(metrics_on))
    assert total(text, "amavisd_messages_total") == 15
    assert total(text, "amavisd_messages_total", verdict="INFECTED", destiny="discard") == 5
    assert total(text, "amavisd_messages_total", verdict="CLEAN", ingress="ampdp") == 10
    assert total(text, "amavisd_received_bytes_total") == 15 * 1234
    assert total(text, "amavisd_message_duration_seconds_count") == 15
    assert total(text, "amavisd_stage_duration_seconds_count", stage="scan") == 15
    assert total(text, "amavisd_scanner_requests_total", scanner="clamd") == 15
    assert total(text, "amavisd_detections_total", name="Eicar-Test-Signature") == 5
    assert total(text, "amavisd_message_duration_seconds_bucket", le="+Inf") == 15
    assert values(text)[("amavisd_scanner_last_success_timestamp_seconds",
                         (("scanner", "clamd"),))] > time.time() - 60
    names = sorted(os.listdir(metrics_on.directory))
    assert not [n for n in names if n.endswith(".slot")]
    dead = [n for n in names if n.endswith(".db") and "archive" not in n
            and not n.endswith(f"_{os.getpid()}.db")]
    assert dead == [], names
    promtool_check(text)


def test_a_worker_killed_between_messages_keeps_its_counts(metrics_on):
    """SIGKILL leaves no chance to flush: the counts are in the mmap'd file
    already, and the fold of the killed worker keeps them."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        one_message("k-1")
        one_message("k-2")
        os.write(write, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"x"
    os.close(read)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    metrics_on.fold(pid)
    assert total(exposition(Scrape(metrics_on)), "amavisd_messages_total") == 2


def test_the_master_counts_worker_exits_by_cause(metrics_on):
    metrics.declare()
    for cause in ("max_requests", "max_requests", "crash", "nonsense"):
        metrics.worker_exit(cause)
    text = exposition(Scrape(metrics_on))
    assert total(text, "amavisd_worker_exits_total", cause="max_requests") == 2
    assert total(text, "amavisd_worker_exits_total", cause="crash") == 1
    assert total(text, "amavisd_worker_exits_total", cause="reload") == 0  # declared at zero
    assert total(text, "amavisd_worker_exits_total", cause="other") == 1  # nonsense: bounded
    assert not [k for k in values(text) if ("cause", "nonsense") in k[1]]


@pytest.mark.parametrize(("state", "code", "cause"), [
    ("serving", 0, "max_requests"), ("serving", 1, "crash"), ("serving", -9, "crash"),
    ("aborting", -9, "child_timeout"), ("serving", 4, "child_timeout"),
    ("retiring", 0, "reload"), ("stopping", 0, "stop"), ("killed", -9, "killed"),
    ("booting", 3, "boot_error")])
def test_exit_causes_from_the_masters_state_and_the_exit_status(state, code, cause):
    assert exporter.exit_cause(state, code) == cause


def test_every_verb_feeds_a_series_promtool_accepts(metrics_on):
    def work():
        one_message("v-1", "INFECTED", "Win.Test.EICAR_HDB-1")
        result = Result(log_id="v-2", category=None, destiny=Destiny.TEMPFAIL,
                        public_reason="virus scanner unavailable")
        result.unchecked.append(Unchecked("too deep", "limit"))
        metrics.finished(result)
        metrics.parts_decoded(["zip", "mail", "", "zip"])
        metrics.banned_hit(r"deny name ~ \.exe$")
        metrics.unchecked("encrypted")
        metrics.tempfail("temporary local problem")
        metrics.scanner_request("clamd", 120.0, TimeoutError("no answer"))
        metrics.scanner_failed("clamd")
        metrics.quarantine_write(True)
        metrics.quarantine_write(False)
        metrics.notification(True)
        metrics.stage("decode", 0.5)
    metrics_on.fold(in_worker(work))
    text = exposition(Scrape(metrics_on))
    assert total(text, "amavisd_tempfails_total", cause="scanner_unavailable") == 1
    assert total(text, "amavisd_tempfails_total", cause="local_problem") == 1
    assert total(text, "amavisd_unchecked_total", kind="limit") == 1
    assert total(text, "amavisd_parts_decoded_total", type="zip") == 2
    assert total(text, "amavisd_parts_decoded_total", type="unknown") == 1
    assert total(text, "amavisd_scanner_timeouts_total", scanner="clamd") == 1
    assert total(text, "amavisd_scanner_errors_total", scanner="clamd") == 1
    assert total(text, "amavisd_quarantine_writes_total", outcome="failed") == 1
    assert total(text, "amavisd_notifications_total", outcome="ok") == 1
    assert total(text, "amavisd_banned_hits_total") == 1
    assert total(text, "amavisd_build_info") == 1
    promtool_check(text)


# -- bounded labels ---------------------------------------------------------------


def test_hostile_names_are_cleaned_and_their_number_is_bounded(metrics_on):
    """Virus names, types and rules reach labels cleaned (printable ASCII,
    bounded length) and capped per process; the exposition stays valid."""
    def work():
        metrics.detection('Evil"Name\n} 1\nfake_metric 99')
        metrics.detection("x" * 5000)
        metrics.detection("Ünïcode.Wörm")
        metrics.parts_decoded(f"type-{n}" for n in range(500))
        for n in range(300):
            metrics.detection(f"Generated.Name-{n}")
    metrics_on.fold(in_worker(work))
    text = exposition(Scrape(metrics_on))
    promtool_check(text)
    assert "fake_metric" not in [f.name for f in text_string_to_metric_families(text)]
    labels = [dict(ls) for (n, ls) in values(text) if n == "amavisd_parts_decoded_total"]
    assert len(labels) <= 101  # 100 a process, then other
    assert {"type": OTHER} in labels
    names = [dict(ls)["name"] for (n, ls) in values(text) if n == "amavisd_detections_total"]
    assert len(names) <= TOP_NAMES + 1
    assert all(len(name) <= MAX_LENGTH and name.isprintable() and name.isascii()
               for name in names)
    assert total(text, "amavisd_detections_total") == 303


def test_top_virus_names_never_go_down_and_add_up():
    """The export keeps the top names; a name that joins or leaves must not
    make any series decrease, and the series always sum to every detection."""
    top = TopNames(size=3)
    counts: dict[str, float] = {}
    last: dict[str, float] = {}
    schedule = [{"A": 5, "B": 1}, {"C": 2, "D": 1}, {"E": 30}, {"B": 1, "F": 2},
                {"A": 1, "G": 60}, {"E": 5, "H": 1}, {"C": 100}, {}]
    for step in schedule:
        for name, n in step.items():
            counts[name] = counts.get(name, 0) + n
        metric = _detections(counts)
        exported = {s.labels["name"]: s.value for s in top.export(metric).samples}
        assert len(exported) <= 3 + 1
        assert sum(exported.values()) == sum(counts.values())
        for name, value in exported.items():
            if name in last and name in top.baselines | {OTHER: 0}:
                assert value >= last[name] or name not in last, (name, value, last)
        assert exported[OTHER] >= last.get(OTHER, 0)
        last = exported
    assert {"G", "C", "E"} <= set(last)  # the big ones made it in


def test_the_archive_keeps_a_bounded_number_of_names():
    top = TopNames(size=2)
    top.baselines = {"Kept": 0.0}
    metric = _detections({f"N{n}": n + 1 for n in range(3000)} | {"Kept": 1})
    top.shrink([metric])
    names = {s.labels["name"]: s.value for s in metric.samples}
    assert len(names) <= collect.ARCHIVE_NAMES
    assert "Kept" in names and "N2999" in names and "N0" not in names
    assert sum(names.values()) == sum(n + 1 for n in range(3000)) + 1


def _detections(counts: dict[str, float]):
    from prometheus_client.metrics_core import Metric

    metric = Metric("amavisd_detections", "test", "counter")
    for name, value in counts.items():
        metric.add_sample("amavisd_detections_total", {"name": name}, value)
    return metric


# -- cost --------------------------------------------------------------------------


def test_a_scrape_after_1000_recycled_workers_takes_under_50_ms(metrics_on):
    """A real worker's files, as 1,000 dead workers would have left them, each
    folded as the master reaps it: the scrape reads the archive and stays
    cheap, and every count is there."""
    def work():
        for n in range(20):
            one_message(f"w-{n}", "INFECTED" if n % 5 == 0 else "CLEAN",
                        f"Virus-{n % 7}" if n % 5 == 0 else "")
    template = in_worker(work)
    directory = Path(metrics_on.directory)
    sources = {p.name.split(f"_{template}.db")[0]: p.read_bytes()
               for p in directory.glob(f"*_{template}.db")}
    for p in directory.glob(f"*_{template}.db"):
        p.unlink()
    started = time.perf_counter()
    for fake in range(10_000_000, 10_001_000):
        for prefix, data in sources.items():
            (directory / f"{prefix}_{fake}.db").write_bytes(data)
        metrics_on.fold(fake)
    folding = (time.perf_counter() - started) / 1000
    scrape = Scrape(metrics_on)
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        text = exposition(scrape)
        timings.append(time.perf_counter() - started)
    median = statistics.median(timings)
    print(f"\nfold {folding * 1000:.1f} ms a worker; scrape after 1000 folded workers: "
          f"{median * 1000:.1f} ms (median of 7)")
    assert total(text, "amavisd_messages_total") == 20_000
    assert total(text, "amavisd_detections_total") == 4_000
    assert len(list(directory.glob("*.db"))) <= 6
    assert median < 0.050


# -- the metrics dir ----------------------------------------------------------------


def test_prepare_empties_our_files_only_and_makes_the_dir_private(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o755)
    for name in ("counter_12.db", "histogram_archive.db", "gauge_max_7.db",
                 "gauge_livesum_9.db", "counter_archive.tmp", "worker-77.slot"):
        (directory / name).write_bytes(b"old")
    (directory / "notes.txt").write_text("the admin's")
    (directory / "sub").mkdir()
    store.prepare(str(directory))
    assert sorted(os.listdir(directory)) == ["notes.txt", "sub"]
    assert (directory.stat().st_mode & 0o777) == 0o700


def test_prepare_refuses_a_symlink_and_a_dir_of_someone_else(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "counter_1.db").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(store.MetricsDirError, match="symlink"):
        store.prepare(str(tmp_path / "link"))
    assert (real / "counter_1.db").exists()
    if os.geteuid() != 0:
        pytest.skip("needs root to give a dir to another user")
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(store.MetricsDirError, match="belongs to uid 65534"):
        store.prepare(str(other))


def test_a_metrics_dir_that_cannot_be_made_turns_metrics_off_not_the_daemon(tmp_path, caplog):
    cfg = configuration.load(None, {"workdir": str(tmp_path / "missing" / "deeper"),
                                    "metrics_listen": "127.0.0.1:9825"})
    from prometheus_client import values

    saved = values.ValueClass
    try:
        assert metrics.setup(cfg)
        exporter.bind(cfg)
        assert not metrics.enabled()
        assert "metrics off" in caplog.text
    finally:
        metrics.disable()
        values.ValueClass = saved


def test_a_forward_that_does_not_go_is_counted_as_a_tempfail(metrics_on):
    """delivery_care_of=server: the verdict was pass, but the next hop (here a
    port nobody listens on) did not take the mail: a tempfail by cause."""
    from amavisd.envelope import Envelope
    from amavisd.policy.destinies import REPLIES
    from amavisd.protocol.server_delivery import ServerDelivery
    from tests.rigs.postfix import free_port

    def work():
        cfg = configuration.load(None, {"forward_method": f"smtp:[127.0.0.1]:{free_port()}",
                                        "forward_timeout": 10.0})
        result = Result(log_id="f-1", category=Category.CLEAN, destiny=Destiny.PASS)
        answer = ServerDelivery(cfg).deliver(result, Envelope(sender="a@example.org",
                                                              recipients=["b@example.net"]),
                                             b"Subject: hi\n\nhello\n")
        assert answer.row is REPLIES[Destiny.TEMPFAIL]
    metrics_on.fold(in_worker(work))
    text = exposition(Scrape(metrics_on))
    assert total(text, "amavisd_tempfails_total", cause="relay_tempfail") == 1


def test_a_worker_aborted_past_child_timeout_counts_its_tempfail(metrics_on):
    """Its client heard "tempfail" in the worker's last words; only the
    master, reaping it, can count that."""
    import socket

    sock = socket.create_server(("127.0.0.1", 0))
    try:
        reaper = exporter.Exporter(configuration.load(None, {}), sock, metrics_on.directory)
        reaper.reaped(999_999_999, exporter.exit_cause("aborting", -9))
        reaper.reaped(999_999_998, exporter.exit_cause("serving", 0))
    finally:
        sock.close()
    text = exposition(Scrape(metrics_on))
    assert total(text, "amavisd_worker_exits_total", cause="child_timeout") == 1
    assert total(text, "amavisd_worker_exits_total", cause="max_requests") == 1
    assert total(text, "amavisd_tempfails_total", cause="child_timeout") == 1
    assert total(text, "amavisd_tempfails_total") == 1
