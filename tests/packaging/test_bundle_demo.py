"""``qpc demo`` from the packaged binary in a root holding only busybox, /tmp and /proc:
everything it needs (three nodes, three users, MLS, SQLite) is inside the bundle, and
its temporary data dir is gone afterwards."""

from __future__ import annotations

import pytest
from pkg_rootfs import BusyboxRoot

pytestmark = pytest.mark.timeout(180)


def test_demo_runs_from_the_bundle_and_cleans_up(root: BusyboxRoot) -> None:
    r = root.run("qpc", "demo", timeout=150)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "DM a -> c relayed via B" in r.stdout
    assert r.stdout.rstrip().endswith("all 9 steps passed")
    assert list((root.path / "tmp").iterdir()) == []
