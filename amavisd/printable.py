"""Text from hostile input made safe to log and show: one place that says how."""

from __future__ import annotations

_CONTROLS = {c: "?" for c in (*range(0x20), 0x7F)}


def printable(text: str) -> str:
    """`text` with every control character (CR, LF, NUL, ESC, DEL, ...) as "?",
    so it can neither end a log line or an SMTP command nor move a terminal."""
    return text.translate(_CONTROLS)
