# SPDX-License-Identifier: MIT
"""The EICAR anti-virus test string, for tests that need a "virus".

It is assembled at import time from reversed pieces so that this source file
itself never contains the signature (otherwise scanners would quarantine the
repository).  ``CLAM_EXE_PATH`` is ClamAV's own harmless test binary from the
Debian package ``clamav-testfiles``.
"""

from __future__ import annotations

__all__ = ["EICAR", "CLAM_EXE_PATH"]

# The four 17-character quarters, each reversed, stored out of order.
_QUARTERS_REVERSED: dict[int, str] = {
    2: "URIVITNA-DRADNATS",
    0: "45XZP\\4[PA@%P!O5X",
    3: "*H+H$!ELIF-TSET-S",
    1: "-RACIE$}7)CC7)^P(",
}

EICAR: bytes = "".join(_QUARTERS_REVERSED[i][::-1] for i in range(4)).encode("ascii")
assert len(EICAR) == 68

CLAM_EXE_PATH = "/usr/share/clamav-testfiles/clam.exe"
