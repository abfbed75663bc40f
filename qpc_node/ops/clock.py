"""The one place that reads the wall clock.

Cores take ``now`` as an argument; the Trio layer passes ``trio.current_time()``
for durations and this wall clock (unix ms) where times cross machines
(envelope expiry, KeyPackage lifetimes). Tests inject their own callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WallClock = Callable[[], int]


def system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


class ManualWallClock:
    """A wall clock tests move by hand."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms
