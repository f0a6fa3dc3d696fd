"""The log file: created 0640 whatever the umask, never through a symlink, and
reopened (SIGUSR1) without ever raising: a file that cannot be reopened keeps
the old one, and the failure is logged where logging still works."""

from __future__ import annotations

import logging
import logging.handlers
import os
import stat
from pathlib import Path

import pytest

from amavisd import config as configuration
from amavisd import logs


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def log_setup():
    """logs.setup() on the root logger, with our handlers removed afterwards."""
    root = logging.getLogger()
    level = root.level

    def setup(path: Path, **values) -> None:
        logs.setup(configuration.load(None, {"log_to": [], "log_file": str(path)} | values),
                   stderr=False)

    yield setup
    for handler in list(root.handlers):
        if getattr(handler, logs._OURS, False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def test_the_log_file_is_created_0640_even_with_umask_0(tmp_path, log_setup):
    old = os.umask(0)
    try:
        log_setup(tmp_path / "amavisd.log")
    finally:
        os.umask(old)
    logging.getLogger("amavisd").warning("quarantine: virus-AAAAAAAAAAAA")
    assert mode(tmp_path / "amavisd.log") == 0o640
    assert "virus-AAAAAAAAAAAA" in (tmp_path / "amavisd.log").read_text()


def test_an_existing_world_readable_log_loses_the_world_bits(tmp_path, log_setup):
    path = tmp_path / "amavisd.log"
    path.write_text("old lines\n")
    path.chmod(0o644)
    log_setup(path)
    assert mode(path) == 0o640


def test_a_symlink_at_the_log_path_is_not_followed(tmp_path, log_setup):
    target = tmp_path / "shadow"
    target.write_text("untouched\n")
    (tmp_path / "amavisd.log").symlink_to(target)
    with pytest.raises(OSError):
        log_setup(tmp_path / "amavisd.log")
    assert target.read_text() == "untouched\n"


def test_reopen_follows_logrotate(tmp_path, log_setup):
    path = tmp_path / "amavisd.log"
    log_setup(path)
    logging.getLogger("amavisd").warning("before rotation")
    path.rename(tmp_path / "amavisd.log.1")
    assert logs.reopen() == []
    logging.getLogger("amavisd").warning("after rotation")
    assert "before rotation" in (tmp_path / "amavisd.log.1").read_text()
    assert "after rotation" in path.read_text() and mode(path) == 0o640


def test_a_failed_reopen_keeps_the_old_file_and_says_so(tmp_path, log_setup):
    """Root ignores directory modes, so the fault is a symlink planted at the path."""
    path = tmp_path / "amavisd.log"
    log_setup(path)
    path.rename(tmp_path / "amavisd.log.1")
    path.symlink_to(tmp_path / "elsewhere")
    failures = logs.reopen()  # must not raise
    assert len(failures) == 1 and "cannot reopen log file" in failures[0]
    logging.getLogger("amavisd").warning("still logging")
    old = (tmp_path / "amavisd.log.1").read_text()
    assert "cannot reopen log file" in old and "still logging" in old
    assert not (tmp_path / "elsewhere").exists()
    path.unlink()
    assert logs.reopen() == []  # fixed: the next USR1 gets a new file
    logging.getLogger("amavisd").warning("new file")
    assert "new file" in path.read_text()


def test_setup_that_cannot_open_the_file_keeps_the_running_handlers(tmp_path, log_setup):
    log_setup(tmp_path / "amavisd.log")
    with pytest.raises(OSError):
        log_setup(tmp_path / "no-such-dir" / "amavisd.log")
    logging.getLogger("amavisd").warning("still here")
    assert "still here" in (tmp_path / "amavisd.log").read_text()


# -- stderr and syslog under systemd: each line once ------------------------------------


@pytest.fixture
def syslog_socket(tmp_path):
    """A real Unix datagram socket standing for /dev/log; yields (path, socket)."""
    import socket

    path = tmp_path / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield path, sock
    sock.close()


def both_targets(log_setup, path):
    """The shipped default (stderr and syslog) through logs.setup's own choice of stderr."""
    logs.setup(configuration.load(None, {"log_to": ["stderr", "syslog"],
                                         "syslog_socket": str(path)}))


def our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, logs._OURS, False)]


def journal_stream_of_stderr() -> str:
    st = os.fstat(2)
    return f"{st.st_dev}:{st.st_ino}"


def test_under_systemd_a_line_goes_to_the_journal_once(log_setup, syslog_socket, monkeypatch):
    path, sock = syslog_socket
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of_stderr())
    both_targets(log_setup, path)
    kinds = [type(h) for h in our_handlers()]
    assert kinds == [logging.handlers.SysLogHandler]
    logging.getLogger("amavisd").warning("once")
    assert b"once" in sock.recv(4096)


@pytest.mark.parametrize("stream", ["", "1:2", "garbage", "12"])
def test_stderr_that_is_not_the_journal_keeps_its_lines(log_setup, syslog_socket, monkeypatch,
                                                        stream):
    path, _ = syslog_socket
    monkeypatch.setenv("JOURNAL_STREAM", stream)
    both_targets(log_setup, path)
    kinds = {type(h) for h in our_handlers()}
    assert kinds == {logging.StreamHandler, logging.handlers.SysLogHandler}


def test_the_journal_keeps_stderr_when_there_is_no_syslog(log_setup, tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of_stderr())
    both_targets(log_setup, tmp_path / "no-such-socket")
    assert [type(h) for h in our_handlers()] == [logging.StreamHandler]
