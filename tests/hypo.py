"""Hypothesis example counts that follow the profile (tests/conftest.py registers them).

`ci` (the default) runs each property with the count its test names, derandomized: the
same examples every run, so a failure reproduces and a pass means the same thing each
time. `HYPOTHESIS_PROFILE=long` explores: random examples, LONG_FACTOR times as many.
"""

from __future__ import annotations

import os

LONG_FACTOR = 20


def examples(n: int) -> int:
    """max_examples for a property that CI runs `n` times."""
    return n * LONG_FACTOR if os.environ.get("HYPOTHESIS_PROFILE") == "long" else n
