"""Scanners: a real clamd first, the real clamscan as its backup, fail-safe.

The only fake is `StallingClamdProxy` (a clamd that accepts and never
answers, which a real clamd cannot be made to do on demand).
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.envelope import Job
from amavisd.pipeline import Pipeline
from amavisd.scan.scanners import build_scanner_set, check_definitions
from amavisd.testing import clamd as clamd_testing
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message
from tests.rigs.daemon import DaemonInstance
from tests.rigs.faults import StallingClamdProxy

pytestmark = pytest.mark.integration
# These tests check the mechanics through the MTA-visible reject (exit 69);
# the default, discard after quarantine, has its own tests (test_policy).
REJECTING = {"virus_destiny": "reject"}
REPO = Path(__file__).resolve().parents[2]
DEAD = "unix:/nonexistent/amavisd-test/clamd.sock"


@pytest.fixture
def clamd(short_tmp):
    if clamd_testing.skip_reason():
        pytest.skip(clamd_testing.skip_reason())
    instance = clamd_testing.ClamdInstance(short_tmp / "c", stream_max_length="1M").start()
    yield instance
    instance.stop()


def settings(clamd, **more):
    return {"clamd": clamd.address, "scanners": {"clamscan": clamd.clamscan_table()},
            "scanner_retry_after": 0.0} | more


def pipeline_for(**values) -> Pipeline:
    return Pipeline(configuration.load(None, values))


def process(pipeline: Pipeline, raw: bytes, tmp: Path, name: str = "m.eml"):
    path = tmp / name
    path.write_bytes(raw)
    return pipeline.process(Job(log_id="t", mail_path=str(path)))


def many_attachments(count: int, eicar_at: int | None = None) -> bytes:
    parts = [b"From: a@example.test\nTo: b@example.test\nSubject: many\nMIME-Version: 1.0\n"
             b'Content-Type: multipart/mixed; boundary="B"\n\n']
    for n in range(count):
        body = EICAR if n == eicar_at else f"attachment number {n}\n".encode() * 3
        parts.append(b"--B\nContent-Type: application/octet-stream; name=\"f%d.bin\"\n"
                     b"Content-Transfer-Encoding: base64\n\n" % n + base64.encodebytes(body))
    parts.append(b"--B--\n")
    return b"".join(parts)


def big_message(size: int, eicar: bool) -> bytes:
    payload = b"x" * size + (EICAR if eicar else b"")
    return (b"From: a@example.test\nTo: b@example.test\nSubject: big\nMIME-Version: 1.0\n"
            b"Content-Type: application/octet-stream; name=big.bin\n"
            b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(payload))


# -- primary and backup ------------------------------------------------------------


def test_clamd_down_the_backup_clamscan_gives_the_same_verdicts(clamd, tmp_path):
    up = pipeline_for(**settings(clamd))
    infected = process(up, eicar_message(), tmp_path)
    assert infected.verdict == "INFECTED" and infected.scanned_by == ["clamd"]
    clamd.stop()
    down = pipeline_for(**settings(clamd))
    result = process(down, eicar_message(), tmp_path)
    assert result.verdict == "INFECTED"
    assert result.scanned_by == ["clamscan"]
    assert {f.scanner for f in result.findings} == {"clamscan"}
    assert result.viruses == infected.viruses  # same engine, same signature name
    assert process(down, clean_message(), tmp_path).verdict == "CLEAN"


def test_no_scanner_at_all_is_a_tempfail(clamd, tmp_path):
    clamd.stop()
    broken = {"type": "command", "argv": ["clamscan", "--database=/nonexistent", "{files}"]}
    pipeline = pipeline_for(**settings(clamd, scanners={"clamscan": broken}))
    result = process(pipeline, eicar_message(), tmp_path)
    assert result.verdict == "TEMPFAIL" and result.destiny.value == "tempfail"
    assert "no virus scanner answered" in result.tempfail_reason
    assert "clamd" in result.tempfail_reason and "clamscan" in result.tempfail_reason


def test_sites_may_pass_unscanned_mail_with_an_alert_header(clamd, tmp_path):
    clamd.stop()
    pipeline = pipeline_for(clamd=clamd.address, backup_scanners=[],
                            when_scanners_fail="pass")
    result = process(pipeline, clean_message(), tmp_path)
    assert result.destiny.value == "pass" and result.verdict == "UNCHECKED"
    alerts = [e.value for e in result.header_edits if e.name == "X-Amavis-Alert"]
    assert alerts and alerts[0].startswith("NOT SCANNED")
    # the header goes out with the mail: the class of failure, never clamd's path or errno
    assert alerts[0] == "NOT SCANNED: virus scanner unavailable", alerts
    assert str(clamd.address).split(":", 1)[-1] not in alerts[0]


def test_both_down_through_the_client_and_ampdp(short_tmp, clamd):
    clamd.stop()
    broken = {"type": "command", "argv": ["/nonexistent/clamscan", "{files}"]}
    with DaemonInstance(short_tmp / "d", clamd.address, backup_scanners=["clamscan"],
                        scanners={"clamscan": broken}, **REJECTING) as daemon:
        message = short_tmp / "m.eml"
        message.write_bytes(eicar_message())
        proc = daemon.client(str(message))
        assert proc.returncode == 75, proc.stdout
        assert "451 4.5.0" in proc.stdout.decode()
        from tests.integration.test_daemon import ampdp, spool

        path = spool(daemon, eicar_message())
        reply = ampdp(daemon.socket_path, [("request", "AM.PDP"), ("mail_file", str(path)),
                                           ("tempdir", str(path.parent))])
        assert reply.get("return_value") == "tempfail"
        # the class of the failure; which scanners and why is in the log (issue 12)
        assert reply.get("setreply").endswith("TEMPFAIL: virus scanner unavailable")
        assert "no virus scanner answered" in daemon.log_text()


def test_primary_mode_first_stops_at_the_first_answer(clamd, tmp_path):
    values = settings(clamd, primary_scanners=["clamd", "clamscan"], backup_scanners=[])
    every = process(pipeline_for(**values), eicar_message(), tmp_path)
    assert every.scanned_by == ["clamd", "clamscan"]
    assert {f.scanner for f in every.findings} == {"clamd", "clamscan"}
    first = process(pipeline_for(**values | {"primary_mode": "first"}), eicar_message(),
                    tmp_path)
    assert first.scanned_by == ["clamd"] and first.verdict == "INFECTED"


def test_a_scanner_coming_back_is_used_again_without_a_restart(clamd, tmp_path):
    pipeline = pipeline_for(**settings(clamd, scanner_retry_after=0.5))
    assert process(pipeline, clean_message(), tmp_path).scanned_by == ["clamd"]
    clamd.stop()
    assert process(pipeline, clean_message(), tmp_path).scanned_by == ["clamscan"]
    resting = process(pipeline, clean_message(), tmp_path)
    assert resting.scanned_by == ["clamscan"]  # not even tried while it rests
    clamd.start()
    time.sleep(0.6)
    assert process(pipeline, eicar_message(), tmp_path).scanned_by == ["clamd"]


# -- a clamd that never answers (the named fake) ---------------------------------------


def test_a_hung_clamd_times_out_then_tempfail_and_the_worker_stays_usable(clamd, short_tmp):
    proxy = StallingClamdProxy(short_tmp / "stall.sock", clamd.socket_path, stall=True).start()
    try:
        with DaemonInstance(short_tmp / "d", proxy.address, workers=1, clamd_timeout=2.0,
                            scanner_retry_after=0.0, **REJECTING) as daemon:
            message = short_tmp / "m.eml"
            message.write_bytes(eicar_message())
            started = time.monotonic()
            proc = daemon.client(str(message))
            elapsed = time.monotonic() - started
            assert proc.returncode == 75
            assert 1.5 < elapsed < 6.0, elapsed
            assert "no answer within 2s" in daemon.log_text()
            workers = daemon.worker_pids()
            proxy.stall = False
            assert daemon.client(str(message)).returncode == 69  # found, same worker
            assert daemon.worker_pids() == workers
    finally:
        proxy.stop()


# -- many parts, big parts ----------------------------------------------------------


def test_300_attachments_cost_one_clamd_connection(clamd, short_tmp, tmp_path):
    proxy = StallingClamdProxy(short_tmp / "count.sock", clamd.socket_path).start()
    try:
        pipeline = pipeline_for(clamd=proxy.address, backup_scanners=[])
        result = process(pipeline, many_attachments(300, eicar_at=299), tmp_path)
        assert result.verdict == "INFECTED"
        assert len(result.parts) >= 300
        assert len(proxy.peer_pids) == 1  # one IDSESSION for the whole message
        assert result.findings[0].part.endswith(result.parts[-1].id)
    finally:
        proxy.stop()


def test_a_part_over_stream_max_length_is_never_clean(clamd, tmp_path):
    # clamd refuses streams over 1M; we think the limit is higher, so clamd says so itself
    pipeline = pipeline_for(clamd=clamd.address, clamd_max_stream=100 * 1024 * 1024,
                            backup_scanners=[])
    result = process(pipeline, big_message(3 * 1024 * 1024, eicar=False), tmp_path)
    assert result.verdict == "UNCHECKED"
    assert "StreamMaxLength" in result.summary()
    # when we know the limit, the part is not even sent
    known = pipeline_for(clamd=clamd.address, clamd_max_stream=1024 * 1024, backup_scanners=[])
    assert process(known, big_message(3 * 1024 * 1024, eicar=False),
                   tmp_path).verdict == "UNCHECKED"


def test_the_backup_scans_what_clamd_could_not_take(clamd, tmp_path):
    pipeline = pipeline_for(**settings(clamd, clamd_max_stream=100 * 1024 * 1024))
    result = process(pipeline, big_message(3 * 1024 * 1024, eicar=True), tmp_path)
    assert result.verdict == "INFECTED"
    assert [f.scanner for f in result.findings] == ["clamscan"]
    assert result.scanned_by == ["clamd", "clamscan"]
    clean = process(pipeline, big_message(3 * 1024 * 1024, eicar=False), tmp_path)
    assert clean.verdict == "CLEAN", clean.summary()


def test_other_parts_are_still_scanned_after_clamd_refuses_one(clamd, tmp_path):
    big = base64.encodebytes(b"x" * (3 * 1024 * 1024))
    raw = (b"From: a@example.test\nTo: b@example.test\nSubject: t\nMIME-Version: 1.0\n"
           b'Content-Type: multipart/mixed; boundary="B"\n\n'
           b"--B\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
           + big + b"--B\nContent-Type: application/octet-stream\n"
           b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(EICAR) + b"--B--\n")
    pipeline = pipeline_for(clamd=clamd.address, clamd_max_stream=100 * 1024 * 1024,
                            backup_scanners=[])
    result = process(pipeline, raw, tmp_path)
    assert result.verdict == "INFECTED"  # the refused part did not hide the virus after it


# -- command-line scanners and health ------------------------------------------------


def test_an_unknown_exit_status_is_an_error_not_clean(clamd, tmp_path):
    odd = {"type": "command", "argv": ["sh", "-c", "exit 7", "odd-scanner", "{files}"]}
    pipeline = pipeline_for(clamd=DEAD, backup_scanners=["odd"], scanners={"odd": odd})
    result = process(pipeline, clean_message(), tmp_path)
    assert result.verdict == "TEMPFAIL" and "odd: exit status 7" in result.tempfail_reason


def test_a_hanging_command_scanner_is_killed_at_its_timeout(clamd, tmp_path):
    # a named fake: a "scanner" that sleeps forever
    sleeper = {"type": "command", "argv": ["sh", "-c", "sleep 60", "sleeper", "{files}"],
               "timeout": 1.0}
    pipeline = pipeline_for(clamd=DEAD, backup_scanners=["sleeper"],
                            scanners={"sleeper": sleeper})
    started = time.monotonic()
    result = process(pipeline, clean_message(), tmp_path)
    assert result.verdict == "TEMPFAIL" and "no answer within 1s" in result.tempfail_reason
    assert time.monotonic() - started < 5


def test_check_scanners_reports_versions_and_failures(clamd, short_tmp):
    config = short_tmp / "a.toml"
    values = configuration.defaults() | settings(clamd, backup_scanners=["clamscan"])
    config.write_text(configuration.render(values, commented=False))
    run = [sys.executable, "-m", "amavisd", "check-scanners", "-c", str(config)]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "primary clamd: ok: ClamAV " in proc.stdout
    assert "backup  clamscan: ok: ClamAV " in proc.stdout
    clamd.stop()
    proc = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 69
    assert "primary clamd: FAILED: clamd at unix:" in proc.stdout


def test_shipped_scanner_examples_are_valid_definitions():
    text = (REPO / "etc" / "scanners-examples.toml").read_text()
    uncommented = "\n".join(line[2:] for line in text.splitlines() if line.startswith("# ["))
    import tomllib

    body = "\n".join(line[2:] for line in text.splitlines()
                     if line.startswith("# ") and (line[2:3] == "[" or " = " in line))
    tables = tomllib.loads(body)["scanners"]
    assert len(tables) >= 6 and "clamscan" in tables and uncommented
    checked = check_definitions(tables)
    scanners = build_scanner_set(configuration.load(
        None, {"scanners": tables, "primary_scanners": ",".join(checked)}))
    assert [s.name for s in scanners.primary] == list(tables)


def test_a_bad_scanner_table_is_a_one_line_config_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[scanners.x]\ntype = "command"\nargv = ["scan"]\n')
    with pytest.raises(configuration.ConfigError, match=r"scanners.x: argv must contain"):
        configuration.load(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[scan]\nprimary_scanners = ["nope"]\n')
    with pytest.raises(configuration.ConfigError, match="no scanner named 'nope'"):
        configuration.load(str(unknown))


def test_a_part_clamd_gave_up_on_is_unchecked_not_a_virus(short_tmp, tmp_path):
    """clamd past its own limit (here MaxFileSize) with AlertExceedsMax says
    Heuristics.Limits.Exceeded...: a part nobody read to its end. Without that
    setting clamd says OK (what the README warns of); with it, UNCHECKED."""
    if clamd_testing.skip_reason():
        pytest.skip(clamd_testing.skip_reason())
    with clamd_testing.ClamdInstance(short_tmp / "lim", options=(
            "AlertExceedsMax yes", "MaxFileSize 4000", "MaxScanSize 4000")) as limited:
        pipeline = pipeline_for(clamd=limited.address, backup_scanners=[])
        result = process(pipeline, big_message(6000, eicar=False), tmp_path)
        assert result.verdict == "UNCHECKED", result.summary()
        assert not result.findings
        assert "gave up at its limit (Heuristics.Limits.Exceeded.MaxFileSize)" in result.summary()
        # under the limit, the same clamd still finds what it finds
        small = process(pipeline, big_message(100, eicar=True), tmp_path, "s.eml")
        assert small.verdict == "INFECTED", small.summary()


def test_our_clamd_timeout_ends_before_clamds_default_max_scan_time():
    """clamd cuts a scan short at MaxScanTime (120 s unless set) and, without
    AlertExceedsMax, answers OK for it: our timeout (a tempfail) must come first."""
    clamd_default_max_scan_time = 120.0
    assert configuration.load(None, {})["clamd_timeout"] < clamd_default_max_scan_time
