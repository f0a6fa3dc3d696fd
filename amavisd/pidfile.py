"""The master's pid file: refuse to start over a live daemon, replace a stale one."""

from __future__ import annotations

import os


class PidfileError(Exception):
    pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write(path: str) -> None:
    try:
        with open(path) as fh:
            old = int(fh.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        old = 0
    if old and old != os.getpid() and _running(old):
        raise PidfileError(f"{path}: amavisd is already running as pid {old}")
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remove(path: str) -> None:
    try:
        with open(path) as fh:
            if int(fh.read().strip() or 0) != os.getpid():
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass
