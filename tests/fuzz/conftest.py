"""Hypothesis profiles for the fuzz tests: `ci` (a short run inside `make
test`) and `long` (`make fuzz`: many more examples, still bounded in time).

AMAVISD_FUZZ=long selects the long profile; AMAVISD_FUZZ_EXAMPLES overrides
the number of examples of either.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, **_common)
settings.register_profile("long", max_examples=3000, **_common)
settings.load_profile(os.environ.get("AMAVISD_FUZZ", "ci"))
if os.environ.get("AMAVISD_FUZZ_EXAMPLES"):
    settings.register_profile("override", parent=settings.get_profile(
        os.environ.get("AMAVISD_FUZZ", "ci")),
        max_examples=int(os.environ["AMAVISD_FUZZ_EXAMPLES"]))
    settings.load_profile("override")
