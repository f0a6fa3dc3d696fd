"""clamd round trips: a window of INSTREAMs in flight, one session kept per worker.

Against a real clamd: replies out of order matched by number, one session
for many messages, clamd restarted or timing the session out between
messages, a refusal in the middle of a window, EICAR first and last of
1,000 parts, through the daemon too. The one fake is `ScriptedClamd` below,
for replies a real clamd never sends (duplicated, unknown, truncated,
unnumbered, an end of file in the middle of a window): each must leave the
message unscanned (tempfail), never clean.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd.decode.parts import Part
from amavisd.pipeline import Pipeline
from amavisd.scan.base import ScannerError
from amavisd.scan.clamd import ClamdScanner
from amavisd.scan.clamd_session import ClamdSession, parse_reply
from amavisd.scan.scanners import ScannerSet
from amavisd.testing import clamd as clamd_testing
from amavisd.testing.eicar import EICAR
from amavisd.testing.messages import clean_message, eicar_message
from tests.integration.test_scanners import many_attachments, process
from tests.rigs.daemon import DaemonInstance
from tests.rigs.faults import StallingClamdProxy

pytestmark = pytest.mark.integration
EICAR_NAME = "Eicar-Test-Signature"


def parts_of(*blobs: bytes) -> list[Part]:
    return [Part(id=f"p{n:03d}", data=blob) for n, blob in enumerate(blobs, 1)]


def found_in(report) -> dict[str, str]:
    return {f.part: f.name for f in report.findings}


def own_clamd(short_tmp: Path, **options) -> clamd_testing.ClamdInstance:
    if clamd_testing.skip_reason():
        pytest.skip(clamd_testing.skip_reason())
    return clamd_testing.ClamdInstance(short_tmp / "c", **options).start()


def clamd_pipeline(scanner: ClamdScanner) -> Pipeline:
    return Pipeline(configuration.load(None, {"backup_scanners": []}), scanners=[scanner])


class RecordingScanner(ClamdScanner):
    """The real scanner, noting the request number of each reply as it is booked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.order: list[int] = []

    def _settle(self, reply, *args):
        self.order.append(int(reply.split(":", 1)[0]))
        return super()._settle(reply, *args)


# -- a real clamd ---------------------------------------------------------------------


def test_replies_out_of_order_are_matched_by_their_number(clamd_nodecomp):
    """A big part first, small ones after it in the same window: clamd answers
    the small ones first; each verdict still lands on its own part."""
    big = os.urandom(6 * 1024 * 1024)
    smalls = [b"small %d\n" % n for n in range(7)]
    smalls[2] = smalls[5] = EICAR
    out_of_order = 0
    for _ in range(5):
        scanner = RecordingScanner(clamd_nodecomp.address, window_bytes=16 * 1024 * 1024)
        report = scanner.scan(parts_of(big, *smalls))
        assert set(found_in(report)) == {"p004", "p007"}, report
        assert all(name.startswith(EICAR_NAME) for name in found_in(report).values())
        assert sorted(scanner.order) == list(range(1, 9)) and scanner.connections == 1
        out_of_order += scanner.order != sorted(scanner.order)
        if out_of_order:
            break
    assert out_of_order, "clamd answered in order every time: the test proves nothing"


def test_one_session_for_many_messages(clamd_nodecomp, tmp_path):
    scanner = ClamdScanner(clamd_nodecomp.address)
    pipeline = clamd_pipeline(scanner)
    verdicts = [process(pipeline, eicar_message() if n % 3 == 0 else clean_message(),
                        tmp_path).verdict for n in range(12)]
    assert verdicts == ["INFECTED", "CLEAN", "CLEAN"] * 4
    assert scanner.connections == 1 and scanner.retries == 0


def test_clamd_restarted_between_two_messages(short_tmp, tmp_path):
    clamd = own_clamd(short_tmp)
    try:
        scanner = ClamdScanner(clamd.address)
        pipeline = clamd_pipeline(scanner)
        assert process(pipeline, clean_message(), tmp_path).verdict == "CLEAN"
        clamd.stop()
        clamd.start()
        result = process(pipeline, eicar_message(), tmp_path)
        assert result.verdict == "INFECTED" and result.scanned_by == ["clamd"]
        # the dead session was noticed before use: a new connection, no resend
        assert scanner.connections == 2 and scanner.retries == 0
    finally:
        clamd.stop()


def test_clamd_timing_the_session_out_between_messages(short_tmp, tmp_path):
    clamd = own_clamd(short_tmp, read_timeout=1)
    try:
        scanner = ClamdScanner(clamd.address)
        pipeline = clamd_pipeline(scanner)
        assert process(pipeline, clean_message(), tmp_path).verdict == "CLEAN"
        time.sleep(2.5)  # clamd: "COMMAND READ TIMED OUT", and it closes the session
        assert process(pipeline, eicar_message(), tmp_path).verdict == "INFECTED"
        assert scanner.connections == 2 and scanner.retries == 0
    finally:
        clamd.stop()


def test_a_session_closed_as_it_is_reused_sends_the_message_again_once(
        short_tmp, tmp_path, monkeypatch):
    """clamd times the session out between our check and our request (made
    certain by skipping the check): the message goes again on a new session."""
    clamd = own_clamd(short_tmp, read_timeout=1)
    try:
        scanner = ClamdScanner(clamd.address)
        pipeline = clamd_pipeline(scanner)
        assert process(pipeline, clean_message(), tmp_path).verdict == "CLEAN"
        time.sleep(2.5)
        monkeypatch.setattr(ClamdSession, "usable", lambda self: True)
        result = process(pipeline, many_attachments(20, eicar_at=19), tmp_path)
        assert result.verdict == "INFECTED", result.summary()
        assert scanner.retries == 1 and scanner.connections == 2
        clamd.stop()  # sent again once, then a failure like any other
        with pytest.raises(ScannerError, match="cannot connect"):
            scanner.scan(parts_of(b"hello"))
        assert scanner.retries == 2
    finally:
        clamd.stop()


@pytest.mark.parametrize("eicar_at", [0, 999])
def test_eicar_first_or_last_of_1000_parts(clamd_nodecomp, tmp_path, eicar_at):
    scanner = ClamdScanner(clamd_nodecomp.address)
    pipeline = clamd_pipeline(scanner)
    started = time.monotonic()
    result = process(pipeline, many_attachments(1000, eicar_at=eicar_at), tmp_path)
    took = time.monotonic() - started
    assert result.verdict == "INFECTED"
    leaves = [p for p in result.parts if p.data.startswith(b"attachment") or p.data == EICAR]
    assert len(leaves) == 1000
    assert [f.part for f in result.findings] == [leaves[eicar_at].path]
    assert scanner.connections == 1
    print(f"\n1,000 parts, EICAR at {eicar_at}: {took * 1000:.0f} ms")


def test_a_refusal_inside_a_window_misses_only_that_part(short_tmp):
    clamd = own_clamd(short_tmp, stream_max_length="100K")
    try:
        scanner = ClamdScanner(clamd.address)  # we think the limit is higher
        blobs = [b"one", b"two", b"x" * 300_000, b"four", EICAR, b"six"]
        report = scanner.scan(parts_of(*blobs))
        assert list(report.missed) == ["p003"] and "StreamMaxLength" in report.missed["p003"]
        assert list(found_in(report)) == ["p005"]
        assert scanner.connections == 2  # clamd hung up; the rest went on a new session
        assert process(clamd_pipeline(scanner), eicar_message(), short_tmp).verdict \
            == "INFECTED"
    finally:
        clamd.stop()


def test_a_child_process_never_uses_its_parents_session(clamd_nodecomp):
    scanner = ClamdScanner(clamd_nodecomp.address)
    assert not scanner.scan(parts_of(b"parent")).findings
    pid = os.fork()
    if pid == 0:  # the child: a session of its own; the parent's is left alone
        report = scanner.scan(parts_of(EICAR))
        os._exit(0 if found_in(report) and scanner.connections == 2 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list(found_in(scanner.scan(parts_of(b"x", EICAR)))) == ["p002"]
    assert scanner.connections == 1


def test_two_threads_at_once_each_get_their_own_answers(clamd_nodecomp):
    scanner = ClamdScanner(clamd_nodecomp.address)
    results: dict[int, dict[str, str]] = {}

    def scan(n: int) -> None:
        blobs = [b"clean %d-%d" % (n, i) for i in range(40)]
        blobs[n] = EICAR
        results[n] = found_in(scanner.scan(parts_of(*blobs)))

    threads = [threading.Thread(target=scan, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert {n: list(r) for n, r in results.items()} == {n: [f"p{n + 1:03d}"]
                                                        for n in range(4)}


def test_close_says_end_and_the_next_scan_connects_again(clamd_nodecomp):
    scanner = ClamdScanner(clamd_nodecomp.address)
    scanners = ScannerSet([scanner])
    scanners.scan(parts_of(b"a"))
    kept = scanner._kept
    assert kept is not None
    scanners.close()
    assert scanner._kept is None and kept.sock.fileno() == -1
    assert scanners.scan(parts_of(EICAR)).findings and scanner.connections == 2


def test_a_worker_keeps_one_session_through_the_daemon(clamd_nodecomp, short_tmp):
    proxy = StallingClamdProxy(short_tmp / "px.sock", clamd_nodecomp.socket_path).start()
    try:
        with DaemonInstance(short_tmp / "d", proxy.address, workers=1,
                            virus_destiny="reject") as daemon:
            message = short_tmp / "m.eml"
            for raw, code in [(clean_message(), 0), (eicar_message(), 69)] * 3:
                message.write_bytes(raw)
                assert daemon.client(str(message)).returncode == code
            (worker,) = daemon.worker_pids()
            assert proxy.peer_pids.count(worker) == 1, proxy.peer_pids
    finally:
        proxy.stop()


# -- the named fake: replies a real clamd never sends ------------------------------------


class ScriptedClamd:
    """A fake clamd (Unix socket) whose replies come from `script(number, data)`:
    bytes to send, or None to close the connection. It reads IDSESSION and
    INSTREAM requests the way clamd does; it scans nothing."""

    def __init__(self, path: Path, script: Callable[[int, bytes], bytes | None]):
        self.path = str(path)
        self.script = script
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return "unix:" + self.path

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self._session(conn.makefile("rb"), conn)
                except (OSError, struct.error):
                    pass

    def _session(self, reader, conn: socket.socket) -> None:
        assert reader.read(len(b"zIDSESSION\0")) == b"zIDSESSION\0"
        number = 0
        while (command := reader.read(len(b"zINSTREAM\0"))) == b"zINSTREAM\0":
            number += 1
            data = bytearray()
            while size := struct.unpack("!L", reader.read(4))[0]:
                data += reader.read(size)
            reply = self.script(number, bytes(data))
            if reply is None:
                return
            conn.sendall(reply)
        assert command in (b"", b"zEND\0"), command

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


def ok(number: int) -> bytes:
    return b"%d: stream: OK\0" % number


def truncated_third(number: int, data: bytes) -> bytes | None:
    """Whole replies to 1 and 2, half of the reply to 3, then an end of file."""
    return ok(number) if number < 3 else (ok(number)[:-3] if number == 3 else None)


SCRIPTS: dict[str, tuple[Callable[[int, bytes], bytes | None], str]] = {
    "duplicate number": (lambda n, d: ok(1), "request 1, answered already"),
    "unknown number": (lambda n, d: ok(n + 40), "request 41, never sent"),
    "no number": (lambda n, d: b"stream: OK\0", "unexpected reply"),
    "truncated reply": (truncated_third, "closed the connection after b'3: stream"),
    "end of file mid-window": (lambda n, d: ok(n) if n < 3 else None, "closed the connection"),
    "an ERROR reply": (lambda n, d: b"%d: stream: Can't allocate memory ERROR\0" % n,
                       "Can't allocate memory ERROR"),
}


@pytest.fixture
def scripted(short_tmp):
    made: list[ScriptedClamd] = []

    def make(script):
        made.append(ScriptedClamd(short_tmp / f"fake{len(made)}.sock", script))
        return made[-1]

    yield make
    for fake in made:
        fake.stop()


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_a_malformed_reply_leaves_the_message_unscanned(scripted, tmp_path, case):
    script, reason = SCRIPTS[case]
    fake = scripted(script)
    scanner = ClamdScanner(fake.address, timeout=5)
    with pytest.raises(ScannerError, match=reason):
        scanner.scan(parts_of(*[b"part %d" % n for n in range(5)]))
    assert scanner._kept is None  # a session in doubt is never kept
    assert scanner.retries == 0  # a new session that fails is not tried again
    result = process(clamd_pipeline(scanner), many_attachments(5), tmp_path)
    assert result.verdict == "TEMPFAIL", result.summary()
    assert result.destiny.value == "tempfail" and not result.findings


@pytest.mark.parametrize("reply, parsed", [
    ("3: stream: OK", (3, "OK")),
    ("9: INSTREAM size limit exceeded. ERROR", (9, "INSTREAM size limit exceeded. ERROR")),
    ("\u00b2: stream: OK", (None, "\u00b2: stream: OK")),  # a digit int() refuses: no id
    ("stream: OK", (None, "stream: OK")),
])
def test_a_reply_id_is_ascii_digits_or_none(reply, parsed):
    assert parse_reply(reply) == parsed
