"""The effective settings, as the rest of the daemon reads them.

`Config` is a read-only mapping (`config["workers"]`, or `config.workers`)
built by `loading.load` from the defaults, then the TOML file, then the
command line, plus the paths derived from them (the Debian layout:
`<workdir>/amavisd.sock`, `<workdir>/tmp`, `<workdir>/work`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from amavisd.config.setting import coerce
from amavisd.config.table import BY_NAME


class Config(Mapping[str, Any]):
    """The effective settings: defaults, then the TOML file, then the command line."""

    def __init__(self, values: dict[str, Any], source: str | None = None):
        self._values = values
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> Config:
        values = dict(self._values)
        for key, value in changes.items():
            values[key] = coerce(BY_NAME[key], value, f"{key}")
        return Config(values, self.source)

    def overlay(self, changes: Mapping[str, Any]) -> Config:
        """These settings with `changes` laid over them: a policy bank's
        values, each already checked by its row when the bank was loaded, so
        nothing is coerced again (a bank combination is built once, then
        cached by the pipeline)."""
        return Config({**self._values, **changes}, self.source)

    # Derived paths: the Debian layout, <workdir>/amavisd.sock and <workdir>/tmp.
    @property
    def socket_path(self) -> str:
        return self.socket or os.path.join(self.workdir, "amavisd.sock")

    @property
    def tempbase_path(self) -> str:
        return self.tempbase or os.path.join(self.workdir, "tmp")

    @property
    def work_base_path(self) -> str:
        return self.work_base or os.path.join(self.workdir, "work")

    @property
    def hostname(self) -> str:
        return self.myhostname or socket.getfqdn()
