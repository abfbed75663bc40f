"""Mesh tests: real processes in network namespaces this suite creates and removes.

They need root and iproute2. Outside CI a machine without them skips with the reason;
in CI (``CI`` set) that is a failure: a skipped mesh test is not a passed one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from netns_kit import Netns, sweep_stale, unavailable_reason


def _require_netns() -> None:
    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"mesh tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers() -> None:
    if unavailable_reason() is None:
        sweep_stale()  # namespaces of an earlier run that was SIGKILLed


@pytest.fixture
def net() -> Iterator[Netns]:
    _require_netns()
    with Netns() as kit:
        yield kit
