"""Forwarder.hand_over against a real, scriptable next hop (tests/rigs/nexthop.py).

Every answer a next hop can give, and what we make of it: taken (for whom),
refused for good (5xx), or to be kept by our client (4xx and every doubt).
"""

from __future__ import annotations

import io
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from amavisd.actions.forward import (
    ForwardError,
    Params,
    PipeForwarder,
    SMTPForwarder,
    forwarder,
)
from amavisd.actions.methods import SMTPMethod, parse_method
from tests.rigs.nexthop import EXTENSIONS, NextHop

MESSAGE = b"Subject: test\r\n\r\n.a line with a dot\r\nbody\n.\n"
WIRE_BACK = b"Subject: test\r\n\r\n.a line with a dot\r\nbody\r\n.\r\n"  # what the hop keeps


@pytest.fixture
def hop(request):
    options = getattr(request, "param", {})
    with NextHop(**options) as server:
        yield server


def handing(hop: NextHop, timeout: float = 10.0):
    return forwarder(hop.spec, timeout, helo="filter.test")


def test_the_envelope_goes_on_unchanged_with_its_parameters_and_xforward(hop):
    params = Params(mail={"BODY": "8BITMIME", "RET": "HDRS", "ENVID": "id+2B1", "SIZE": "9"},
                    rcpt={"b@x.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b@x.test"}},
                    xforward={"NAME": "client.example", "ADDR": "192.0.2.1", "HELO": "a b<c>",
                              "IDENT": "4QX=1", "PROTO": "ESMTP", "SOURCE": "REMOTE"})
    handed = handing(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE,
                                    params=params)
    assert handed.reply == "250 2.0.0 Ok: queued as HOP1" and not handed.refused
    assert set(handed.accepted) == {"b@x.test", "c@x.test"}
    [message] = hop.messages
    assert message.mail_line == ("MAIL FROM:<a@x.test> BODY=8BITMIME "
                                 f"SIZE={len(MESSAGE)} RET=HDRS ENVID=id+2B1")
    assert message.rcpt_lines == ["RCPT TO:<b@x.test> NOTIFY=SUCCESS,FAILURE "
                                  "ORCPT=rfc822;b@x.test", "RCPT TO:<c@x.test>"]
    assert message.xforward == {"NAME": "client.example", "ADDR": "192.0.2.1", "HELO": "a?b?c?",
                                "IDENT": "4QX+3D1", "PROTO": "ESMTP", "SOURCE": "REMOTE"}
    assert message.data == WIRE_BACK and message.helo == "filter.test"


@pytest.mark.parametrize("hop", [{"extensions": ("PIPELINING",)}], indirect=True)
def test_what_the_next_hop_does_not_offer_is_left_out(hop):
    params = Params(mail={"RET": "FULL", "SMTPUTF8": None},
                    rcpt={"b@x.test": {"NOTIFY": "NEVER"}}, xforward={"ADDR": "192.0.2.1"})
    handing(hop).hand_over("a@x.test", ["b@x.test"], MESSAGE, params=params)
    [message] = hop.messages
    assert message.mail_line == "MAIL FROM:<a@x.test>"
    assert message.rcpt_lines == ["RCPT TO:<b@x.test>"] and message.xforward == {}
    assert not any(c.startswith("XFORWARD") for c in hop.commands)


@pytest.mark.parametrize("hop", [{"extensions": ("PIPELINING", "DSN")}], indirect=True)
@pytest.mark.parametrize("sender, params, enhanced", [
    ("a@x.test", {"BODY": "8BITMIME"}, "5.6.3"),
    ("ü@x.test", {"SMTPUTF8": None}, "5.6.7"),
])
def test_mail_the_next_hop_cannot_take_is_refused_for_good(hop, sender, params, enhanced):
    with pytest.raises(ForwardError) as caught:
        handing(hop).hand_over(sender, ["b@x.test"], MESSAGE, params=Params(mail=params))
    assert not caught.value.temporary and caught.value.reply.startswith(f"550 {enhanced}")
    assert not hop.messages


def test_a_file_is_streamed_from_where_it_stands(hop, tmp_path):
    body = (b"x" * 998 + b"\r\n") * 3000 + b".dot\r\n"
    path = tmp_path / "m"
    path.write_bytes(b"ignored\r\n" + body)
    with open(path, "rb") as fh:
        fh.seek(len(b"ignored\r\n"))
        handing(hop).hand_over("a@x.test", ["b@x.test"], fh)
    [message] = hop.messages
    assert message.data == body and f"SIZE={len(body)}" in message.mail_line


@pytest.mark.parametrize("hop", [{"rcpt_replies": {"c@x.test": "550 5.1.1 no such user"}}],
                         indirect=True)
def test_a_recipient_refused_for_good_while_others_are_taken(hop):
    handed = handing(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)
    assert handed.refused == {"c@x.test": "550 5.1.1 no such user"}
    assert list(handed.accepted) == ["b@x.test"]
    assert hop.messages[0].rcpt_tos == ["b@x.test"]


NO_PIPELINING = tuple(e for e in EXTENSIONS if e != "PIPELINING")


@pytest.mark.parametrize("hop", [{"rcpt_replies": {"c@x.test": "452 4.2.2 mailbox full"}},
                                 {"rcpt_replies": {"c@x.test": "452 4.2.2 mailbox full"},
                                  "extensions": NO_PIPELINING}],
                         indirect=True, ids=["pipelining", "one-by-one"])
def test_a_tempfailed_recipient_holds_back_the_whole_message_with_one_reply(hop):
    with pytest.raises(ForwardError) as caught:
        handing(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)
    assert caught.value.temporary and caught.value.refused == {"c@x.test": "452 4.2.2 mailbox full"}
    assert not hop.messages  # a retry cannot duplicate
    if "PIPELINING" in hop.extensions:
        # DATA went with the group and was answered 354: the connection was
        # dropped without content, so the hop discarded the transaction
        assert hop.commands[-1] == "DATA"
        deadline = time.monotonic() + 5  # the hop's thread sees the hang-up in its own time
        while not hop.aborted_in_data and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hop.aborted_in_data == 1 and not hop.messages
    else:
        assert "DATA" not in hop.commands
    handed = handing(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE,
                                    per_recipient=True)
    assert handed.refused == {"c@x.test": "452 4.2.2 mailbox full"}
    assert list(handed.accepted) == ["b@x.test"]
    # send() keeps its old meaning: the others get it, the refused are reported
    assert handing(hop).send("a@x.test", ["b@x.test", "c@x.test"], MESSAGE) == {
        "c@x.test": "452 4.2.2 mailbox full"}


@pytest.mark.parametrize("hop, temporary, reply", [
    ({"rcpt_replies": {"b@x.test": "550 5.1.1 no", "c@x.test": "553 5.1.3 bad"}}, False,
     "550 5.1.1 no"),
    ({"rcpt_replies": {"b@x.test": "550 5.1.1 no", "c@x.test": "450 4.1.1 later"}}, True,
     "450 4.1.1 later"),
    ({"data_reply": "554 5.7.1 content refused"}, False, "554 5.7.1 content refused"),
    ({"data_reply": "451 4.3.0 queue file write error"}, True, "451 4.3.0 queue file write error"),
    ({"replies": {"MAIL": "452 4.3.1 insufficient system storage"}}, True,
     "452 4.3.1 insufficient system storage"),
    ({"greeting": "421 4.3.2 shutting down"}, True, "421 4.3.2 shutting down"),
    ({"greeting": "554 5.3.2 no service"}, False, "554 5.3.2 no service"),
], indirect=["hop"])
def test_nothing_taken_is_temporary_unless_the_next_hop_said_5xx(hop, temporary, reply):
    with pytest.raises(ForwardError) as caught:
        handing(hop).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE)
    assert caught.value.temporary is temporary
    assert caught.value.reply == reply and caught.value.from_hop
    assert not hop.messages


@pytest.mark.parametrize("hop", [{"drop_after": "DOT"}, {"drop_after": "MAIL"},
                                 {"data_delay": 3.0}], indirect=True)
def test_a_next_hop_that_goes_silent_or_away_is_a_temporary_failure(hop):
    with pytest.raises(ForwardError) as caught:
        handing(hop, timeout=1.0).hand_over("a@x.test", ["b@x.test"], MESSAGE)
    assert caught.value.temporary and not caught.value.from_hop
    assert caught.value.reply.startswith("451 4.")


def test_a_next_hop_that_is_down_is_a_temporary_failure():
    with NextHop() as dead:
        spec = dead.spec
    with pytest.raises(ForwardError) as caught:
        forwarder(spec, 2.0).hand_over("a@x.test", ["b@x.test"], MESSAGE)
    assert caught.value.temporary and caught.value.reply.startswith("451 4.4.1")


@pytest.mark.parametrize("unix", [False, True])
def test_lmtp_answers_each_recipient_on_its_own(short_tmp, unix):
    hop = NextHop(lmtp=True, unix=str(short_tmp / "lmtp.sock") if unix else "",
                  rcpt_replies={"c@x.test": "550 5.1.1 unknown"},
                  data_replies={"d@x.test": "452 4.2.2 over quota",
                                "e@x.test": "552 5.2.2 mailbox full"})
    with hop:
        rcpts = ["b@x.test", "c@x.test", "d@x.test", "e@x.test"]
        handed = forwarder(hop.spec, 10).hand_over("a@x.test", rcpts, MESSAGE,
                                                   per_recipient=True)
        assert list(handed.accepted) == ["b@x.test"]
        assert handed.refused == {"c@x.test": "550 5.1.1 unknown",
                                  "d@x.test": "452 4.2.2 over quota",
                                  "e@x.test": "552 5.2.2 mailbox full"}
        assert handed.where == hop.spec
        # with one reply for all, a recipient tempfailed after DATA asks for a
        # retry of all: a duplicate for the others, never a loss
        with pytest.raises(ForwardError) as caught:
            forwarder(hop.spec, 10).hand_over("a@x.test", rcpts, MESSAGE)
        assert caught.value.temporary


def test_lmtp_every_recipient_refused_at_data():
    with NextHop(lmtp=True, data_replies={"b@x.test": "552 5.2.2 full",
                                          "c@x.test": "550 5.1.1 gone"}) as hop:
        with pytest.raises(ForwardError) as caught:
            forwarder(hop.spec, 10).hand_over("a@x.test", ["b@x.test", "c@x.test"], MESSAGE,
                                              per_recipient=True)
    assert not caught.value.temporary and set(caught.value.refused) == {"b@x.test", "c@x.test"}


def test_methods_name_lmtp_and_unix_sockets():
    assert parse_method("lmtp:[127.0.0.1]:24") == SMTPMethod("127.0.0.1", 24, lmtp=True)
    assert parse_method("lmtp:unix:/run/lmtp") == SMTPMethod("", 0, lmtp=True, path="/run/lmtp")
    assert parse_method("smtp:unix:/run/s") == SMTPMethod("", 0, path="/run/s")
    for bad in ("lmtp:unix:relative", "lmtp:", "smtp:host", "lmtpx:[::1]:24"):
        with pytest.raises(ValueError):
            parse_method(bad)
    assert SMTPForwarder(path="/run/s", lmtp=True).where == "lmtp:unix:/run/s"


PIPE_PROGRAM = """\
import os, sys
out = os.environ["OUT"]
open(out + ".argv", "w").write("\\n".join(sys.argv[1:]))
open(out, "wb").write(sys.stdin.buffer.read())
code = int(os.environ.get("CODE", "0"))
if code:
    print("said something on stderr", file=sys.stderr)
if os.environ.get("SLEEP"):
    import time; time.sleep(float(os.environ["SLEEP"]))
sys.exit(code)
"""


@pytest.fixture
def pipe_program(tmp_path, monkeypatch):
    script = tmp_path / "deliver"
    script.write_text(f"#!{sys.executable}\n{PIPE_PROGRAM}")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    return script


def test_pipe_runs_the_program_with_an_argv_and_the_message_on_stdin(pipe_program, tmp_path):
    fw = PipeForwarder((str(pipe_program), "-oi"), 10)
    handed = fw.hand_over("a@x.test", ["-b@x.test", "c@x.test"], io.BytesIO(MESSAGE))
    assert handed.reply.startswith("250 ") and set(handed.accepted) == {"-b@x.test", "c@x.test"}
    assert (tmp_path / "out").read_bytes() == MESSAGE  # as it is: the program gets no SMTP
    assert (tmp_path / "out.argv").read_text().split("\n") == [
        "-oi", "-i", "-f", "a@x.test", "--", "-b@x.test", "c@x.test"]
    template = PipeForwarder((str(pipe_program), "-f", "{sender}", "--", "{recipients}"), 10)
    template.hand_over("", ["b@x.test"], MESSAGE)
    assert (tmp_path / "out.argv").read_text().split("\n") == ["-f", "<>", "--", "b@x.test"]


@pytest.mark.parametrize("code, temporary", [(75, True), (71, True), (1, True), (67, False),
                                             (69, False)])
def test_pipe_exit_codes(pipe_program, monkeypatch, code, temporary):
    monkeypatch.setenv("CODE", str(code))
    with pytest.raises(ForwardError) as caught:
        PipeForwarder((str(pipe_program),), 10).hand_over("a@x.test", ["b@x.test"], MESSAGE)
    assert caught.value.temporary is temporary
    assert caught.value.reply[:1] == ("4" if temporary else "5")
    assert "said something" in str(caught.value)


def test_pipe_timeout_and_missing_program_are_temporary(pipe_program, monkeypatch, tmp_path):
    monkeypatch.setenv("SLEEP", "5")
    with pytest.raises(ForwardError) as caught:
        PipeForwarder((str(pipe_program),), 0.5).hand_over("a@x.test", ["b@x.test"], MESSAGE)
    assert caught.value.temporary and "timed out" in str(caught.value)
    missing = str(Path(tmp_path) / "no-such-program")
    with pytest.raises(ForwardError) as caught:
        PipeForwarder((missing,), 5).hand_over("a@x.test", ["b@x.test"], MESSAGE)
    assert caught.value.temporary and not os.path.exists(missing)


def test_the_rig_offers_what_a_postfix_reinjection_port_offers():
    assert {"DSN", "8BITMIME", "SMTPUTF8"} <= {e.split()[0] for e in EXTENSIONS}


@pytest.mark.parametrize("recipient", ["b@x.test> NOTIFY=NEVER ORCPT=rfc822;e@evil.test",
                                       "<b@x.test> NOTIFY=NEVER>", "b@x.test\r\nRSET",
                                       '"unclosed@x.test'])
def test_an_address_never_closes_the_path_to_add_parameters(hop, recipient):
    """AM.PDP and release recipients come from local clients: one that closes
    the angle brackets would smuggle ESMTP parameters (or a command) to the
    next hop. It is refused for good, and nothing is sent."""
    with pytest.raises(ForwardError) as caught:
        handing(hop).hand_over("a@x.test", ["c@x.test", recipient], MESSAGE)
    assert not caught.value.temporary and caught.value.reply.startswith("553 5.1.3")
    assert not hop.messages


def test_a_quoted_local_part_may_hold_what_a_bare_one_may_not(hop):
    handed = handing(hop).hand_over("a@x.test", ['"john <doe>"@x.test'], MESSAGE)
    assert handed.accepted and hop.messages[0].rcpt_lines == ['RCPT TO:<"john <doe>"@x.test>']


def test_a_kept_pipelining_session_takes_a_message_in_two_round_trips_without_stalls(hop):
    """RSET, XFORWARD, MAIL, RCPTs and DATA go in one write; the hop (this rig
    writes each reply on its own, Nagle on) must not make us wait for a
    delayed ACK between replies: 40 ms a message if it did."""
    fwd = forwarder(hop.spec, 10.0, helo="filter.test", keep_idle=30.0)
    params = Params(xforward={"NAME": "client.example", "ADDR": "192.0.2.1"})
    fwd.hand_over("a@x.test", ["b@x.test"], MESSAGE, params=params)  # connect, EHLO
    started = time.monotonic()
    for n in range(30):
        fwd.hand_over("a@x.test", [f"r{n}@x.test", "c@x.test"], MESSAGE, params=params)
    took = time.monotonic() - started
    assert len(hop.messages) == 31 and hop.connections == 1
    verbs = [c.split(" ", 1)[0].upper() for c in hop.commands]
    assert verbs.count("RSET") == 30 and verbs.count("DATA") == 31
    assert took < 0.9, f"{took:.2f} s for 30 messages: a delayed-ACK stall each?"


@pytest.mark.parametrize("hop", [{"replies": {"RSET": "421 4.4.2 shutting down"}}],
                         indirect=True)
def test_a_kept_session_refusing_rset_is_replaced_and_nothing_of_the_group_is_kept(hop):
    """The hop may read MAIL, RCPT and DATA of the group behind the refused
    RSET: we drop that session without content, so it keeps nothing, and the
    message goes once on a new one."""
    fwd = forwarder(hop.spec, 10.0, helo="filter.test", keep_idle=30.0)
    fwd.hand_over("a@x.test", ["b@x.test"], MESSAGE)
    handed = fwd.hand_over("a@x.test", ["c@x.test"], MESSAGE)
    assert list(handed.accepted) == ["c@x.test"]
    assert hop.connections == 2
    assert [c.split(" ", 1)[0] for c in hop.commands].count("RSET") == 1  # the refused one
    assert [m.rcpt_tos for m in hop.messages] == [["b@x.test"], ["c@x.test"]]


@pytest.mark.parametrize("hop", [{"data_reply": "250 2.0.0 Ok: queued\n250 2.0.0 said twice"}],
                         indirect=True)
def test_a_kept_session_with_a_stray_reply_is_not_reused(hop):
    """The hop answered the end of DATA with two lines: reused, the stray one
    would be taken for the next command's reply and every reply after it
    would answer the wrong command."""
    fwd = forwarder(hop.spec, 10.0, helo="filter.test", keep_idle=30.0)
    for rcpt in ("b@x.test", "c@x.test", "d@x.test"):
        assert list(fwd.hand_over("a@x.test", [rcpt], MESSAGE).accepted) == [rcpt]
    assert hop.connections == 3
    assert [m.rcpt_tos for m in hop.messages] == [["b@x.test"], ["c@x.test"], ["d@x.test"]]


@pytest.mark.parametrize("hop", [{"replies": {"DATA": "354 go ahead\n250 2.0.0 taken early"}}],
                         indirect=True)
def test_a_reply_before_the_final_dot_is_never_taken_for_the_hops_word(hop):
    """A hop that says more than asked after its 354 (a stray line, an early
    250): the line was read as the reply to the end of DATA, so a message the
    hop never ended (here it took the content for commands) was reported
    delivered. No dot goes once the hop has spoken: dropped in DATA, tempfail."""
    with pytest.raises(ForwardError) as caught:
        handing(hop).hand_over("a@x.test", ["b@x.test"], MESSAGE)
    assert caught.value.temporary and "out of step" in str(caught.value)
    assert not hop.messages and "." not in hop.commands


@pytest.mark.parametrize(("options", "temporary"), [
    # 354 to the pipelined DATA though every recipient was refused (some hops do)
    ({"rcpt_replies": {"b@x.test": "550 5.1.1 no such user"},
      "replies": {"DATA": "354 go ahead"}}, False),
    # a 421 to MAIL, the hop going on as if it had not said it
    ({"replies": {"MAIL": "421 4.3.2 shutting down", "DATA": "354 go ahead"}}, True),
    # a 421 to RCPT with one reply for all: nothing goes, the message is retried whole
    ({"rcpt_replies": {"b@x.test": "421 4.3.2 shutting down"},
      "replies": {"DATA": "354 go ahead"}}, True),
])
def test_a_354_after_a_refusal_in_the_group_gets_no_content(options, temporary):
    """Whatever the hop says to DATA, the content goes only if MAIL and the
    recipients said go: here it said 354 after a refusal, and got no content
    and no dot (the connection dropped in DATA, it keeps nothing)."""
    with NextHop(**options) as hop:
        with pytest.raises(ForwardError) as caught:
            handing(hop).hand_over("a@x.test", ["b@x.test"], MESSAGE)
        assert caught.value.temporary is temporary
        assert not hop.messages and "." not in hop.commands
        assert not any(c.startswith("Subject") for c in hop.commands)
