"""Hypothesis profiles for the fuzz tests (hostile and malformed input).

`ci` (the default): derandomized (the same examples on every run, so a failure is reproducible and CI never
flakes on a newly drawn example), no example database (nothing written to the work tree), no deadline (no
timing in any assertion), and few examples: the whole directory runs in seconds as part of `./dev test`.

`long`: randomized, 50x the examples; a command, not CI (README "Fuzzing"):

    HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/fuzz -q

A failure prints the falsifying example and a `@reproduce_failure` line to paste into the test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    "print_blob": True,
}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
