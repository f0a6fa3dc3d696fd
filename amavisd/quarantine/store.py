"""The quarantine store interface, and the registry that picks one.

Every store keeps what `QuarantineStore` says, and nothing else leaks out of
it: the pipeline stores, `amavisd quarantine` lists and shows, a release
gets, reads and marks. Which store a daemon uses is one setting,
`quarantine_store`, a URL whose scheme names a row of `STORES`
(`file:/var/virusmails`); empty means `file:<quarantine_dir>`, and with both
empty there is no quarantine. A new store (PostgreSQL, say) is one module
and one row here, with no edit of the pipeline, the release or the CLI.

Errors a store raises are `QuarantineError`s (`UnknownEntry` for an id it
does not hold), said in one line; a mistaken URL is a `ConfigError`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from amavisd.config import ConfigError
from amavisd.envelope import Envelope
from amavisd.quarantine.entry import QuarantineEntry
from amavisd.quarantine.file import FileStore
from amavisd.verdict import Result


class QuarantineStore(Protocol):
    """What the pipeline, the release and the CLI need of a quarantine."""

    @property
    def location(self) -> str:
        """Where the store is, for messages (never a password)."""

    def store(self, message: bytes | mmap.mmap | str | os.PathLike, envelope: Envelope,
              result: Result) -> str:
        """Keep the message (bytes, a read-only mapping of a big one, or the
        path of a file; never read whole) with its envelope
        and verdict; return the new entry's id. Raises QuarantineError or
        OSError when it could not: the pipeline then tempfails the message."""

    def get(self, qid: str) -> QuarantineEntry:
        """The entry for an id or a name `parse_id` accepts; UnknownEntry if none."""

    def message(self, entry: QuarantineEntry) -> bytes:
        """The message as it was stored, byte for byte, or QuarantineError."""

    def list(self) -> list[QuarantineEntry]:
        """The complete entries, oldest first."""

    def mark_released(self, entry: QuarantineEntry, recipients: Sequence[str]) -> None:
        """Record that the message went to `recipients` (a store may keep nothing)."""


# Scheme -> factory(what follows "scheme:", config): it builds the store and
# checks the URL's form (ValueError), with no I/O; settings it reads may be
# absent (the validator passes none). Tests may add a row.
STORES: dict[str, Callable[[str, Mapping[str, Any]], QuarantineStore]] = {
    "file": FileStore.from_url,
}


def store_url(config: Mapping[str, Any]) -> str:
    """The URL in effect: `quarantine_store`, else `file:<quarantine_dir>`, else ''."""
    if config["quarantine_store"]:
        return config["quarantine_store"]
    return f"file:{config['quarantine_dir']}" if config["quarantine_dir"] else ""


def open_store(config: Mapping[str, Any]) -> QuarantineStore | None:
    """The store the config names, or None when no quarantine is configured."""
    if not config["quarantine_store"]:  # a plain directory, never read as a URL
        if not config["quarantine_dir"]:
            return None
        return FileStore(config["quarantine_dir"],
                         gzip=bool(config.get("quarantine_gzip", False)))
    url = store_url(config)
    try:
        return _factory(url)(url.partition(":")[2], config)
    except ValueError as err:
        raise ConfigError(f"quarantine_store: {err} (got {url!r})") from None


def check_store_url(value: str) -> str:
    """Validator for the `quarantine_store` setting: a known scheme, and the
    rest in the form that store takes (`file:` needs an absolute path)."""
    if value:
        _factory(value)(value.partition(":")[2], {})
    return value


def _factory(url: str) -> Callable[[str, Mapping[str, Any]], QuarantineStore]:
    scheme, colon, _ = url.partition(":")
    if not colon or scheme not in STORES:
        raise ValueError(f"must be a URL of a known store ({', '.join(f'{s}:' for s in STORES)})")
    return STORES[scheme]
