"""The file store (`quarantine_store = "file:/var/virusmails"`): the first
quarantine store, and amavisd-new's layout.

One entry is two files in one flat directory (0700, files 0600):

    virus-<id>[.gz]      the raw message, byte for byte (optionally gzipped)
    virus-<id>.json      the envelope and the verdict (`QuarantineEntry`),
                         secret_id included, so a release can re-send it to
                         the same recipients from the same sender

The sidecar is written last, so an entry without one is incomplete and is
never listed; a store that fails part-way removes what it made
(`quarantine.attempt`). Every name is built from an id `parse_id`
accepted, so it can never name a file outside the directory; files are
created with O_EXCL and opened without following symlinks. Nothing records a release: amavisd-new's
file quarantine did not either, and an entry stays releasable again.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import gzip
import hashlib
import json
import mmap
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, BinaryIO

from amavisd.decode import window
from amavisd.envelope import Envelope
from amavisd.quarantine.attempt import StoreAttempt
from amavisd.quarantine.entry import (
    ID_PATTERN,
    KINDS,
    QuarantineEntry,
    QuarantineError,
    UnknownEntry,
    new_id,
    new_secret,
    parse_id,
)
from amavisd.verdict import Result

CHUNK = 256 * 1024
PART = ".part"  # a sidecar being written; never listed


class FileStore:
    """A QuarantineStore in one directory of the local file system."""

    def __init__(self, directory: str, gzip: bool = False):
        self.directory = os.path.abspath(directory)
        self.gzip = gzip
        self._leftovers: list[list[str]] = []  # what failed stores could not remove yet

    @classmethod
    def from_url(cls, rest: str, config: Mapping[str, Any]) -> FileStore:
        """`file:/dir` (or `file:///dir`): `rest` is what follows `file:`."""
        path = rest[2:] if rest.startswith("///") else rest
        if not path.startswith("/") or path.startswith("//"):
            raise ValueError("must be file:/absolute/directory")
        return cls(path, gzip=bool(config.get("quarantine_gzip", False)))

    @property
    def location(self) -> str:
        return self.directory

    # -- the directory ---------------------------------------------------------

    def prepare(self) -> None:
        """Make sure the directory exists, is a real directory and is 0700."""
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise QuarantineError(f"cannot create {self.directory}: {err.strerror}") from None
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode):
            raise QuarantineError(f"{self.directory} is not a directory (a symlink?)")
        if stat.S_IMODE(info.st_mode) != 0o700:
            try:
                os.chmod(self.directory, 0o700)
            except OSError as err:
                raise QuarantineError(f"cannot make {self.directory} 0700: "
                                      f"{err.strerror}") from None

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # -- storing ---------------------------------------------------------------

    def store(self, message: bytes | mmap.mmap | str | os.PathLike, envelope: Envelope,
              result: Result) -> str:
        """Keep the message and what we know about it; returns the id. All or
        nothing: on any failure what this store made is removed again
        (`quarantine.attempt`) and the error that broke it is raised."""
        if result.category is None:
            raise QuarantineError("nothing to quarantine: the message has no verdict")
        self.prepare()
        kind = KINDS[result.category]
        try:
            attempt = StoreAttempt(self.directory, self._leftovers)
        except OSError as err:
            raise QuarantineError(f"cannot open {self.directory}: {err.strerror}") from None
        with attempt:
            qid, name, out = self._claim(attempt, kind)
            with out:  # closed (unlocked) once the sidecar is in
                size, digest = self._write(out, message)
                out.flush()
                os.fsync(out.fileno())
                entry = QuarantineEntry(
                    id=qid, kind=kind, file=name, gzip=self.gzip, size=size, sha256=digest,
                    date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    log_id=result.log_id, category=result.verdict, sender=envelope.sender,
                    recipients=list(envelope.recipients), queue_id=envelope.queue_id,
                    client_address=envelope.client_address, viruses=result.viruses,
                    banned=[str(b) for b in result.banned],
                    unchecked=[str(u) for u in result.unchecked], secret_id=new_secret())
                # written aside and renamed: a sidecar is there whole or not at all
                part = f"{kind}-{qid}.json{PART}"
                with attempt.create(part) as side:
                    side.write(json.dumps(asdict(entry), indent=1).encode())
                    side.flush()
                    os.fsync(side.fileno())
                attempt.rename(part, f"{kind}-{qid}.json")
        return qid

    def _claim(self, attempt: StoreAttempt, kind: str) -> tuple[str, str, BinaryIO]:
        """A new id and its message file, created and locked."""
        while True:
            qid = new_id()
            name = f"{kind}-{qid}" + (".gz" if self.gzip else "")
            try:
                out = attempt.create(name)
            except FileExistsError:
                continue  # 72 random bits collided: draw again
            except OSError as err:
                raise QuarantineError(f"cannot write {self._path(name)}: "
                                      f"{err.strerror}") from None
            # Locked until the sidecar is in, so `sweep_incomplete` leaves it
            # alone while we live; swept between our create and lock: draw again.
            try:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)
                if os.fstat(out.fileno()).st_nlink:
                    return qid, name, out
            except BaseException:
                out.close()
                raise
            out.close()

    def sweep_incomplete(self) -> list[str]:
        """Remove what a writer killed mid-store left (SIGKILL skips the cleanup
        above): a message file without a sidecar that no live writer holds
        locked. Never listed nor released, it only takes space. One listdir,
        and a lock tried only on files without a sidecar: cheap enough for
        the master to run whenever a worker was killed."""
        try:
            names = set(os.listdir(self.directory))
        except OSError:
            return []
        removed = []
        for name in sorted(names):
            if (name.endswith(".json") or not ID_PATTERN.fullmatch(name)
                    or name.removesuffix(".gz") + ".json" in names):
                continue  # not ours, or a sidecar (complete, or its writer's still at it)
            try:
                fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer lives
                self.get(name)  # complete after all (its writer just finished)
            except BlockingIOError:
                continue
            except QuarantineError:  # no sidecar: its writer died
                self._unlink(name.removesuffix(".gz") + ".json" + PART)
                self._unlink(name)
                removed.append(name)
            finally:
                os.close(fd)
        return removed

    def _write(self, out, message: bytes | mmap.mmap | str | os.PathLike) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        sink = gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) if self.gzip else out
        try:
            for chunk in _chunks(message):
                digest.update(chunk)
                size += len(chunk)
                sink.write(chunk)
        finally:
            if sink is not out:
                sink.close()
        return size, digest.hexdigest()

    # -- reading ---------------------------------------------------------------

    def get(self, qid: str) -> QuarantineEntry:
        """The entry for an id (or file name); UnknownEntry if there is none."""
        bare = parse_id(qid)
        for kind in KINDS.values():
            try:
                raw = _read_nofollow(self._path(f"{kind}-{bare}.json"))
            except FileNotFoundError:
                continue
            except OSError as err:
                raise QuarantineError(f"cannot read entry {bare}: {err.strerror}") from None
            try:
                entry = QuarantineEntry.from_json(json.loads(raw))
            except (ValueError, TypeError) as err:
                raise QuarantineError(f"entry {bare}: damaged sidecar: {err}") from None
            if entry.id != bare or entry.file not in (f"{kind}-{bare}", f"{kind}-{bare}.gz"):
                raise QuarantineError(f"entry {bare}: sidecar names another file")
            return entry
        raise UnknownEntry(f"no quarantined message with id {bare}")

    def message(self, entry: QuarantineEntry) -> bytes:
        """The raw message, checked against the digest taken when it was stored."""
        try:
            data = _read_nofollow(self._path(entry.file))
        except OSError as err:
            raise QuarantineError(f"cannot read {entry.file}: {err.strerror}") from None
        if entry.gzip:
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as err:
                raise QuarantineError(f"{entry.file}: damaged gzip: {err}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise QuarantineError(f"{entry.file}: content does not match its digest")
        return data

    def list(self) -> list[QuarantineEntry]:
        """Complete entries, oldest first; damaged sidecars are skipped."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            if not name.endswith(".json") or ID_PATTERN.fullmatch(name) is None:
                continue
            try:
                entries.append(self.get(name))
            except QuarantineError:
                continue
        return sorted(entries, key=lambda e: (e.date, e.id))

    def mark_released(self, entry: QuarantineEntry, recipients: Sequence[str]) -> None:
        """Nothing to record: the layout has no place for it (see the module's docstring)."""

    def remove(self, qid: str) -> None:
        entry = self.get(qid)
        self._unlink(f"{entry.kind}-{entry.id}.json")
        self._unlink(entry.file)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass


def _chunks(message: bytes | mmap.mmap | str | os.PathLike):
    """The message a CHUNK at a time: bytes, a big message's mapping (its
    pages given back as it goes, see decode.window), or a file by path."""
    if isinstance(message, (bytes, bytearray, memoryview, mmap.mmap)):
        yield from window.chunks(message, 0, len(message), CHUNK)
        return
    fd = os.open(message, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _read_nofollow(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
