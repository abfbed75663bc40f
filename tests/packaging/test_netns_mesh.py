"""Two packaged nodes' roots in two network namespaces joined by a veth pair."""

from __future__ import annotations

import pytest
from pkg_rootfs import BusyboxRoot, VethPair
from test_bundle_root import FPR, has_subcommand, stop, wait_for_node


def fingerprint(whoami: str) -> str:
    m = FPR.search(whoami)
    assert m, whoami
    return m.group(1).replace(" ", "").strip().lower()


def test_harness_runs_qpc_and_pings_across_the_veth(
    netns_pair: VethPair, two_roots: tuple[BusyboxRoot, BusyboxRoot]
) -> None:
    a = two_roots[0].in_netns(netns_pair.ns_a)
    b = two_roots[1].in_netns(netns_pair.ns_b)
    for r in (a, b):
        v = r.run("qpc", "version")
        assert v.returncode == 0 and v.stdout.startswith("qpc "), v.stderr
    p4 = a.run("ping", "-c", "1", "-W", "3", netns_pair.v4_b, timeout=10)
    assert p4.returncode == 0, p4.stdout + p4.stderr
    p6 = b.run(
        "ping", "-6", "-c", "1", "-W", "3", "-I", netns_pair.dev_b, netns_pair.ll_a, timeout=10
    )
    assert p6.returncode == 0, p6.stdout + p6.stderr
    # isolation: the namespaces see only their own end of the link
    links = a.run("ip", "-o", "link").stdout
    assert netns_pair.dev_a in links and netns_pair.dev_b not in links


def repl(root: BusyboxRoot, user: str, server: str, pin: str, script: str) -> str:
    r = root.run(
        "qpc",
        "repl",
        "--server",
        server,
        "--pin",
        pin,
        "--data",
        f"/data/{user}",
        "--script",
        "-",
        stdin=script,
        timeout=90,
    )
    assert r.returncode == 0, f"{user}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.parametrize("family", ["ipv4", "ipv6-link-local"])
def test_dm_between_two_users_across_namespaces(
    family: str, netns_pair: VethPair, two_roots: tuple[BusyboxRoot, BusyboxRoot]
) -> None:
    a = two_roots[0].in_netns(netns_pair.ns_a)
    b = two_roots[1].in_netns(netns_pair.ns_b)
    assert has_subcommand(a, "node") and has_subcommand(a, "repl"), "missing from the bundle"
    listen = f"{netns_pair.v4_a}:4201" if family == "ipv4" else "[::]:4201"
    server = (
        f"{netns_pair.v4_a}:4201"
        if family == "ipv4"
        else f"[{netns_pair.ll_a}%{netns_pair.dev_b}]:4201"
    )
    node = a.popen(
        "qpc", "node", "--listen", listen, "--data", "/data/node", env={"QPC_METRICS_LISTEN": ""}
    )
    try:
        _, _, pin = wait_for_node(node)
        alice = fingerprint(repl(b, "alice", server, pin, "/whoami\n"))
        bob = fingerprint(repl(b, "bob", server, pin, "/whoami\n"))
        assert alice != bob
        repl(b, "alice", server, pin, f"/dm {bob} hello-from-alice-{family}\n")
        inbox = repl(b, "bob", server, pin, "/inbox --wait 10\n")
        assert f"hello-from-alice-{family}" in inbox, inbox
    finally:
        stop(node)
