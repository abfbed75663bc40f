"""``/mesh peers`` says what the node's mDNS discovery is doing, over real nodes.

Two ``qpc node`` processes on a bridge in their own namespaces; B's mesh link is down
when B starts (a router whose mesh comes up after procd started the node). B's user,
on B's loopback, sees in ``/mesh peers`` that discovery is not running and why, and
that it is retried; once the link is set up, the same command shows discovery on the
interface with A seen, and A's link up, with no restart.
"""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from mesh_procs import MeshUser, NodeProc
from netns_kit import Netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

CONVERGE_S = 90
_ON = re.compile(r"mDNS: on mesh0, (\d+) nodes? seen, announced")


async def test_mesh_peers_shows_discovery_off_and_why_then_on_once_the_link_is_up(
    net: Netns, tmp_path: Path
) -> None:
    ha, hb = net.host("st0"), net.host("st1")
    net.connect(ha, "br0")
    late = net.connect(hb, "br0")
    net.set_link(late, False)
    a = NodeProc(ha, tmp_path / "na", "mesh0", ready=False)
    b = NodeProc(hb, tmp_path / "nb", "mesh0")
    a.wait_ready()
    async with AsyncExitStack() as stack:
        with trio.fail_after(60):
            user = await MeshUser.open("ub", hb, b, tmp_path / "ub", server="[::1]:4201")
        stack.push_async_callback(user.aclose)

        # Off, with the reason and the retry (the first start fails at once: no waiting
        # on a timer here, the node reported it before it printed its listening line).
        _, peers = await user.mesh_peers()
        table = user.last_table
        assert "mDNS: not running on mesh0: " in table and "retrying)" in table, table
        assert "mesh0" in table.split("not running on mesh0: ", 1)[1], table
        assert peers == {}, table

        net.set_link(late, True)
        deadline = trio.current_time() + CONVERGE_S
        while True:
            _, peers = await user.mesh_peers()
            seen = _ON.search(user.last_table)
            if seen and int(seen.group(1)) == 1 and peers.get(a.node_id[:16]) == "up":
                break
            assert trio.current_time() < deadline, (user.last_table, b.stderr()[-1500:])
            await trio.sleep(0.5)
