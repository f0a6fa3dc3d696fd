"""Which files an amavisd-new configuration is, and reading them safely.

amavisd-new on Debian reads `/usr/share/amavis/conf.d` and then
`/etc/amavis/conf.d`, each listed by `run-parts --list`: the names made of
letters, digits, `-` and `_` only (so `50-user.dpkg-old` and `50-user~` are
never read), in byte order. A single file (a classic `amavisd.conf`) is read
as it is. Data files a configuration names (`read_hash('/etc/amavis/
local_domains')`, Debian's `head -n 1 /etc/mailname`) are read here too,
with the same size bound, and never executed.
"""

from __future__ import annotations

import os
import re
import stat

from amavisd.migrate.lexer import MAX_FILE_CHARS, PerlSyntaxError

DEBIAN_DIRS = ("/usr/share/amavis/conf.d", "/etc/amavis/conf.d")
RUN_PARTS_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
MAX_FILES = 200  # files read in all, includes too
MAX_DATA_CHARS = 256 * 1024  # a read_hash() table or /etc/mailname


class SourceError(OSError):
    """A named file or directory that cannot be read at all."""


def default_paths() -> list[str]:
    """Debian's two directories, those that exist."""
    return [d for d in DEBIAN_DIRS if os.path.isdir(d)]


def config_files(path: str) -> tuple[list[str], list[str]]:
    """The files `path` stands for, in amavisd-new's order, and the names in
    a directory that run-parts would skip (so the report can say so)."""
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path), key=lambda n: n.encode("utf-8", "surrogateescape"))
        except OSError as err:
            raise SourceError(f"{path}: {err.strerror or err}") from None
        files, skipped = [], []
        for name in names:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                continue
            if RUN_PARTS_NAME.match(name):
                files.append(full)
            else:
                skipped.append(full)
        return files, skipped
    if os.path.isfile(path):
        return [path], []
    raise SourceError(f"{path}: no such file or directory")


def read_config_text(path: str) -> str:
    """A configuration file's text: UTF-8, else Latin-1 (Perl reads bytes)."""
    data = _read_bounded(path, MAX_FILE_CHARS)
    if data is None:
        raise PerlSyntaxError(path, 1, f"file longer than {MAX_FILE_CHARS} bytes")
    return _decode(data)


def read_data_file(path: str) -> str | None:
    """A data file a configuration names, or None if it cannot be read."""
    try:
        data = _read_bounded(path, MAX_DATA_CHARS)
    except SourceError:
        return None
    return None if data is None else _decode(data)


def _read_bounded(path: str, limit: int) -> bytes | None:
    """At most limit bytes (None if there are more). Opened non-blocking and
    checked to be a regular file, so a FIFO or a device named by a hostile
    configuration neither hangs nor streams."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as err:
        raise SourceError(f"{path}: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceError(f"{path}: not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise SourceError(f"{path}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    return None if size > limit else b"".join(chunks)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
