"""Hypothesis profiles for the fuzz tests: `ci` (a short run inside `make
test`) and `long` (`make fuzz`: many more examples, still bounded in time).

AMAVISD_FUZZ=long selects the long profile; AMAVISD_FUZZ_EXAMPLES overrides
the number of examples of either.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
# `make test` (CI) runs the same examples every time, so a red run is a
# finding to reproduce, never a coin toss; `make fuzz` explores new ones.
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
settings.register_profile("long", max_examples=3000, derandomize=False, **_common)
settings.load_profile(os.environ.get("AMAVISD_FUZZ", "ci"))
if os.environ.get("AMAVISD_FUZZ_EXAMPLES"):
    settings.register_profile("override", parent=settings.get_profile(
        os.environ.get("AMAVISD_FUZZ", "ci")),
        max_examples=int(os.environ["AMAVISD_FUZZ_EXAMPLES"]))
    settings.load_profile("override")
