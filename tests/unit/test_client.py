"""The stdlib client's own logic: arguments, header edits, delivery argv."""

from __future__ import annotations

import os
import stat

import pytest

from amavisd_client.ampdp import Decoder, encode_block
from amavisd_client.client import apply_edits, delivery_argvs, header_edits, inside, parse_args


def test_sendmail_mailer_arguments():
    opts = parse_args(["-s", "/var/lib/amavis/amavisd.sock", "-f", "a@x", "--", "b@y", "-c@y"])
    assert opts.sender == "a@x" and opts.args == ["b@y", "-c@y"]
    assert opts.tempbase == "/var/lib/amavis/tmp"
    opts = parse_args(["--socket=/s/amavisd.sock", "-fa@x", "-t", "5", "b@y"])
    assert (opts.socket, opts.sender, opts.timeout, opts.args) == (
        "/s/amavisd.sock", "a@x", 5.0, ["b@y"])


@pytest.mark.parametrize("argv", [["-x"], ["-t"], ["-t", "soon"], ["-s", "127.0.0.1:9998", "f"]])
def test_bad_arguments(argv):
    with pytest.raises(ValueError):
        parse_args(argv)


def test_relative_socket_paths_are_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    opts = parse_args(["-s", "var/lib/amavisd.sock", "f"])
    assert opts.socket == str(tmp_path / "var/lib/amavisd.sock")
    assert opts.tempbase == str(tmp_path / "var/lib/tmp")


def test_tcp_socket_needs_a_tempbase():
    assert parse_args(["-s", "127.0.0.1:9998", "-T", "/t", "f"]).tempbase == "/t"


def reply(*attrs):
    (block,) = Decoder().feed(encode_block(attrs))
    return block


def test_header_edits_follow_milter_semantics():
    header = (b"From x\nReceived: one\n  folded\nSubject: s\nX-Spam: 1\nX-Spam: 2\n"
              b"X-Old: gone\n")
    edits = header_edits(reply(
        ("addheader", ["X-Tail", "end"]), ("insheader", ["0", "X-Virus-Scanned", "by us"]),
        ("chgheader", ["2", "X-Spam", "two"]), ("delheader", ["1", "X-Old"]),
        ("chgheader", ["1", "Subject", ""])))
    out = apply_edits(header, edits)
    assert out == (b"From x\nX-Virus-Scanned: by us\nReceived: one\n  folded\n"
                   b"X-Spam: 1\nX-Spam: two\nX-Tail: end\n")


def test_header_edits_keep_crlf_and_ignore_malformed_indexes():
    out = apply_edits(b"Subject: s\r\n", header_edits(reply(
        ("insheader", ["zero", "X-Bad", "x"]), ("insheader", ["1", "X-V", "ok"]))))
    assert out == b"Subject: s\r\nX-V: ok\r\n"


def test_delivery_argv_templates():
    assert delivery_argvs("/usr/lib/dovecot/deliver -f {sender} -- {recipients}", "a@x",
                          ["b@y", "c@y"]) == [
        ["/usr/lib/dovecot/deliver", "-f", "a@x", "--", "b@y", "c@y"]]
    assert delivery_argvs("mail.local -d {recipient}", "a@x", ["b", "c"]) == [
        ["mail.local", "-d", "b"], ["mail.local", "-d", "c"]]
    # the form that fits in one word of a Sendmail A= line
    assert delivery_argvs("/usr/lib/dovecot/deliver,-f,{sender},-d,{recipient}", "a@x",
                          ["b"]) == [["/usr/lib/dovecot/deliver", "-f", "a@x", "-d", "b"]]


def test_inside_requires_a_subdirectory(tmp_path):
    (tmp_path / "d").mkdir()
    assert inside(str(tmp_path / "d" / "email.txt"), str(tmp_path))
    assert not inside(str(tmp_path / "email.txt"), str(tmp_path))
    assert not inside("/etc/passwd", str(tmp_path))


# -- the spool: what is delivered is what was written -------------------------------------


def spooled(tmp_path, data: bytes):
    from amavisd_client.spool import Spool

    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    spool = Spool(str(tmp_path))
    try:
        spool.write_from(read_fd)
    finally:
        os.close(read_fd)
    return spool


def test_spool_modes_and_read_back(tmp_path):
    old = os.umask(0o077)
    try:
        spool = spooled(tmp_path, b"Subject: ours\n\nbody\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(spool.dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o640
    spool.verify()
    assert spool.read() == b"Subject: ours\n\nbody\n"
    spool.remove()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("swap", ["dir", "file"])
def test_a_swapped_spool_is_detected_and_its_bytes_never_read(tmp_path, swap):
    from amavisd_client.spool import SpoolError

    spool = spooled(tmp_path, b"Subject: ours\n\nclean\n")
    if swap == "dir":
        os.rename(spool.dir, str(tmp_path / "moved"))
        os.mkdir(spool.dir)
        planted = os.path.join(spool.dir, "email.txt")
    else:
        planted = spool.path
        os.unlink(planted)
    with open(planted, "wb") as fh:
        fh.write(b"Subject: theirs\n\nEICAR\n")
    with pytest.raises(SpoolError, match="replaced"):
        spool.verify()
    assert spool.read() == b"Subject: ours\n\nclean\n"  # from our descriptor, not the path
    spool.remove()
    if swap == "dir":  # someone else's dir at our name is left alone
        assert open(planted, "rb").read() == b"Subject: theirs\n\nEICAR\n"


def test_a_spool_file_changed_in_place_is_detected(tmp_path):
    from amavisd_client.spool import SpoolError

    spool = spooled(tmp_path, b"Subject: ours\n\nclean\n")
    with open(spool.path, "ab") as fh:
        fh.write(b"appended\n")
    with pytest.raises(SpoolError, match="changed size"):
        spool.verify()
    spool.remove()


def test_a_temp_base_others_may_write_without_the_sticky_bit_is_refused(tmp_path):
    from amavisd_client.spool import Spool, SpoolError

    tmp_path.chmod(0o770)
    with pytest.raises(SpoolError, match="not sticky"):
        Spool(str(tmp_path))
    tmp_path.chmod(0o1770)
    spool = Spool(str(tmp_path))
    spool.remove()
