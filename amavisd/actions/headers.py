"""Header edits for passed mail: the `X-Virus-Scanned:` line."""

from __future__ import annotations

from amavisd import __version__
from amavisd.config import Config
from amavisd.verdict import Destiny, HeaderEdit, Result


def scanned_header(config: Config) -> HeaderEdit:
    text = config.x_header_line.format(version=__version__, myhostname=config.hostname)
    # Index 0: the very top, above the MTA's Received: (milter and AM.PDP semantics).
    return HeaderEdit(op="insert", name=config.x_header_tag, value=text, index=0)


def header_edits(config: Config, result: Result) -> list[HeaderEdit]:
    if result.destiny is Destiny.PASS and result.category is not None:
        return [scanned_header(config)]
    return []
