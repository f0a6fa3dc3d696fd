"""The one parser of socket addresses (amavisd_client.wire.address), and the
settings, clamd, the forwarder and the client reading them through it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from amavisd_client.wire.address import (
    BARE,
    Address,
    AddressError,
    parse,
    parse_host_port,
    parse_or_path,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("text, kind, target", [
    ("unix:/var/run/clamav/clamd.ctl", "unix", "/var/run/clamav/clamd.ctl"),
    ("local:/run/milter.sock", "unix", "/run/milter.sock"),
    ("tcp:127.0.0.1:3310", "tcp", ("127.0.0.1", 3310)),
    ("tcp:clamd.example.com:3310", "tcp", ("clamd.example.com", 3310)),
    ("tcp:[::1]:3310", "tcp", ("::1", 3310)),
    ("tcp:::1:3310", "tcp", ("::1", 3310)),  # the last colon ends the host, as before
    ("inet:10024@127.0.0.1", "tcp", ("127.0.0.1", 10024)),
    ("inet6:10024@[::1]", "tcp", ("::1", 10024)),
    ("127.0.0.1:9998", "tcp", ("127.0.0.1", 9998)),
    ("[::1]:9998", "tcp", ("::1", 9998)),
    ("localhost:65535", "tcp", ("localhost", 65535)),
])
def test_every_spelling(text, kind, target):
    where = parse(text)
    assert (where.kind, where.target) == (kind, target)
    assert where.is_tcp == (kind == "tcp")
    assert parse(str(where)) == where  # the canonical form reads back the same


@pytest.mark.parametrize("text", [
    "", "unix:", "unix:relative.sock", "tcp:", "tcp:host", "tcp::3310", "tcp:host:0",
    "tcp:host:65536", "tcp:host:-1", "tcp:host:33x", "tcp:host:\u00b3", "tcp:[::1:3310",
    "tcp:[::1]]:3310", "tcp:a b:25", "inet:10024", "inet:@host", "inet:port@host",
    "host", "/var/run/clamd.ctl", ":25",
])
def test_bad_addresses_are_one_line_errors(text):
    with pytest.raises(AddressError) as err:
        parse(text)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_a_caller_accepts_only_its_spellings():
    clamd = ("unix", "tcp")
    assert parse("unix:/x.sock", accept=clamd).path == "/x.sock"
    for text in ("inet:3310@127.0.0.1", "127.0.0.1:3310", "local:/x.sock"):
        with pytest.raises(AddressError, match="expected unix:/path or tcp:host:port"):
            parse(text, accept=clamd)
    with pytest.raises(AddressError, match="expected host:port"):
        parse("tcp:127.0.0.1:9998", accept=(BARE,))
    assert parse_host_port("[::1]:25") == ("::1", 25)


def test_ipv6_and_canonical_form():
    assert parse("[::1]:25").is_ipv6 and not parse("127.0.0.1:25").is_ipv6
    assert str(parse("[::1]:25")) == "tcp:[::1]:25"
    assert str(parse("inet:25@mx")) == "tcp:mx:25"
    assert str(parse("local:/a")) == "unix:/a"
    assert repr(parse("unix:/a")) == "Address('unix:/a')"
    assert len({parse("tcp:[::1]:25"), parse("[::1]:25"), parse("inet6:25@::1")}) == 1
    assert Address("unix", path="/a") != "unix:/a"


@pytest.mark.parametrize("text, target", [
    ("/var/lib/amavis/amavisd.sock", "/var/lib/amavis/amavisd.sock"),
    ("var/lib/amavisd.sock", "var/lib/amavisd.sock"),  # relative: the client makes it absolute
    ("amavisd.sock", "amavisd.sock"),
    ("./odd:name", "./odd:name"),  # a "/" makes it a path even with a colon
    ("127.0.0.1:9998", ("127.0.0.1", 9998)),
    ("[::1]:9998", ("::1", 9998)),
    ("localhost:9998", ("localhost", 9998)),
    ("unix:/run/amavisd.sock", "/run/amavisd.sock"),
    ("tcp:127.0.0.1:9998", ("127.0.0.1", 9998)),
])
def test_the_clients_socket_argument(text, target):
    assert parse_or_path(text).target == target


def test_the_parser_imports_nothing():
    """The client loads it on every mail, started with python3 -I -S."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); before = set(sys.modules)\n"
            "import amavisd_client.wire.address\n"
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True).stdout.split()
    assert set(out) <= {"__future__", "amavisd_client", "amavisd_client.wire",
                        "amavisd_client.wire.address"}


# -- its users ------------------------------------------------------------------------------


def test_settings_read_addresses_through_it():
    from amavisd import config

    assert config.parse_address("tcp:[::1]:3310") == ("tcp", ("::1", 3310))
    assert config.parse_address("unix:/run/clamd.ctl") == ("unix", "/run/clamd.ctl")
    for bad in ("inet:3310@127.0.0.1", "tcp:host:99999", "/run/clamd.ctl"):
        with pytest.raises(ValueError, match="^must be unix:/path or tcp:host:port$"):
            config.parse_address(bad)
    assert config.loopback_listen("[::1]:9998") == "[::1]:9998"
    assert config.loopback_listen("localhost:9998") == "localhost:9998"
    with pytest.raises(ValueError, match="^must be host:port, e.g. 127.0.0.1:9998$"):
        config.loopback_listen("127.0.0.1")
    with pytest.raises(ValueError, match="loopback"):
        config.loopback_listen("10.0.0.1:9998")


def test_clamd_reads_its_address_through_it():
    from amavisd.scan.clamd import ClamdScanner

    scanner = ClamdScanner("tcp:[::1]:3310")
    assert (scanner.kind, scanner.target) == ("tcp", ("::1", 3310))
    with pytest.raises(ValueError):
        ClamdScanner("inet:3310@127.0.0.1")


def test_the_forwarder_reads_smtp_methods_through_it():
    from amavisd.actions.forward import PipeForwarder, SMTPForwarder, forwarder

    smtp = forwarder("smtp:[::1]:10025", 5.0)
    assert isinstance(smtp, SMTPForwarder)
    assert (smtp.host, smtp.port, smtp.timeout) == ("::1", 10025, 5.0)
    pipe = forwarder("pipe:/usr/sbin/sendmail -oi")
    assert isinstance(pipe, PipeForwarder) and tuple(pipe.argv) == ("/usr/sbin/sendmail", "-oi")
    for bad, said in [("smtp:[::1]", "smtp method must be smtp:HOST:PORT"),
                      ("smtp:host:0", "smtp method must be smtp:HOST:PORT"),
                      ("pipe:sendmail", "pipe method must be pipe:/absolute/path"),
                      ("lmtp:host", "lmtp method must be lmtp:HOST:PORT"),
                      ("lmtpx:host:24", "unknown method 'lmtpx:host:24'")]:
        with pytest.raises(ValueError, match=f"^{said}"):
            forwarder(bad)
