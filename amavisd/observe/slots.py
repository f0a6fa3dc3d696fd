"""Each worker's line on the status board: what `amavisd status` shows of it.

A worker owns one small file in the metrics dir (`worker-<pid>.slot`) and
rewrites one fixed-size record in it, with a single pwrite() at offset 0,
when it takes a request and when it is done: no rename, no lock, nothing a
stuck worker could hold against the master (the heartbeat's reasoning).
The master reads the slots of the workers it knows, by pid; a record caught
half-written fails its CRC and is read again. The master removes a slot
when it reaps the worker (`store.fold`).

The record says what only the worker knows: busy or idle, on which message
(our log id and the MTA's queue id, both bounded), since when, how many
requests it has served. The master adds what it knows (state, age).
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Any

from amavisd.observe.labels import clean

RECORD = 512  # bytes: one pwrite, well under a page
HEADER = 12  # crc32 (8 hex digits) + payload length (4 hex digits)
READ_TRIES = 5
# The payload: these fields, "|"-separated (a message a worker: kept cheap).
FIELDS = ("busy", "pid", "requests", "started", "since", "log_id", "queue_id")


def slot_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"worker-{pid}.slot")


class Slot:
    """The calling worker's slot (made on its first request)."""

    def __init__(self, directory: str, pid: int | None = None):
        self.pid = pid if pid is not None else os.getpid()
        self.path = slot_path(directory, self.pid)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        self.started = time.time()
        self.requests = 0
        self.idle()

    def busy(self, log_id: str, queue_id: str = "") -> None:
        self.requests += 1
        self._write(1, _field(log_id), _field(queue_id) if queue_id else "")

    def idle(self) -> None:
        self._write(0, "", "")

    def _write(self, busy: int, log_id: str, queue_id: str) -> None:
        payload = (f"{busy}|{self.pid}|{self.requests}|{self.started!r}|{time.time()!r}|"
                   f"{log_id}|{queue_id}").encode()
        record = b"%08x%04x" % (zlib.crc32(payload), len(payload)) + payload
        os.pwrite(self.fd, record.ljust(RECORD, b"\0"), 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_slot(directory: str, pid: int) -> dict[str, Any] | None:
    """A worker's last record, or None (no slot yet: it has not served)."""
    try:
        fd = os.open(slot_path(directory, pid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for _ in range(READ_TRIES):
            record = os.pread(fd, RECORD, 0)
            parsed = _parse(record)
            if parsed is not None:
                return parsed
            time.sleep(0.001)  # caught mid-write: the worker finishes it in microseconds
        return None
    finally:
        os.close(fd)


def _parse(record: bytes) -> dict[str, Any] | None:
    try:
        crc, length = int(record[:8], 16), int(record[8:HEADER], 16)
    except ValueError:
        return None
    payload = record[HEADER:HEADER + length]
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    values = payload.decode("ascii", "replace").split("|")
    if len(values) != len(FIELDS):
        return None
    fields: dict[str, Any] = dict(zip(FIELDS, values, strict=True))
    try:
        fields["busy"] = fields["busy"] == "1"
        for name in ("pid", "requests"):
            fields[name] = int(fields[name])
        for name in ("started", "since"):
            fields[name] = float(fields[name])
    except ValueError:
        return None
    return fields


def _field(value: str) -> str:
    """A log or queue id for the record: cleaned, bounded, no separator."""
    return clean(value).replace("|", "?")


def remove_slot(directory: str, pid: int) -> None:
    try:
        os.unlink(slot_path(directory, pid))
    except FileNotFoundError:
        pass
