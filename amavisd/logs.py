"""Logging set-up: syslog (facility mail) and/or stderr, plus an optional file.

`reopen()` (SIGUSR1) closes and reopens the file and the syslog connection,
for logrotate and a restarted syslogd. When the syslog socket
(`syslog_socket`, /dev/log by default) is absent the syslog target is
skipped with one warning rather than failing the daemon.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from typing import Any

_OURS = "_amavisd_handler"
FORMAT_STDERR = "%(asctime)s amavisd[%(process)d]: %(levelname)s %(message)s"
FORMAT_SYSLOG = "%(ident)s[%(process)d]: %(message)s"


class _IdentFilter(logging.Filter):
    def __init__(self, ident: str):
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        record.ident = self.ident
        return True


def setup(config: Mapping[str, Any], stderr: bool | None = None) -> None:
    """(Re)build our handlers on the root logger; safe to call again on reload."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(config["log_level"].upper())
    targets = list(config["log_to"])
    handlers: list[logging.Handler] = []
    missing_syslog = False
    if stderr if stderr is not None else "stderr" in targets:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(FORMAT_STDERR))
        handlers.append(h)
    if "syslog" in targets:
        address = config["syslog_socket"]
        if os.path.exists(address):
            facility = logging.handlers.SysLogHandler.facility_names[config["syslog_facility"]]
            h = logging.handlers.SysLogHandler(address=address, facility=facility)
            h.addFilter(_IdentFilter(config["syslog_ident"]))
            h.setFormatter(logging.Formatter(FORMAT_SYSLOG))
            handlers.append(h)
        else:
            missing_syslog = True
    if config["log_file"]:
        h = logging.FileHandler(config["log_file"])
        h.setFormatter(logging.Formatter(FORMAT_STDERR))
        handlers.append(h)
    for h in handlers:
        setattr(h, _OURS, True)
        root.addHandler(h)
    if missing_syslog:
        logging.getLogger("amavisd").warning("syslog requested but no %s; logging without it",
                                             config["syslog_socket"])


def reopen() -> None:
    for handler in logging.getLogger().handlers:
        if not getattr(handler, _OURS, False):
            continue
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
        elif isinstance(handler, logging.handlers.SysLogHandler):
            try:
                handler.socket.close()
                handler._connect_unixsocket(handler.address)
            except OSError:
                pass


def preserved_fds() -> list[int]:
    """Descriptors our handlers use, for python-daemon's files_preserve."""
    fds = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        sock = getattr(handler, "socket", None)
        for obj in (stream, sock):
            try:
                fds.append(obj.fileno())
            except (AttributeError, OSError, ValueError):
                pass
    return fds
