"""Three real ``qpc node`` processes on a line of two bridges find each other by mDNS,
federate, route, and relay a DM between REPL users homed at the ends.

A - br0 - B - br1 - C: A and C share no link. Each node runs with nothing but
``mesh.mdns`` on and its interfaces named (what a router's UCI says); the users
are real ``qpc repl --script`` processes in their node's namespace.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mesh_procs import NodeProc, fingerprint, repl
from netns_kit import Netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(150)]

CONVERGE_S = 60  # bound for discovery + links + routes + bindings on a loaded machine


def test_three_nodes_by_mdns_relay_a_dm_over_two_hops(net: Netns, tmp_path: Path) -> None:
    a_host, b_host, c_host = net.host("a"), net.host("b"), net.host("c")
    net.connect(a_host, "br0")
    net.connect(b_host, "br0")
    net.connect(b_host, "br1")
    net.connect(c_host, "br1")
    t0 = time.monotonic()
    a = NodeProc(a_host, tmp_path / "na", "mesh0")
    b = NodeProc(b_host, tmp_path / "nb", "mesh0,mesh1")
    c = NodeProc(c_host, tmp_path / "nc", "mesh0")
    ua, uc = tmp_path / "ua", tmp_path / "uc"
    c_fpr = fingerprint(uc)
    repl(c_host, c, uc, "/whoami\n")  # c logs in on C: its home binding spreads

    # A learns a 2-hop route to C and c's binding (2 users: a itself and c).
    deadline = time.monotonic() + CONVERGE_S
    while True:
        routes = repl(a_host, a, ua, "/mesh routes\n")
        if "2 hops" in routes and "(2 users homed" in routes:
            break
        assert time.monotonic() < deadline, (routes, a.stderr())
        time.sleep(1.0)
    converged = time.monotonic() - t0
    peers = repl(a_host, a, ua, "/mesh peers\n")
    assert peers.count(" up ") == 1, peers  # only B: A and C share no bridge
    assert b.node_id[:16] in peers and c.node_id[:16] in routes

    t1 = time.monotonic()
    repl(a_host, a, ua, f"/dm {c_fpr} hello over two hops\n")
    got = repl(c_host, c, uc, "/inbox --wait 20\n")
    assert "hello over two hops" in got, (got, c.stderr())
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(
        f"\nmesh netns: mDNS discovery + links + routes + bindings converged in "
        f"{converged:.1f} s; /dm + /inbox (2 REPL processes) {time.monotonic() - t1:.1f} s; "
        f"load {load}"
    )
