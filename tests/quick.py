"""Which cases of a parametrized test the quick loop (`-m "not slow"`) runs.

A test whose every case costs a process or a server (a killed and resumed CLI run, a read command run
both ways) keeps a representative few in the quick loop; the rest are marked ``slow``, which CI runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pytest


def some_quick(cases: Iterable[Any], quick: Sequence[Any]) -> list[Any]:
    """``cases`` for ``pytest.mark.parametrize`` (a tuple per case where it names several arguments), those
    not in ``quick`` marked slow; ``quick`` must name cases that exist."""
    cases = list(cases)
    missing = [q for q in quick if q not in cases]
    assert not missing, f"quick cases {missing} are not among the cases"
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=() if c in quick else pytest.mark.slow)
            for c in cases]
