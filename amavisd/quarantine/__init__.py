"""The quarantine: infected and banned mail kept whole so it can be released.

A few modules, one concern each, so that another store (PostgreSQL, say)
and a web console can come without touching the pipeline:

- `entry`: what an entry is, whatever keeps it: its id (amavisd-new's
  72-bit mail_id), its secret_id, the envelope and the verdict;
- `store`: the small interface every store offers (store, get, message,
  list, mark_released) and the registry that picks one from the URL-like
  setting `quarantine_store` (empty means `file:<quarantine_dir>`);
- `file`: the first store, one flat 0700 directory of 0600 files;
  `attempt` makes each of its stores all or nothing;
- `release`: re-sending an entry, and who may ask for it over AM.PDP.

The pipeline, the worker and the CLI only know the interface and
`open_store(config)`, or take a store handed in.
"""

from amavisd.quarantine.entry import (
    KINDS,
    QuarantineEntry,
    QuarantineError,
    UnknownEntry,
    parse_id,
)
from amavisd.quarantine.store import STORES, QuarantineStore, open_store

__all__ = ["KINDS", "STORES", "QuarantineEntry", "QuarantineError", "QuarantineStore",
           "UnknownEntry", "open_store", "parse_id"]
