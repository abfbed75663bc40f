"""qpc_sim is a development tool: neither the wheel nor the frozen bundle may carry it."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_packs_only_qpc_node() -> None:
    maturin = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["maturin"]
    assert maturin["python-packages"] == ["qpc_node"]


def test_the_bundle_excludes_qpc_sim() -> None:
    # cross/qpc.spec freezes qpc_node's submodules and what they import; listing qpc_sim in
    # the excludes makes tests/packaging/test_build_gates.py fail if qpc_node imports it.
    lines = (REPO / "cross" / "excludes.txt").read_text().splitlines()
    assert "qpc_sim" in {ln.split("#", 1)[0].strip() for ln in lines}
