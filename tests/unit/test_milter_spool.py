"""The milter's spool pool: an answered spool serves the next message, and
only then (spool.py). Through the whole server, against `FaultDaemon` (a
named fake: a daemon that hangs up without a verdict, or leaves work files
in the tempdir as amavisd-new does, on demand)."""

from __future__ import annotations

import os

from amavisd_client.milter import codec
from tests.unit import test_milter_server as server_tests
from tests.unit.test_milter_server import (
    FaultDaemon,
    clean_reply,
    final,
    message,
    mta_session,
    run_server,
    settings,
)

tempbase = server_tests.tempbase  # the fixture: a sticky temp base

HEAD = b"From:alice@example.test\r\nSubject:hi\r\n\r\n"


def two_messages(short_tmp, tempbase, answer, first: bytes, second: bytes):
    """Two messages, one connection each, one after the other: (the daemon,
    the final replies, the temp base's entries in between)."""
    daemon = FaultDaemon(short_tmp / "daemon.sock", answer)
    config = settings(short_tmp, tempbase)

    async def scenario(server):
        one = await mta_session(config.listen.path, message(body=first))
        two = await mta_session(config.listen.path, message(body=second))
        return one, two, sorted(os.listdir(tempbase))
    try:
        one, two, between = run_server(config, scenario)
    finally:
        daemon.close()
    assert os.listdir(tempbase) == []  # idle spools go when the milter stops
    return daemon, final(one) + final(two), between


def test_an_answered_spool_serves_the_next_message_overwritten_in_place(short_tmp, tempbase):
    """The second, shorter message reuses the first one's dir and file: the
    daemon reads exactly the second message (the first one's tail cut)."""
    long_body, short_body = b"L" * 70_000 + b"\r\n", b"short\r\n"  # the first past MEMORY
    daemon, finals, between = two_messages(short_tmp, tempbase, clean_reply,
                                           long_body, short_body)
    assert finals == [("c", b""), ("c", b"")]
    assert [content for content, _, _ in daemon.spooled] == [HEAD + long_body,
                                                             HEAD + short_body]
    first, second = (r.get("tempdir") for r in daemon.requests)
    assert first == second and between == [os.path.basename(first)]
    assert [(f, d) for _, f, d in daemon.spooled] == [(0o600, 0o700)] * 2


def test_a_question_without_a_verdict_never_leaves_its_spool_for_reuse(short_tmp, tempbase):
    """The daemon hangs up without a verdict (it may still be reading): a
    tempfail, and that spool is removed; the next message gets a new one."""
    calls = []

    def answer(block):
        calls.append(block)
        return b"" if len(calls) == 1 else clean_reply(block)  # b"": hang up
    daemon, finals, between = two_messages(short_tmp, tempbase, answer, b"one\r\n", b"two\r\n")
    assert [code for code, _ in finals] == ["y", "c"]
    assert finals[0][1].startswith(b"451 ")
    first, second = (r.get("tempdir") for r in daemon.requests)
    assert first != second and not os.path.exists(first)
    assert between == [os.path.basename(second)]
    assert [content for content, _, _ in daemon.spooled] == [HEAD + b"one\r\n",
                                                             HEAD + b"two\r\n"]


def test_a_spool_the_daemon_left_work_files_in_is_removed_not_reused(short_tmp, tempbase):
    """amavisd-new leaves parts/ in a tempdir the client removes: such a
    spool is emptied and removed, never handed to the next message."""
    def answer(block):
        parts = os.path.join(block.get("tempdir"), "parts")
        os.mkdir(parts)
        with open(os.path.join(parts, "p001"), "wb") as fh:
            fh.write(b"decoded")
        return clean_reply(block)
    daemon, finals, between = two_messages(short_tmp, tempbase, answer, b"one\r\n", b"two\r\n")
    assert finals == [("c", b""), ("c", b"")]
    first, second = (r.get("tempdir") for r in daemon.requests)
    assert first != second and not os.path.exists(first)
    assert between == []  # the second one's had parts/ too: removed as well


def test_the_pool_keeps_at_most_keep_spools(tempbase):
    from amavisd_client.milter.spool import SpoolPool, SpoolSink

    pool = SpoolPool(str(tempbase), keep=1)
    sinks = [SpoolSink(str(tempbase), pool=pool) for _ in range(2)]
    for sink in sinks:
        sink.write(b"x" * codec.BODY_CHUNK * 2)  # past MEMORY: the file is made now
        sink.open()
    assert len(os.listdir(tempbase)) == 2
    for sink in sinks:
        sink.release()
    assert len(pool.idle) == 1 and len(os.listdir(tempbase)) == 1
    pool.close()
    assert os.listdir(tempbase) == []


def test_an_idle_spool_a_cleaner_removed_is_replaced_not_a_tempfail(tempbase):
    """A temp-base cleaner (tmpreaper, tmpfiles.d) may remove an idle spool:
    the next message gets a new one."""
    import shutil

    from amavisd_client.milter.spool import SpoolPool, SpoolSink

    pool = SpoolPool(str(tempbase))
    first = SpoolSink(str(tempbase), pool=pool)
    first.write(b"one\r\n")
    first.open()
    gone = first.dir
    first.release()
    shutil.rmtree(gone)
    second = SpoolSink(str(tempbase), pool=pool)
    second.write(b"two\r\n")
    second.open()
    second.verify()
    assert second.dir != gone and pool.idle == []
    with open(second.path, "rb") as fh:
        assert fh.read() == b"two\r\n"
    second.discard()
    assert os.listdir(tempbase) == []


def test_an_idle_spool_holds_no_message(short_tmp, tempbase):
    """A spool waiting in the pool was emptied when it came back: no message
    lies in the temp base past its check."""
    daemon = FaultDaemon(short_tmp / "daemon.sock", clean_reply)
    config = settings(short_tmp, tempbase)

    async def scenario(server):
        await mta_session(config.listen.path, message(body=b"secret\r\n" * 100))
        return [os.stat(os.path.join(tempbase, d, "email.txt")).st_size
                for d in os.listdir(tempbase)]
    try:
        sizes = run_server(config, scenario)
    finally:
        daemon.close()
    assert sizes == [0]
    assert len(daemon.spooled) == 1 and b"secret" in daemon.spooled[0][0]
