"""Header edits for passed mail: `X-Virus-Scanned:`, and alerts when passed with a problem."""

from __future__ import annotations

from amavisd import __version__
from amavisd.config import Config
from amavisd.verdict import Destiny, HeaderEdit, Result


def scanned_header(config: Config) -> HeaderEdit:
    text = config.x_header_line.format(version=__version__, myhostname=config.hostname)
    # Index 0: the very top, above the MTA's Received: (milter and AM.PDP semantics).
    return HeaderEdit(op="insert", name=config.x_header_tag, value=text, index=0)


def header_edits(config: Config, result: Result) -> list[HeaderEdit]:
    """Passed mail gets X-Virus-Scanned, and an X-Amavis-Alert per problem it
    was passed with (not scanned, unchecked parts), so users and filters see it.
    `config` is the one in force for the message (its policy banks laid over).
    Mail whose every recipient bypasses virus checks was not scanned, and no
    header says it was."""
    if result.destiny is not Destiny.PASS or result.category is None:
        return []
    edits = [] if result.bypassed_virus_checks else [scanned_header(config)]
    alerts = list(result.alerts)
    if not alerts and result.unchecked:
        alerts.append("UNCHECKED: " + "; ".join(result.unchecked))
    edits += [HeaderEdit(op="insert", name="X-Amavis-Alert", value=_one_line(a), index=0)
              for a in alerts]
    if result.quarantine_id:
        edits.append(HeaderEdit(op="insert", name="X-Quarantine-ID",
                                value=f"<{result.quarantine_id}>", index=0))
    return edits


def _one_line(text: str, limit: int = 900) -> str:
    """Header-safe: no CR/LF a hostile member name could smuggle in, bounded length."""
    return " ".join(text.split())[:limit]
