"""IPv6 link-local only: three real nodes on a line of two bridges where no namespace
has an IPv4 address at all (loopback aside), as on an IPv6-only Freifunk mesh.

A - br0 - B - br1 - C. A and B find each other by mDNS; C has mDNS off and knows B
only as a static peer ``[fe80::...%mesh0]:4201#id`` (multicast filtered), so B
learns C from an inbound link. B's two interfaces give its two neighbours two
scopes. A user on A DMs a user on C (relayed by B, two hops) and gets a reply. The
REPLs reach their node over ``[::1]`` (A) and over the node's own link-local
address with its scope (C).
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from mesh_procs import MeshUser, NodeProc, loadavg
from netns_kit import Netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

CONVERGE_S = 90


@pytest.mark.parametrize(
    "b_interfaces", ["mesh0,mesh1", ""], ids=["b-named-interfaces", "b-every-interface"]
)
async def test_ipv6_link_local_only_line_discovers_and_relays_a_dm(
    net: Netns, tmp_path: Path, b_interfaces: str
) -> None:
    """``b_interfaces``: B's mDNS on its two mesh interfaces by name (a router's UCI)
    or on every interface (no config, as a laptop runs it)."""
    hosts = [net.host(f"s{i}") for i in range(3)]
    la = net.connect(hosts[0], "br0", ipv4=False)
    net.connect(hosts[1], "br0", ipv4=False)
    lb1 = net.connect(hosts[1], "br1", ipv4=False)
    lc = net.connect(hosts[2], "br1", ipv4=False)
    for h in hosts:  # nothing but loopback has an IPv4 address
        assert h.ipv4_addresses() == [], h.name
    a = NodeProc(hosts[0], tmp_path / "na", "mesh0", ready=False)
    b = NodeProc(hosts[1], tmp_path / "nb", b_interfaces)
    static = f"[{lb1.link_local}%{lc.dev}]:4201#{b.node_id}"
    c = NodeProc(
        hosts[2],
        tmp_path / "nc",
        "",
        ready=False,
        env={"QPC_MESH_MDNS": "0", "QPC_MESH_STATIC_PEERS": static},
    )
    a.wait_ready()
    c.wait_ready()
    nodes = [a, b, c]
    t0 = time.monotonic()
    servers = ["[::1]:4201", "", f"[{lc.link_local}%{lc.dev}]:4201"]

    async with AsyncExitStack() as stack:
        users: dict[int, MeshUser] = {}
        with trio.fail_after(120):
            for i in (0, 2):
                u = await MeshUser.open(f"u{i}", hosts[i], nodes[i], tmp_path / f"u{i}", server=servers[i])  # fmt: skip
                stack.push_async_callback(u.aclose)
                users[i] = u

        async def converged(u: MeshUser) -> None:
            """One neighbour up (B) and both users' homes known."""
            deadline = trio.current_time() + CONVERGE_S
            while True:
                homed, peers = await u.mesh_peers()
                if homed >= 2 and peers == {b.node_id[:16]: "up"}:
                    return
                assert trio.current_time() < deadline, (
                    u.name,
                    homed,
                    peers,
                    [n.stderr()[-1000:] for n in nodes],
                )
                await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            for u in users.values():
                nursery.start_soon(converged, u)
        took = time.monotonic() - t0

        # B's address in each end's table is its link-local, scoped to that end's
        # mesh interface
        for i, link in ((0, la), (2, lc)):
            table = await users[i].ask("/mesh peers", "users homed mesh-wide")
            line = next(x for x in table.splitlines() if b.node_id[:16] in x)
            assert "[fe80::" in line and f"%{link.ifindex}]:4201" in line, table

        t1 = time.monotonic()
        await users[0].ask(f"/dm {users[2].fpr} hello over fe80", "sent to [", timeout=60)
        await users[2].wait_for(": hello over fe80", timeout=60)
        await users[2].ask(f"/dm {users[0].fpr} back over fe80", "sent to [", timeout=60)
        await users[0].wait_for(": back over fe80", timeout=60)
        dm = time.monotonic() - t1

    print(
        f"\nmesh IPv6 link-local only, A - B - C (C by static peer, B on "
        f"{b_interfaces or 'every interface'}): links + bindings in /mesh peers {took:.1f} s "
        f"after all nodes ready; 2-hop DM and reply {dm:.1f} s; load {loadavg()}"
    )
