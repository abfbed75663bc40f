"""``qpc demo`` as a user runs it: a subprocess, no root, exit 0 and every step shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

STEPS = (
    "nodes up",
    "federation links up",
    "routes converged",
    "users logged in",
    "home bindings spread to every node",
    "DM a -> c relayed via B",
    "reply c -> a",
    "group across three nodes",
    "group message from c read by a and b",
)


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qpc_node.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


def test_demo_shows_every_step_and_removes_its_temp_dir() -> None:
    r = _demo()
    assert r.returncode == 0, (r.stdout, r.stderr)
    shown = re.findall(r"^\[ *[\d.]+ s\] step (\d+): (.+) \(\d+ ms\)$", r.stdout, re.M)
    assert [int(n) for n, _ in shown] == list(range(1, len(STEPS) + 1)), r.stdout
    for (_, title), want in zip(shown, STEPS, strict=True):
        assert title.startswith(want), (title, want)
    # The DM really went through B, and A - C stayed unpeered.
    assert re.search(r"B took [1-9]\d* envelopes from A and C took [1-9]\d* from B", r.stdout)
    assert "A peer C" not in r.stdout and "C peer A" not in r.stdout
    assert re.search(r"A route to C via B, 2 hops", r.stdout)
    assert r.stdout.rstrip().endswith("all 9 steps passed")
    data = re.search(r"; data (\S+)$", r.stdout.splitlines()[0])
    assert data is not None and not Path(data.group(1)).exists()


def test_demo_keeps_data_when_asked_and_refuses_a_used_dir(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    r = _demo("--data", str(keep), "--step-timeout", "60")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert sorted(p.name for p in keep.iterdir()) == ["a", "b", "c", "users"]
    again = _demo("--data", str(keep))
    assert again.returncode == 2
    assert "must be empty or not exist" in again.stderr
