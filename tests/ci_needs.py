"""What a test needs from the machine: skipped outside CI, a failure in CI.

`.ci/run` runs as root and installs what these tests need (iproute2, strace,
busybox-static, the package), with ``CI`` set. There a missing need is a broken CI
machine, and a skipped test is not a passed one; on a developer's machine the test
skips with the reason.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(what: str, reason: str) -> NoReturn:
    """End the test for want of ``reason``: fail in CI (``what`` must run there), else skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} must run in CI: {reason}")
    pytest.skip(reason)
