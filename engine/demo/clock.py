"""Wall and CPU seconds per stage of the demo."""

from __future__ import annotations

import resource
import time
from typing import Any


class StageClock:
    """Runs stages and keeps the wall and CPU seconds of each (``clock(name, fn, *args)``)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = fn(*a, **kw)
        self.wall[name] = round(time.perf_counter() - t0, 1)
        self.cpu[name] = round(_cpu_seconds() - c0, 1)
        return result


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
