"""Paths a client names, opened and removed beneath a directory, one component at a time.

The temp base is writable by every client in the daemon's group. Checking a
client's path (realpath, then "is it inside?") and then using the same string
(open, rmtree) is a race: between the two, a client swaps a directory of the
path for a symlink and the daemon reads, or deletes, what the link points to.
So a path is never resolved twice here. The base is held open as a
descriptor; each component is opened relative to the one before with
O_NOFOLLOW (and O_DIRECTORY but for the last), so a symlink anywhere in the
path is refused by the kernel, not followed; `.`, `..` and empty components
are refused before any system call. Removal walks the tree through the same
kind of descriptors, so it cannot leave the directory it checked.

Never: realpath() a client's path, open one by its full string, follow a
symlink, or remove anything by a path name relative to `/`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A message file: no blocking on a FIFO, no controlling tty from a device.
FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
MAX_REMOVE_DEPTH = 64  # a deeper tree is left in place rather than exhaust descriptors

Identity = tuple[int, int]  # (st_dev, st_ino)


class OutsideBase(ValueError):
    """A path not strictly below the base, or one with `.`, `..` or empty components,
    or one that passes through a directory we must not touch."""


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def components(path: str, base: str, *spellings: str) -> list[str]:
    """The names below `base` that `path` walks through: lexical only, no
    system call. `spellings` are other names of the base (its realpath)."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise OutsideBase(f"{path!r} is not an absolute path")
    path = path.rstrip("/")
    for prefix in (base, *spellings):
        prefix = prefix.rstrip("/") + "/"
        if path.startswith(prefix):
            names = path[len(prefix):].split("/")
            if any(name in ("", ".", "..") for name in names):
                raise OutsideBase(f"{path} has an empty, '.' or '..' component")
            return names
    raise OutsideBase(f"{path} is not below {base}")


class Base:
    """A trusted directory (from the config) held open; client paths are opened below it.

    `avoid` names directories (the daemon's own work base) that a client path
    must never pass through or name, even if the admin put them in the base.
    """

    def __init__(self, path: str, avoid: Iterable[str] = ()):
        self.path = os.path.normpath(path)
        self.real = os.path.realpath(path)  # clients may send either spelling
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.avoid: set[Identity] = set()
        for other in avoid:
            try:
                self.avoid.add(identity(os.stat(other)))
            except OSError:
                pass  # what does not exist cannot be reached

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Base:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def components(self, path: str) -> list[str]:
        return components(path, self.path, self.real)

    def _walk(self, names: list[str]) -> int:
        """A new descriptor of the directory `names` leads to, no symlink followed."""
        fd = os.dup(self.fd)
        try:
            for name in names:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                self._check_avoid(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_avoid(self, st: os.stat_result) -> None:
        if self.avoid and identity(st) in self.avoid:
            raise OutsideBase("the path leads into the daemon's own work base")

    def open(self, path: str, flags: int = FILE_FLAGS) -> int:
        """open(2) of `path` beneath the base; every component, the last one
        included, is opened with O_NOFOLLOW. Raises OutsideBase or OSError
        (ELOOP or ENOTDIR for a symlink on the way)."""
        names = self.components(path)
        parent = self._walk(names[:-1])
        try:
            fd = os.open(names[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            self._check_avoid(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def remove(self, path: str, expect: Identity | None = None) -> bool:
        """rm -r of the directory `path`, through descriptors only. With
        `expect`, only if `path` still is that directory (the one a request
        was checked against). Returns whether the directory is gone."""
        names = self.components(path)
        parent = self._walk(names[:-1])
        try:
            name = names[-1]
            try:
                top = os.open(name, DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                return False
            try:
                st = os.fstat(top)
                if expect is not None and identity(st) != expect:
                    return False
                self._check_avoid(st)
                empty_dir(top)
            finally:
                os.close(top)
            # Only rmdir the name if it is still the directory we emptied.
            try:
                if identity(os.stat(name, dir_fd=parent, follow_symlinks=False)) != identity(st):
                    return False
                os.rmdir(name, dir_fd=parent)
            except OSError:
                return False
            return True
        finally:
            os.close(parent)


def empty_dir(fd: int, depth: int = 0) -> None:
    """Remove everything inside the open directory `fd`; best effort. A
    directory swapped for a symlink meanwhile is unlinked as a link (ELOOP
    on open), never entered."""
    if depth >= MAX_REMOVE_DEPTH:
        return
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        try:
            if not is_dir:
                os.unlink(name, dir_fd=fd)
                continue
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    os.unlink(name, dir_fd=fd)  # no longer a directory: a link or a file
                continue
            try:
                empty_dir(child, depth + 1)
            finally:
                os.close(child)
            os.rmdir(name, dir_fd=fd)
        except OSError:
            continue


def open_beneath(base: str, path: str, flags: int = FILE_FLAGS) -> int:
    """One-shot `Base(base).open(path, flags)`."""
    with Base(base) as held:
        return held.open(path, flags)


def remove_beneath(base: str, path: str) -> bool:
    """One-shot `Base(base).remove(path)`."""
    with Base(base) as held:
        return held.remove(path)
