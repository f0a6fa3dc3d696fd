"""Decoding bare files in unit tests, with the work dirs removed after each test."""

from __future__ import annotations

import pytest

from amavisd.decode.engine import Decomposition, decompose

_decoded: list[Decomposition] = []


@pytest.fixture(autouse=True)
def cleanup_decoded():
    """Remove the work dirs (spilled parts) of what a test decoded."""
    yield
    while _decoded:
        _decoded.pop().cleanup()


def decode_bare(data: bytes) -> Decomposition:
    dec = decompose(data, bare_file=True)
    _decoded.append(dec)
    return dec
