"""A first request not whole at the first look: read on, under one byte budget.

Why read and not peek: a peek sees only what the kernel holds for us, and
the kernel stops a client whose send buffer is full. A request that will
never end (an attacker's) looks just like a big one (thousands of
recipients) whose client waits for us to read, and a client that writes
its request a line at a time fills its buffer long before 64 KiB (each
write is a buffer of its own, ~300 of them): peeked, the first held a
worker for request_timeout, the second never came whole. So the doorman
reads on, keeps what it read, and passes it with the connection in a memfd
once the request is whole (`handout.Spill`); the worker's session starts
from those bytes. Closed at `request_timeout` from its first byte, counted
towards `max_pending_connections`, as before.

What was read is the master's memory, so one budget bounds it all: the
bytes being read, those whole and waiting for room in the queue, and those
in the queue not yet taken by a worker. A read that finds the budget spent
first closes the connection that has sent nothing for longest (never the
one reading: it just did), until there is room; with nothing left to close
(the queue holds it all), the reading one is closed. Closed, not passed on:
passing an unfinished request would give its client a worker for
request_timeout, the very thing this prevents; a closed client sees
end-of-file before any reply and tempfails (an MTA retries: nothing is
lost). Closed by idleness, not by age or size: a real client sends its big
request in milliseconds, so the one idle longest is nearly always one that
stopped; by size, every attack would cost the biggest, real request.

Not polled: read again after a pause that grows while little comes (2 ms
to 50 ms, as the trickling were looked at before), back to 2 ms when a look
drained a buffer's worth. A client that sends a byte at a time then costs
the master at most 20 reads a second (its bytes wait in the kernel between
them), and a real one streaming a big request waits 2 ms a look at most.
A request still not whole at its protocol's `max_bytes` is passed on as
read: the worker's session refuses it as too large.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import time
from collections.abc import Iterator

from amavisd.doorman.handout import Outbox, Spill, close
from amavisd.doorman.held import DROPPED, READY, RECHECK_FIRST, RECHECK_MAX, WAIT, Held, received

READ_BUDGET = 32 * 1024 * 1024  # bytes read and not yet taken by a worker, all held together
READ_CHUNK = 64 * 1024
READS_PER_LOOK = 16  # then the others get a turn
DRAINED = 4096  # a look that read this much: the client is streaming, look again soon


class Reading:
    """The connections whose first request is being read, the one idle longest first."""

    def __init__(self, outbox: Outbox, budget: int = READ_BUDGET):
        self.outbox = outbox
        self.budget = budget
        self.held: dict[int, Held] = {}  # by fd, the one that sent nothing for longest first
        self.looks: list[tuple[float, int, Held]] = []  # heap: when to read again
        self._order = itertools.count()
        self.spent = 0  # bytes in the buffers of `held`
        self.buffer = bytearray(READ_CHUNK)
        self.closed_budget = 0  # since the last summary
        self.spill_error = ""  # why a spill could not be made, for the summary
        self.spill_failures = 0

    def begin(self, held: Held) -> str:
        """Not whole at the first look: read from now on."""
        held.data, held.end = bytearray(), held.first.end()
        self.held[held.conn.fileno()] = held
        return self.read(held)

    def read(self, held: Held) -> str:
        """READY (whole, or at max_bytes: its bytes in `held.spill`), GONE
        (end-of-file or an error before it was whole), DROPPED (no room in
        the budget or for the memfd: counted) or WAIT (read again later);
        out of `held` unless WAIT."""
        before = len(held.data)
        verdict = self._read(held)
        if verdict is WAIT:
            if len(held.data) - before >= DRAINED:
                held.pause = RECHECK_FIRST
            heapq.heappush(self.looks, (time.monotonic() + held.pause, next(self._order), held))
            held.pause = min(RECHECK_MAX, held.pause * 2)
            return WAIT
        self.release(held)
        if verdict is READY:
            try:
                held.spill = Spill(held.data)
            except OSError as err:  # EMFILE, ENOMEM: never a request cut short
                self.spill_failures += 1
                self.spill_error = err.strerror or str(err)
                return DROPPED
        held.data = None
        return verdict

    def _read(self, held: Held) -> str:
        max_bytes = held.first.max_bytes
        for _ in range(READS_PER_LOOK):
            want = min(READ_CHUNK, max_bytes + 1 - len(held.data))
            free = self.budget - self.spent - self.outbox.spilled_now()
            while free <= 0 and (idle := self._idle_longest(but=held)) is not None:
                free += self.drop(idle)
            if free <= 0:
                self.closed_budget += 1
                return DROPPED
            size = received(held.conn, self.buffer, min(want, free), socket.MSG_DONTWAIT)
            if isinstance(size, str):
                return size  # WAIT, GONE
            chunk = memoryview(self.buffer)[:size]
            held.data += chunk
            self.spent += size
            fd = held.conn.fileno()
            self.held[fd] = self.held.pop(fd)  # sent something: the last to go
            if held.end.feed(chunk) or len(held.data) > max_bytes:
                return READY
        return WAIT

    def due(self, now: float) -> Iterator[tuple[Held, str]]:
        """Those due for a read that are no longer WAIT, out of `held`."""
        while self.looks and self.looks[0][0] <= now:
            held = heapq.heappop(self.looks)[2]
            if self.held.get(held.conn.fileno()) is not held:
                continue  # closed meanwhile
            verdict = self.read(held)
            if verdict is not WAIT:
                yield held, verdict

    def next_look(self) -> float | None:
        return self.looks[0][0] if self.looks else None

    def release(self, held: Held) -> bool:
        """Out of ours and of the budget (its look, when due, finds it gone);
        whether it was ours."""
        if self.held.pop(held.conn.fileno(), None) is None:
            return False
        self.spent -= len(held.data)
        return True

    def drop(self, held: Held) -> int:
        """Closed for room in the budget; the bytes freed."""
        size = len(held.data)
        self.release(held)
        close(held)
        self.closed_budget += 1
        return size

    def _idle_longest(self, but: Held) -> Held | None:
        return next((held for held in self.held.values() if held is not but), None)

    def expired(self, now: float) -> list[Held]:
        """Those past request_timeout (from their first byte), out of ours."""
        late = [held for held in self.held.values() if held.deadline <= now]
        for held in late:
            self.release(held)
        return late

    def next_deadline(self) -> float | None:
        return min((held.deadline for held in self.held.values()), default=None)

    def forget(self) -> list[Held]:
        """All of them, out of ours (a stop, a fork, a dead thread)."""
        held = list(self.held.values())
        self.held, self.looks, self.spent = {}, [], 0
        return held
