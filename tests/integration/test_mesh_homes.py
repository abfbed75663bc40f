"""Issue 12: home bindings outlive a node restart; the old home hands over a re-homed
user's mail.

Real nodes on loopback configured by ``mesh.static_peers`` (the helpers of
test_mesh_dm.py), stopped and started again on the same data directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from qpc_node.node import Node
from qpc_node.ops.clock import ManualWallClock
from tests.integration.fed_nodes import identity, until
from tests.integration.test_mesh_dm import free_port, homed, mesh_node, mesh_of, user

pytestmark = pytest.mark.timeout(120)


def home_of(node: Node, who: bytes) -> bytes | None:
    b = mesh_of(node).router.binding(who)
    return None if b is None else b.node


async def test_bindings_survive_a_restart_and_are_announced_again(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A restarted node knows where users are homed before any link is up, and a node
    that never saw those users learns them from it (nobody logged in again)."""
    ids = {n: identity(tmp_path, n)[1] for n in "abc"}
    ports = {n: free_port() for n in "abc"}
    with trio.fail_after(100):
        async with (
            mesh_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (b_node, b_info),
            mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, a_info),
            user(tmp_path, "x", a_info, wall) as x,
            user(tmp_path, "y", b_info, wall) as y,
        ):
            await homed(a_node, y, b_node)
            await homed(a_node, x, a_node)
            xid, yid = x.me, y.me
        # Both stopped. A starts again alone: B is down, so nobody re-announces.
        async with mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, _):
            assert home_of(a_node, yid) == ids["b"]
            assert home_of(a_node, xid) == ids["a"]
            assert mesh_of(a_node).router.statistics().bindings_restored == 2
            # C never saw x or y; its only neighbour is A, whose users did not log in again.
            async with mesh_node(tmp_path, "c", ports["c"], [(ports["a"], ids["a"])]) as (c, _):
                await until(lambda: home_of(c, xid) == ids["a"], within=20)
                await until(lambda: home_of(c, yid) == ids["b"], within=20)
