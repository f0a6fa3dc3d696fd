"""Where the SMTP/LMTP listeners listen, and who may talk to them."""

from __future__ import annotations

import re
import socket

import pytest

from amavisd import config as configuration
from amavisd.actions.methods import ListenSpec, parse_listen
from amavisd.config import ConfigError
from amavisd.listeners import ListenerError, bind_all, bind_smtp, describe
from amavisd.protocol import registry
from amavisd.protocol.smtp import LMTPSession, SMTPSession, allowed
from tests.rigs.postfix import free_port


@pytest.mark.parametrize("spec, parsed", [
    ("127.0.0.1:10024", ListenSpec("smtp", "127.0.0.1", 10024)),
    ("smtp:[::1]:24", ListenSpec("smtp", "::1", 24)),
    ("lmtp:127.0.0.1:10024", ListenSpec("lmtp", "127.0.0.1", 10024)),
    ("unix:/run/amavisd/smtp.sock", ListenSpec("smtp", path="/run/amavisd/smtp.sock")),
    ("lmtp:unix:/run/amavisd/lmtp.sock", ListenSpec("lmtp", path="/run/amavisd/lmtp.sock")),
])
def test_listen_spellings(spec, parsed):
    assert parse_listen(spec) == parsed


@pytest.mark.parametrize("key, value, said", [
    ("smtp_listen", ["10024"], "use [smtp:|lmtp:]HOST:PORT"),
    ("smtp_listen", ["unix:relative"], "unix:/absolute/path"),
    ("smtp_listen", ["127.0.0.1:10024", "lmtp:127.0.0.1:10024"], "listed twice"),
    ("smtp_allow", ["localhost"], "not an address or network"),
    ("forward_method", "lmtp:unix:x", "lmtp:unix:/absolute/path"),
])
def test_bad_settings_are_one_line_naming_the_key(key, value, said):
    with pytest.raises(ConfigError, match=re.escape(said)) as caught:
        configuration.load(None, {key: value})
    named = {"smtp_listen": "--smtp-listen", "forward_method": "--forward"}.get(key, key)
    assert str(caught.value).startswith(named) and "\n" not in str(caught.value)


def test_the_protocols_are_registered():
    assert registry.session_class("smtp") is SMTPSession
    assert registry.session_class("lmtp") is LMTPSession


def test_only_loopback_unless_asked(short_tmp):
    cfg = configuration.load(None, {"workdir": str(short_tmp)})
    with pytest.raises(ListenerError, match="smtp_listen_remote"):
        bind_smtp(f"0.0.0.0:{free_port()}", cfg)
    listener = bind_smtp(f"0.0.0.0:{free_port()}", cfg.replace(smtp_listen_remote=True))
    try:
        assert listener.protocol == "smtp" and describe(listener).startswith("smtp:tcp:0.0.0.0:")
    finally:
        listener.close()


def test_a_listener_that_cannot_bind_leaves_no_socket_behind(short_tmp):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cfg = configuration.load(None, {"workdir": str(short_tmp),
                                        "smtp_listen": [f"lmtp:unix:{short_tmp}/l.sock",
                                                        f"127.0.0.1:{port}"]})
        with pytest.raises(ListenerError, match="cannot bind"):
            bind_all(cfg)
    assert not (short_tmp / "amavisd.sock").exists() and not (short_tmp / "l.sock").exists()


@pytest.mark.parametrize("peer, networks, ok", [
    ("127.0.0.1", ["127.0.0.0/8", "::1"], True),
    ("::1", ["127.0.0.0/8", "::1"], True),
    ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
    ("192.0.2.1", ["127.0.0.0/8", "::1"], False),
    ("192.0.2.1", ["192.0.2.0/24"], True),
    ("", [], True),  # a Unix socket: its mode decides
    ("not an address", ["0.0.0.0/0"], False),
])
def test_smtp_allow(peer, networks, ok):
    assert allowed(peer, networks) is ok
