"""tests/ci_needs.py: a missing need skips on a developer's machine and fails in CI."""

from __future__ import annotations

import pytest

from tests.ci_needs import unavailable


def test_outside_ci_it_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no strace"):
        unavailable("the fsync count", "no strace")


def test_in_ci_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="the fsync count must run in CI: no strace"):
        unavailable("the fsync count", "no strace")
