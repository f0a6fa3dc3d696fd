"""A connection the doorman holds, from accept() until a worker has it or it is closed.

One passed on in the turn it was accepted in (its request whole at the
first look, room in the queue) is never held: no `Held` is made for it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from amavisd.doorman.first_request import AmpdpEnd, FirstRequest
    from amavisd.doorman.handout import Spill

RECHECK_FIRST, RECHECK_MAX = 0.002, 0.05  # seconds between reads of a trickling request
# What a look or a read finds: a whole request, part of one, end-of-file or an
# error, nothing yet; or no room to keep it (closed).
READY, PARTIAL, GONE, WAIT, DROPPED = "ready", "partial", "gone", "wait", "dropped"


@dataclass(eq=False, slots=True)
class Held:
    conn: socket.socket
    index: int  # of its listener in the master's list
    deadline: float  # monotonic: closed if it is silent, or its request not whole, then
    first: FirstRequest | None = None  # where its first request ends; None: passed at once
    # A request not whole at the first look (`reading`): what was read, and
    # whether it has ended; once whole, its bytes in a memfd for the worker.
    data: bytearray | None = None
    end: AmpdpEnd | None = None
    pause: float = RECHECK_FIRST  # before the next read
    spill: Spill | None = None


def received(conn: socket.socket, buffer: bytearray, size: int, flags: int) -> int | str:
    """recv_into `buffer` (at most `size` bytes, MSG_DONTWAIT in `flags`): how
    many came, or WAIT (none yet) or GONE (end-of-file or an error)."""
    try:
        got = conn.recv_into(buffer, size, flags)
    except (BlockingIOError, InterruptedError):
        return WAIT
    except OSError:
        return GONE
    return got or GONE


def oldest(held: dict[int, Held]) -> Held | None:
    """The first of a dict kept in order (of arrival, or of the last bytes read)."""
    return next(iter(held.values()), None)
