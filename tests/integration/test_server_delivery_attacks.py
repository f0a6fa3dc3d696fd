# ruff: noqa: F401, F811 (the `accounts` fixture, imported, is a test argument)
"""delivery_care_of=server under attack: a local user must not have the
daemon forward mail that is not theirs, nor bytes other than those scanned.

The real daemon runs as `amavisd-test` (dropping privileges as in
production), with a real clamd and a real SMTP sink as its next hop; the
attacker is a forked child that became `amavisd-evil` (a group member: it
may list the temp base and write in it).
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 (loaded before the attacker forks: it cannot import)
import os
import socket
import time
from pathlib import Path

import pytest

from amavisd.testing.messages import clean_message
from amavisd_client.wire.ampdp import Decoder, encode_block
from tests.integration.test_trust_boundary import (  # accounts: a fixture
    accounts,
    as_user,
    daemon_as_user,
    own_dir,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tcp_request(port: int, attrs, timeout: float = 60.0) -> dict | None:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encode_block(attrs))
        decoder = Decoder()
        while data := sock.recv(65536):
            for block in decoder.feed(data):
                return {k: v[0] for k, v in block.as_dict().items()}
    return None


def steal_over_tcp(port: int, victim: str) -> dict | None:
    """The attacker names another client's in-flight message (it can list the
    temp base) and asks the daemon to forward it to the attacker."""
    return tcp_request(port, [("request", "AM.PDP"), ("mail_file", victim),
                              ("sender", "<evil@example.test>"),
                              ("recipient", "<evil@example.test>"),
                              ("delivery_care_of", "server"),
                              ("tempdir_removed_by", "client")])


def forward_own_over_tcp(port: int, tempbase: str) -> dict | None:
    mine = own_dir(tempbase)
    (mine / "email.txt").write_bytes(clean_message())
    return tcp_request(port, [("request", "AM.PDP"), ("mail_file", str(mine / "email.txt")),
                              ("sender", "<evil@example.test>"),
                              ("recipient", "<evil@example.test>"),
                              ("delivery_care_of", "server"),
                              ("tempdir_removed_by", "client")])


@pytest.fixture
def tcp_daemon(short_tmp, clamd_nodecomp, accounts, sink):
    port = free_port()
    host, sink_port = sink.address
    daemon = daemon_as_user(short_tmp, clamd_nodecomp, workers=1,
                            tcp_listen=f"127.0.0.1:{port}",
                            forward_method=f"smtp:[{host}]:{sink_port}")
    yield daemon, port
    daemon.stop()


def victim_message(daemon, accounts) -> Path:
    """Another client's message: the daemon's user's (Sendmail's U=amavis, the
    C milter), in its own 0700 dir, as it waits for a verdict."""
    victim = Path(daemon.tempbase) / "amavisd-milter-victim"
    victim.mkdir(mode=0o700)
    (victim / "email.txt").write_bytes(b"From: ceo@example.test\nSubject: merger\n\n"
                                       b"TOP SECRET terms\n")
    for path in (victim, victim / "email.txt"):
        os.chown(path, accounts["daemon"].pw_uid, accounts["daemon"].pw_gid)
    (victim / "email.txt").chmod(0o600)
    return victim / "email.txt"


def test_over_tcp_another_users_message_is_not_forwarded_to_the_attacker(
        tcp_daemon, accounts, sink):
    """Over TCP there is no SO_PEERCRED; the owner of a loopback connection is
    still known to the kernel, and checked as over the Unix socket."""
    daemon, port = tcp_daemon
    victim = victim_message(daemon, accounts)
    reply = as_user(accounts["evil"], steal_over_tcp, port, str(victim))
    assert reply is not None and reply.get("return_value") == "tempfail", reply
    assert "does not belong to the client" in reply.get("setreply", ""), reply
    assert sink.wait(1, timeout=1) == []
    assert victim.exists()


def test_over_tcp_ones_own_message_is_forwarded(tcp_daemon, accounts, sink):
    daemon, port = tcp_daemon
    reply = as_user(accounts["evil"], forward_own_over_tcp, port, daemon.tempbase)
    assert reply is not None and reply.get("return_value") == "discard", reply
    assert reply.get("setreply", "").startswith("250 2.0.0 from MTA("), reply
    [got] = sink.wait(1, timeout=30)
    assert got.rcpt_tos == ["evil@example.test"]


def steal_and_hang_up(port: int, victim: str, tries: int) -> int:
    """The same request, the connection closed at once: the daemon may look
    for the client's uid after it is gone (an orphan shown as uid 0)."""
    for _ in range(tries):
        sock = socket.socket()
        sock.connect(("127.0.0.1", port))
        sock.sendall(encode_block([("request", "AM.PDP"), ("mail_file", victim),
                                   ("recipient", "<evil@example.test>"),
                                   ("delivery_care_of", "server"),
                                   ("tempdir_removed_by", "client")]))
        sock.close()
    return tries


def test_over_tcp_hanging_up_at_once_does_not_pass_for_root(tcp_daemon, accounts,
                                                            sink):
    """The one worker is held by an idle connection, so the attacker's wait
    in the backlog and are gone (orphans, uid 0 in /proc/net/tcp) when they
    are accepted."""
    daemon, port = tcp_daemon
    victim = victim_message(daemon, accounts)
    hold = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        time.sleep(0.5)  # the worker has taken it
        assert as_user(accounts["evil"], steal_and_hang_up, port, str(victim), 3) == 3
        time.sleep(1.0)
    finally:
        hold.close()
    deadline = time.monotonic() + 30
    while daemon.log_text().count("AM.PDP request refused") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.log_text().count("AM.PDP request refused") == 3, daemon.log_text()[-2000:]
    assert sink.wait(1, timeout=1) == []
    assert victim.exists()
