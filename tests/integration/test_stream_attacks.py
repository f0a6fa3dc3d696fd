"""Hostile shapes of a 50 MiB message through the whole pipeline, with a real
clamd, each in a fresh process (test_big_messages.run_child): shapes the
window-at-a-time path handles worst, one line with no line end to cut at,
and a header block as big as the message. The verdict must be the one the
content deserves. One base64 line is cut anywhere (window.spans with
whole_lines False) and keeps the bound of the usual shapes; the header
block does not yet (mimesplit's header-run regex and _CONTENT_FIELD scan
touch all of it in one call: measured +50 MiB), so only its verdict is held.
"""

from __future__ import annotations

import base64

import pytest

from amavisd.testing.eicar import EICAR
from tests.integration.test_big_messages import BOUND_MIB, SIZE, MiB, run_child
from tests.rigs.shapes import HEAD, attached, noise

pytestmark = pytest.mark.integration


def one_line_base64() -> bytes:
    """A 50 MiB base64 attachment with no line end at all, EICAR at its end."""
    return attached(base64.b64encode(noise(SIZE * 3 // 4 - 64 * 1024) + EICAR), "base64")


def huge_header_block() -> bytes:
    """50 MiB of header fields (one field folded a million times), then EICAR."""
    fold = b"X-Pad: x\r\n" + b" " + b"y" * 70 + b"\r\n"
    return HEAD + fold * (SIZE // len(fold)) + b"\r\n" + EICAR + b"\r\n"


SHAPES = {"one 50 MiB base64 line": one_line_base64, "a 50 MiB header block": huge_header_block}
BOUNDED = {"one 50 MiB base64 line"}  # before the cut-anywhere fix: +87 MiB


@pytest.mark.parametrize("shape", SHAPES)
def test_a_hostile_50_mib_shape_is_still_found_infected(shape, clamd_nodecomp, tmp_path):
    message = SHAPES[shape]()
    out = run_child(clamd_nodecomp.address, message, tmp_path)
    print(f"\n{shape}: {len(message) / MiB:.1f} MiB, peak RSS +{out['growth_kib'] / 1024:.1f} MiB,"
          f" {out['verdict']}")
    assert out["verdict"] == "INFECTED", out
    if shape in BOUNDED:
        assert out["growth_kib"] / 1024 < BOUND_MIB, out
