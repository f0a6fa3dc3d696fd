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

A worker keeps its temp base open from one request to the next (`held`):
each use costs one stat of the base and of each avoided directory, to see
that the path still names the directory held (it is re-opened if not),
instead of a realpath() and an open() a request.

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
        self.given = path  # as the config says it: what `current()` stats again
        self.path = os.path.normpath(path)
        self.real = os.path.realpath(path)  # clients may send either spelling
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.identity = identity(os.fstat(self.fd))
        except BaseException:
            self.close()
            raise
        self.avoid_paths = tuple(avoid)
        self.avoid = avoided(self.avoid_paths)

    def current(self) -> bool:
        """Whether the base's path still names the directory held open, and
        each avoided path the directory it named when we opened (one stat
        each): a base removed and made again, or a work base re-created
        under it, needs a new Base."""
        if self.fd < 0:
            return False
        try:
            if identity(os.stat(self.given)) != self.identity:
                return False
        except OSError:
            return False
        return avoided(self.avoid_paths) == self.avoid

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

    def _walk(self, names: list[str], start: int = -1) -> int:
        """The directory `names` leads to from `start` (default: the base), no
        symlink followed: `start` itself when `names` is empty, else a new
        descriptor (the caller closes it if it is not `start`)."""
        start = self.fd if start < 0 else start
        fd = start
        try:
            for name in names:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                if fd != start:
                    os.close(fd)
                fd = child
                self._check_avoid(os.fstat(fd))
        except BaseException:
            if fd != start:
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
        return self.open_stat(path, flags)[0]

    def open_stat(self, path: str, flags: int = FILE_FLAGS) -> tuple[int, os.stat_result]:
        """`open()`, and the fstat of what was opened (the caller checks it)."""
        return self.open_names(self.components(path), flags)

    def open_names(self, names: list[str], flags: int = FILE_FLAGS,
                   start: int = -1) -> tuple[int, os.stat_result]:
        """`names` opened below the base, or below `start`, a directory
        opened beneath it (a request's tempdir: its mail file is then found
        in the very directory that was checked, not by the tempdir's name
        again); the descriptor and its fstat."""
        if not names:
            raise OutsideBase("an empty path")
        start = self.fd if start < 0 else start
        parent = self._walk(names[:-1], start)
        try:
            fd = os.open(names[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        finally:
            if parent != start:
                os.close(parent)
        try:
            st = os.fstat(fd)
            self._check_avoid(st)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def remove(self, path: str, expect: Identity | None = None) -> bool:
        """rm -r of the directory `path`, through descriptors only. With
        `expect`, only if `path` still is that directory (the one a request
        was checked against). Returns whether the directory is gone."""
        names = self.components(path)
        parent = self._walk(names[:-1])
        try:
            try:
                top = os.open(names[-1], DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                return False
            try:
                st = os.fstat(top)
                if expect is not None and identity(st) != expect:
                    return False
                self._check_avoid(st)
                empty_dir(top)
                return _rmdir_if(parent, names[-1], identity(st))
            finally:
                os.close(top)
        finally:
            if parent != self.fd:
                os.close(parent)

    def remove_opened(self, path: str, top: int, expect: Identity,
                      first: str | None = None) -> bool:
        """rm -r of the directory `path`, which the caller holds open as
        `top` (opened beneath this base, its identity `expect`): emptied
        through `top`, so only what is inside the checked directory goes; its
        name is removed only while it still is that directory. `first`: the
        one file it usually holds (a request's email.txt), unlinked first so
        that the common case needs no directory listing."""
        names = self.components(path)
        if first is not None:
            try:
                os.unlink(first, dir_fd=top)
            except OSError:
                pass  # not there, or not a file: the listing below finds what is
        parent = self._walk(names[:-1])
        try:
            if _rmdir_if(parent, names[-1], expect):
                return True
            empty_dir(top)
            return _rmdir_if(parent, names[-1], expect)
        finally:
            if parent != self.fd:
                os.close(parent)


def avoided(paths: Iterable[str]) -> set[Identity]:
    """The identities of the directories a client path must not reach."""
    found: set[Identity] = set()
    for other in paths:
        try:
            found.add(identity(os.stat(other)))
        except OSError:
            pass  # what does not exist cannot be reached
    return found


def _rmdir_if(parent: int, name: str, expect: Identity) -> bool:
    """rmdir of `name` in `parent` only while it is the directory `expect`
    (and empty); whether it is gone."""
    try:
        if identity(os.stat(name, dir_fd=parent, follow_symlinks=False)) != expect:
            return False
        os.rmdir(name, dir_fd=parent)
    except OSError:
        return False
    return True


_HELD: list[tuple[tuple[str, tuple[str, ...]], Base]] = []  # one: a worker has one temp base


def held(path: str, avoid: Iterable[str] = ()) -> Base:
    """The Base of `path` this process keeps open across calls (a worker's
    temp base, request after request), re-opened when `current()` says the
    path names another directory now. One is kept (asked for another path,
    the old one is closed). Callers must not close it. Raises OSError when
    the base cannot be opened."""
    key = (path, tuple(avoid))
    if _HELD:
        (known, base), = _HELD
        if known == key and base.current():
            return base
        _HELD.clear()
        base.close()
    base = Base(path, key[1])
    _HELD.append((key, base))
    return base


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
