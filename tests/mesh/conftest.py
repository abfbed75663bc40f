"""Mesh tests: real processes in network namespaces this suite creates and removes.

They need root and iproute2. Outside CI a machine without them skips with the reason;
in CI (``CI`` set) that is a failure: a skipped mesh test is not a passed one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from netns_kit import Netns, require_netns, sweep_stale, unavailable_reason


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers() -> None:
    if unavailable_reason() is None:
        sweep_stale()  # namespaces of an earlier run that was SIGKILLed


@pytest.fixture
def net() -> Iterator[Netns]:
    require_netns()
    with Netns() as kit:
        yield kit
