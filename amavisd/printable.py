"""Text from hostile input made safe to log and show: one place that says how."""

from __future__ import annotations

_CONTROLS = {c: "?" for c in (*range(0x20), 0x7F)}


def printable(text: str) -> str:
    """`text` with every control character (CR, LF, NUL, ESC, DEL, ...) as "?",
    so it can neither end a log line or an SMTP command nor move a terminal.
    Most text has none: str.isprintable() (False for every one of them) says
    so ten times faster than the translate does."""
    return text if text.isprintable() else text.translate(_CONTROLS)
