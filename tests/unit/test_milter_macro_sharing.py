"""Hostile review of 3625e85 (milter): a macro packet's parsed dict shared
by the decoder's cache and the session must never carry one message's
values into another's request; the AM.PDP request, its spool lines cached
a path, must name the spool this message was written to; the one idle
sweep must go on across failures and a stop/start."""

from __future__ import annotations

import asyncio
import types

import pytest

from amavisd_client.milter import codec, mta
from amavisd_client.milter.spool import SpoolPool, SpoolSink
from amavisd_client.milter.state import Ask, MilterSession
from amavisd_client.wire.ampdp import decode_blocks
from tests.unit.test_milter_state import MESSAGE, POSTFIX_OFFER, feed, reply, session

AUTH = codec.Macro("M", {"auth_authen": "mallory", "auth_type": "PLAIN", "mail_addr": "m@x"})
ANON = codec.Macro("M", {"mail_addr": "a@x"})


def message(mail_macro: codec.Macro, qid: str, rcpt: str = "<b@example.test>") -> list:
    return [mail_macro, codec.Mail(("<a@example.test>",)), codec.Rcpt((rcpt,)), codec.Data(),
            codec.Macro("L", {"i": qid}), codec.Header(b"Subject", b" " + qid.encode()),
            codec.Macro("L", {"i": qid}), codec.Header(b"X-Q", b" 1"), codec.EndOfHeaders(),
            codec.Body(b"body of " + qid.encode() + b"\r\n"), codec.Macro("E", {"i": qid}),
            codec.EndOfMessage()]


def asked(s: MilterSession, commands: list) -> dict:
    (ask,) = [e for e in feed(s, *commands) if isinstance(e, Ask)]
    s.answer(reply(return_value="continue"))
    return dict(ask.attrs)


@pytest.fixture
def frozen_macros(monkeypatch):
    """Every parsed macro dict read-only: any code that changes one (and
    with it the decoder's cached copy, or another message's) raises."""
    parse = codec._macro

    def frozen(data: bytes) -> codec.Macro:
        macro = parse(data)
        return codec.Macro(macro.stage, types.MappingProxyType(macro.macros))
    monkeypatch.setattr(codec, "_macro", frozen)


def test_no_value_of_one_message_reaches_the_next(frozen_macros):
    """Authenticated message, then one whose MAIL macros carry no auth (the
    same connection), an abort mid-message, a message the MTA never ended,
    a repeated packet (the cache's hit): each request has its own queue id
    and SMTP_AUTH only when its own MAIL macros said so."""
    s = session(policy_bank="BASE")
    feed(s, POSTFIX_OFFER, *MESSAGE[:3])
    first = asked(s, message(AUTH, "Q1"))
    assert first["queue_id"] == "Q1" and "SMTP_AUTH" in first["policy_bank"]
    second = asked(s, message(ANON, "Q2"))
    assert second["queue_id"] == "Q2" and second["policy_bank"] == "BASE"
    feed(s, *message(AUTH, "Q3")[:6], codec.Abort())  # aborted after a header
    third = asked(s, message(ANON, "Q4"))
    assert third["queue_id"] == "Q4" and third["policy_bank"] == "BASE"
    feed(s, *message(AUTH, "Q5")[:3])  # MAIL, RCPT, then a new MAIL: never ended
    fourth = asked(s, message(ANON, "Q6"))
    assert fourth["queue_id"] == "Q6" and fourth["policy_bank"] == "BASE"
    assert fourth["recipient"] == "<b@example.test>"
    again = asked(s, message(AUTH, "Q1"))  # the very packets of the first: same request
    assert again == first
    bare = asked(s, message(AUTH, "Q8")[1:])  # no MAIL macros at all: none of the last's
    assert bare["queue_id"] == "Q8" and bare["policy_bank"] == "BASE"
    feed(s, codec.QuitNewConnection())  # a new SMTP client on this connection
    feed(s, POSTFIX_OFFER, *MESSAGE[:3])
    fresh = asked(s, message(ANON, "Q7"))
    assert fresh["policy_bank"] == "BASE" and fresh["queue_id"] == "Q7"


def test_the_decoders_cached_macros_stay_what_the_packet_said():
    """After a connection's messages, the cached dict (the one the session
    holds too) equals a fresh parse of its raw packet."""
    s = session()
    feed(s, POSTFIX_OFFER, *MESSAGE[:3])
    for qid in ("Q1", "Q2", "Q1"):
        asked(s, message(AUTH if qid == "Q1" else ANON, qid))
        raw, macro = s.decoder._macro
        assert macro == codec._macro(raw)
        assert macro.macros == {"i": qid}  # the last packet was the E stage's


def test_the_request_names_the_spool_the_message_is_in(tmp_path):
    """Through a real pool, two connections interleaved: every request's
    tempdir/mail_file is the spool that holds that message's bytes, after
    the pool handed the same spool (same path) to another message."""
    pool = SpoolPool(str(tmp_path))
    sessions = {name: session(sink=lambda: SpoolSink(str(tmp_path), pool=pool))
                for name in ("a", "b")}
    for s in sessions.values():
        feed(s, POSTFIX_OFFER, *MESSAGE[:3])
    paths: dict[str, set[str]] = {"a": set(), "b": set()}
    for n in range(6):
        asks = {}
        for name, s in sessions.items():
            qid = f"{name.upper()}{n}"
            (asks[name],) = [e for e in feed(s, *message(ANON, qid)) if isinstance(e, Ask)]
        for name in asks:  # both spools taken before either goes back (LIFO: they swap)
            asks[name].sink.open()
        for name in asks:
            ask, qid = asks[name], f"{name.upper()}{n}"
            block = decode_blocks(ask.encoded())[0]
            assert block.get("mail_file") == ask.sink.path
            assert block.get("tempdir") == ask.sink.dir
            assert block.get("queue_id") == qid
            with open(block.get("mail_file"), "rb") as f:
                assert f.read() == (f"Subject: {qid}\r\nX-Q: 1\r\n\r\nbody of {qid}\r\n"
                                    .encode())
            paths[name].add(ask.sink.path)
            ask.sink.release()
            sessions[name].answer(reply(return_value="continue"))
    # the pool served its two spools again and again, each to both connections
    assert paths["a"] == paths["b"] and len(paths["a"]) == 2
    pool.close()


class Stub:
    """A connection as the sweep sees it."""

    def __init__(self, silent: float, fails: bool = False):
        self.silent, self.fails, self.closed = silent, fails, 0

    def idle_since(self, now: float) -> float:
        return self.silent

    def close(self) -> None:
        self.closed += 1
        if self.fails:
            raise RuntimeError("a close that fails")


def test_the_sweep_goes_on_after_an_exception_and_across_stop_and_start():
    async def run() -> tuple[int, int]:
        bad = Stub(10.0, fails=True)
        sweep = mta.IdleSweep({bad}, idle=5.0)
        sweep.every = 0.01
        sweep.start()
        await asyncio.sleep(0.1)
        sweep.stop()
        stopped_at = bad.closed
        await asyncio.sleep(0.05)
        assert bad.closed == stopped_at  # stopped: no more looks
        sweep.start()
        await asyncio.sleep(0.1)
        sweep.stop()
        return stopped_at, bad.closed
    stopped_at, total = asyncio.run(run())
    assert stopped_at >= 3 and total >= stopped_at + 3


def test_one_failing_close_does_not_keep_the_others_open():
    async def run() -> list[int]:
        connections = [Stub(10.0, fails=True), Stub(10.0)]  # a list: a fixed order
        sweep = mta.IdleSweep(connections, idle=5.0)  # type: ignore[arg-type]
        sweep.every = 0.01
        sweep.start()
        await asyncio.sleep(0.1)
        sweep.stop()
        return [c.closed for c in connections]
    bad, good = asyncio.run(run())
    assert bad >= 3 and good >= 1
