"""Label values, bounded: a Prometheus series per distinct value, so a label
fed from input (a virus name, a detected type, a rule a bank added) must
never grow without limit.

`Closed` takes values from a fixed vocabulary (verdicts, stages, kinds of
UNCHECKED); `Bounded` the first `cap` distinct values this process sees,
then `other`. Every value is cleaned first: printable ASCII, at most
`MAX_LENGTH` characters, so a hostile byte can neither break the
exposition nor make a long series name.
"""

from __future__ import annotations

from collections.abc import Iterable

OTHER = "other"
MAX_LENGTH = 100


def clean(value: object) -> str:
    """Printable ASCII, bounded; anything else becomes '?'; empty is 'none'."""
    text = str(value)[:MAX_LENGTH]
    if not text.isascii() or not text.isprintable():
        text = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    return text or "none"


class Closed:
    """A label from a fixed vocabulary; anything else is `other`."""

    def __init__(self, values: Iterable[str]):
        self.values = frozenset(values)

    def __call__(self, value: object) -> str:
        text = str(value)
        return text if text in self.values else OTHER


class Bounded:
    """The first `cap` distinct values seen here keep their name; later ones
    are `other`. Per process: a worker lives max_requests messages, and the
    master folds dead workers' series under the same cap (store.py)."""

    def __init__(self, cap: int, known: Iterable[str] = ()):
        self.cap = cap
        self.seen: set[str] = set(known)

    def __call__(self, value: object) -> str:
        text = clean(value)
        if text in self.seen:
            return text
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(text)
        return text
