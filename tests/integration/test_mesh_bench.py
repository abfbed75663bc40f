"""bench/mesh_bench.py runs end to end with tiny counts (--smoke): every figure line
is printed and the last line is the ratio the issue asks for. Times are never
asserted (a shared machine): only that the bench measures and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]


def test_mesh_bench_smoke_prints_every_figure_and_the_ratio_last() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "mesh_bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        cwd=REPO,
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    lines = r.stdout.splitlines()
    rows = {m.group(1): float(m.group(2)) for m in
            (re.match(r"^(one node|1 hop|2 hops) +(\d+) ", x) for x in lines) if m}  # fmt: skip
    assert sorted(rows) == ["1 hop", "2 hops", "one node"] and all(v > 0 for v in rows.values())
    assert any(
        re.match(r"^discovery: (median [\d.]+ s from launch|skipped \(.+\))", x) for x in lines
    )
    assert any(re.match(r"^detection: [\d.]+ s from kill -9", x) for x in lines), lines
    last = re.fullmatch(r"mesh 2hop ratio=(\d+\.\d\d)", lines[-1])
    assert last is not None, lines[-1]
    assert abs(float(last.group(1)) - rows["2 hops"] / rows["one node"]) < 0.02
