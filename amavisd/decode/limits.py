"""Decoding limits and the per-message budget that enforces them.

Decoders ask the budget *before* producing bytes (`allowance()`), and charge
what they produced, so a bomb is stopped after at most one chunk over the
line, not after gigabytes were written or held. Running out makes the
message UNCHECKED with the reason; it never passes as CLEAN.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024


class LimitExceeded(Exception):
    """A limit was hit; `scope` says whether only this branch or the whole message stops."""

    def __init__(self, reason: str, scope: str = "message"):
        super().__init__(reason)
        self.reason = reason
        self.scope = scope  # "branch" (this part only) or "message" (stop decoding)


@dataclass(frozen=True)
class Limits:
    max_depth: int = 20
    max_parts: int = 3000
    min_quota: int = 100 * MiB
    quota_factor: int = 50
    max_part_size: int = 256 * MiB
    max_time: float = 60.0
    spill_threshold: int = 8 * MiB  # bigger parts go to the work dir, smaller stay in memory
    max_memory: int = 32 * MiB  # all of a message's parts held in memory; the rest spill
    # ...and at most half the message's size (a message costs at most twice its
    # size, however its parts nest), but never less than this for small mail
    hold_floor: int = 256 * 1024
    tool_timeout: float = 30.0  # one external unpacker run
    tool_memory: int = 1024 * MiB  # its address space
    tool_network: str = "isolated"  # or "inherit": the host's network (external.py)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Limits:
        return cls(
            max_depth=config["max_depth"],
            max_parts=config["max_parts"],
            min_quota=config["min_expansion_quota"],
            quota_factor=config["expansion_quota_factor"],
            max_part_size=config["max_part_size"],
            max_time=config["max_decode_time"],
            max_memory=config["max_memory"],
            tool_timeout=config["tool_timeout"],
            tool_memory=config["tool_memory"],
            tool_network=config["tool_network"],
        )

    def memory_for(self, message_size: int) -> int:
        """Bytes of a message's decoded parts that may stay in memory."""
        return min(self.max_memory, max(self.hold_floor, message_size // 2))

    def quota(self, message_size: int) -> int:
        return max(self.min_quota, self.quota_factor * message_size)


class Budget:
    def __init__(self, limits: Limits, message_size: int):
        self.limits = limits
        self.quota = limits.quota(message_size)
        self.bytes_used = 0
        self.parts = 0
        self.deadline = time.monotonic() + limits.max_time

    def allowance(self) -> int:
        """How many more bytes one new part may hold."""
        return max(0, min(self.quota - self.bytes_used, self.limits.max_part_size))

    def charge_bytes(self, count: int) -> None:
        self.bytes_used += count
        if self.bytes_used > self.quota:
            raise LimitExceeded(f"expanded size over the quota of {self.quota} bytes")

    def charge_part(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise LimitExceeded(f"more than {self.limits.max_parts} parts")

    def remaining_time(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"decoding took longer than {self.limits.max_time:g}s")

    def check_part_size(self, size: int, where: str) -> None:
        if size > self.limits.max_part_size:
            raise LimitExceeded(f"part {where} larger than {self.limits.max_part_size} bytes",
                                scope="branch")
