"""The quarantine: infected and banned mail kept whole so it can be released.

One entry is two files in one flat directory (0700, files 0600):

    virus-<id>[.gz]      the raw message, byte for byte (optionally gzipped)
    virus-<id>.json      the envelope and the verdict, so a release can
                         re-send it to the same recipients from the same sender

The prefix says why (virus, banned, unchecked, clean: amavisd-new's names);
the id is 12 random base64url characters (72 bits, amavisd-new's mail_id
size) and is what goes into `X-Quarantine-ID:` and what `release` takes.
The sidecar is written last, so an entry without one is incomplete and is
never listed.

The id is no secret: it is in the log line, the alert and the header. A
release over AM.PDP must also name the entry's `secret_id` (amavisd-new's
name: 96 random bits, base64url), which lives only in the 0600 sidecar and
is shown to the admin by `amavisd quarantine show` and `list --secrets`;
the check itself is in `actions.release`. Entries stored before secrets
existed have none and can only be released locally.

An id comes from people and CLIs: it is checked against a strict pattern
before any path is built from it, so it can never name a file outside the
quarantine. Files are opened without following symlinks. A release re-sends
the message without scanning it again (amavisd-new's semantics).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from amavisd.actions.forward import Forwarder, ForwardError, SMTPForwarder
from amavisd.envelope import Envelope
from amavisd.verdict import Category, Result

CHUNK = 256 * 1024

# Category -> file-name prefix (amavisd-new's virus-%m, banned-%m).
KINDS: dict[Category, str] = {
    Category.INFECTED: "virus",
    Category.BANNED: "banned",
    Category.UNCHECKED: "unchecked",
    Category.CLEAN: "clean",
}

_ID = r"[A-Za-z0-9_-]{12}"
# What people may type: the bare id, or the file name `ls` shows them.
ID_PATTERN = re.compile(rf"(?:(?:{'|'.join(KINDS.values())})-)?({_ID})(?:\.gz|\.json)?")


class QuarantineError(Exception):
    """A quarantine problem, said in one line."""


class UnknownEntry(QuarantineError):
    """No entry with this id (or the id is not one of ours)."""


@dataclass
class QuarantineEntry:
    id: str
    kind: str  # virus | banned | unchecked | clean
    file: str  # the message file's name, in the quarantine directory
    gzip: bool
    size: int  # of the raw message
    sha256: str  # of the raw message, checked before a release
    date: str  # ISO 8601, UTC, when stored
    log_id: str
    category: str
    sender: str
    recipients: list[str]
    queue_id: str = ""
    client_address: str = ""
    viruses: list[str] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    secret_id: str = ""  # empty in entries stored before release authorisation

    @classmethod
    def from_json(cls, data: dict) -> QuarantineEntry:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


def parse_id(text: str) -> str:
    """The bare id from an id or quarantine file name; UnknownEntry otherwise."""
    match = ID_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise UnknownEntry(f"not a quarantine id: {text!r}")
    return match.group(1)


def new_id() -> str:
    """12 base64url characters (72 bits), starting and ending with a letter or
    digit: Debian's amavisd-release only accepts mail ids of that shape."""
    while True:
        candidate = secrets.token_urlsafe(9)  # 9 bytes -> 12 characters
        if candidate[0].isalnum() and candidate[-1].isalnum():
            return candidate


def new_secret() -> str:
    """16 base64url characters (96 bits) that start and end with a letter or
    digit, so that no command line takes one for an option."""
    while True:
        candidate = secrets.token_urlsafe(12)  # 12 bytes -> 16 characters
        if candidate[0].isalnum() and candidate[-1].isalnum():
            return candidate


class Quarantine:
    def __init__(self, directory: str, gzip: bool = False):
        self.directory = os.path.abspath(directory)
        self.gzip = gzip

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

    def _create(self, name: str):
        # O_EXCL: never overwrite; O_NOFOLLOW: never write through a planted link.
        fd = os.open(self._path(name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "wb")

    # -- storing ---------------------------------------------------------------

    def store(self, message: bytes | str | os.PathLike, envelope: Envelope,
              result: Result) -> str:
        """Keep the message and what we know about it; returns the id."""
        if result.category is None:
            raise QuarantineError("nothing to quarantine: the message has no verdict")
        self.prepare()
        kind = KINDS[result.category]
        while True:
            qid = new_id()
            name = f"{kind}-{qid}" + (".gz" if self.gzip else "")
            try:
                out = self._create(name)
            except FileExistsError:
                continue  # 72 random bits collided: draw again
            except OSError as err:
                raise QuarantineError(f"cannot write {self._path(name)}: "
                                      f"{err.strerror}") from None
            break
        sidecar = None
        try:
            with out:
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
            side = self._create(f"{kind}-{qid}.json")
            sidecar = f"{kind}-{qid}.json"
            with side:
                side.write(json.dumps(asdict(entry), indent=1).encode())
                side.flush()
                os.fsync(side.fileno())
        except BaseException:
            for leftover in (sidecar, name):
                if leftover:
                    self._unlink(leftover)
            raise
        return qid

    def _write(self, out, message: bytes | str | os.PathLike) -> tuple[int, str]:
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

    def load(self, qid: str) -> QuarantineEntry:
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

    def show(self, qid: str) -> tuple[QuarantineEntry, bytes]:
        entry = self.load(qid)
        return entry, self.message(entry)

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
                entries.append(self.load(name))
            except QuarantineError:
                continue
        return sorted(entries, key=lambda e: (e.date, e.id))

    def remove(self, qid: str) -> None:
        entry = self.load(qid)
        self._unlink(f"{entry.kind}-{entry.id}.json")
        self._unlink(entry.file)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    # -- release -----------------------------------------------------------------

    def release(self, qid: str, recipients: Sequence[str] | None = None,
                forward: Forwarder | None = None) -> dict[str, str]:
        """Re-send the message, unchanged and unscanned, from its original
        sender to its original recipients (or to `recipients`). Returns the
        recipients refused while others were taken; raises QuarantineError
        when nothing was delivered. The default forward method is SMTP to
        127.0.0.1:10025, the MTA's re-injection port."""
        entry, data = self.show(qid)
        targets = list(recipients) if recipients else entry.recipients
        forward = forward if forward is not None else SMTPForwarder()
        try:
            return forward.send(entry.sender, targets, data)
        except ForwardError as err:
            raise QuarantineError(f"release of {entry.id} failed: {err}") from None


def _chunks(message: bytes | str | os.PathLike):
    if isinstance(message, (bytes, bytearray, memoryview)):
        view = memoryview(message)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start:start + CHUNK])
        return
    fd = os.open(message, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _read_nofollow(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
