"""Real mDNS between real processes, each in its own network namespace on one bridge.

What a Freifunk cloud looks like to qpc: hosts on one L2 segment, IPv4 and IPv6 or
IPv6 link-local only. Discovery time is printed (from process launch to the first
PeerSeen of each peer), never asserted: it depends on the machine's load.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time

import pytest
from disc_proc import DiscProc, node_id
from netns_kit import Host, Netns, live_namespaces, require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

FULL_MESH_S = 30  # bound for "everyone found everyone" under a loaded CI machine


def _report(procs: list[DiscProc]) -> dict[str, str]:
    return {
        p.host.name: f"rc={p.proc.poll()} events={p.events[-3:]} err={p.stderr()}" for p in procs
    }


def _print_discovery_times(what: str, procs: list[DiscProc]) -> None:
    """Median over every (observer, peer) pair: from the observer's launch (interpreter
    start and imports included) and from its "ready" (zeroconf listening)."""
    launch = sorted(e["t"] - p.launched for p in procs for e in p.seen().values())
    ready = sorted(e["t"] - p.of("ready")[0]["t"] for p in procs for e in p.seen().values())
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(
        f"\nmdns discovery, {what}, {len(launch)} pairs: median {statistics.median(launch):.3f} s "
        f"from launch (min {launch[0]:.3f}, max {launch[-1]:.3f}); "
        f"median {statistics.median(ready):.3f} s from ready; load {load}"
    )


def _all_found(procs: list[DiscProc]) -> None:
    want = {p.node for p in procs}
    for p in procs:
        others = want - {p.node}
        ok = p.wait_for(lambda _e, p=p, o=others: o <= set(p.seen()), FULL_MESH_S)
        assert ok, _report(procs)


def test_five_nodes_on_one_bridge_find_each_other_and_goodbye_removes(net: Netns) -> None:
    hosts = [net.host(f"n{i}") for i in range(5)]
    links = [net.connect(h, "br0", ipv4=True) for h in hosts]
    procs = [DiscProc(h, i) for i, h in enumerate(hosts)]
    _all_found(procs)

    _print_discovery_times("5 nodes, IPv4+IPv6", procs)

    by_node = {p.node: (p, link) for p, link in zip(procs, links, strict=True)}
    for p, link in zip(procs, links, strict=True):
        assert {e["ev"] for e in p.events} <= {"ready", "peer_seen", "peer_updated", "stats"}
        for node, e in p.seen().items():
            peer, peer_link = by_node[node]
            assert e["txt"]["port"] == peer.port
            # IPv6 link-local first, scoped to *our* interface; then the peer's IPv4
            assert e["addresses"] == [
                [peer_link.link_local, peer.port, link.ifindex],
                [peer_link.ipv4, peer.port, 0],
            ]
            assert e["display"][0] == f"[{peer_link.link_local}%mesh0]:{peer.port}"
        assert node_id(procs.index(p)) not in p.seen()  # our own announcement is filtered

    victim = procs[4]
    t_term = time.time()
    victim.terminate()
    for p in procs[:4]:
        assert p.wait_for(lambda _e, p=p: p.of("peer_gone", victim.node), 15), _report(procs)
        assert [e["node"] for e in p.of("peer_gone")] == [victim.node]
    gone = [p.of("peer_gone", victim.node)[0]["t"] - t_term for p in procs[:4]]
    assert victim.proc.wait(15) == 0, victim.stderr()
    assert victim.stats()["shutdown_timeouts"] == 0
    print(f"goodbye seen by the others after SIGTERM: max {max(gone):.3f} s")


def test_ipv6_link_local_only(net: Netns) -> None:
    hosts = [net.host(f"v{i}") for i in range(3)]
    links = [net.connect(h, "br6", ipv4=False) for h in hosts]
    for h in hosts:  # no IPv4 address on any interface but loopback
        out = net_addrs(h.cmd(["ip", "-4", "-o", "addr", "show"]))
        assert all(" lo " in line for line in out), out
    procs = [DiscProc(h, 10 + i) for i, h in enumerate(hosts)]
    _all_found(procs)
    by_node = {p.node: (p, link) for p, link in zip(procs, links, strict=True)}
    for p, link in zip(procs, links, strict=True):
        for node, e in p.seen().items():
            peer, peer_link = by_node[node]
            assert e["addresses"] == [[peer_link.link_local, peer.port, link.ifindex]]
            assert peer_link.link_local.startswith("fe80:")
    _print_discovery_times("3 nodes, IPv6 link-local only", procs)


def test_stopped_while_still_announcing_exits_promptly_and_leaves_no_ghost(net: Netns) -> None:
    """Cancelled during probing (the first ~1.5 s): shutdown waits for the bounded
    probe, then says goodbye, so a peer that saw the node also sees it leave."""
    a, b = net.host("sa"), net.host("sb")
    net.connect(a, "brs")
    net.connect(b, "brs")
    watcher = DiscProc(a, 50)
    assert watcher.wait_for(lambda e: any(x["ev"] == "ready" for x in e), FULL_MESH_S)
    brief = DiscProc(b, 51, extra=["--seconds", "0.2"])
    assert brief.proc.wait(20) == 0, brief.stderr()
    assert [e["ev"] for e in brief.events if e["ev"] in ("stats", "closed")][-1] == "closed"
    assert brief.stats()["shutdown_timeouts"] == 0
    if watcher.of("peer_seen", brief.node):
        assert watcher.wait_for(lambda _e: watcher.of("peer_gone", brief.node), 10)


def test_kill9_then_restart_replaces_the_stale_entry(net: Netns) -> None:
    """kill -9 sends no goodbye: the others keep the cached entry (liveness is the
    federation link's job). The restarted node reuses its instance name, so its new
    port replaces the stale one instead of sitting next to it."""
    hosts = [net.host(f"k{i}") for i in range(2)]
    for h in hosts:
        net.connect(h, "brk", ipv4=True)
    a, b = DiscProc(hosts[0], 20), DiscProc(hosts[1], 21, port=5001)
    _all_found([a, b])
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    b2 = DiscProc(hosts[1], 21, port=5002)
    ok = a.wait_for(
        lambda _e: any(e["txt"]["port"] == 5002 for e in a.of("peer_updated", b.node)), 20
    )
    assert ok, _report([a, b2])
    assert a.of("peer_gone") == []
    assert [e["node"] for e in a.of("peer_seen")] == [b.node]  # one peer, updated in place


HOSTILE = """
import sys, time
from zeroconf import IPVersion, ServiceInfo, Zeroconf
T = "_quicprochat._udp.local."
good = {"ver": "1", "node": "ab" * 32, "port": "4201"}
bad = {
    "missing": {"ver": "1", "port": "4201"},
    "nothex": {**good, "node": "zz" * 32},
    "huge": {**good, **{f"pad{i}": "x" * 200 for i in range(8)}},
    "badport": {**good, "port": "99999"},
}
zc = Zeroconf(ip_version=IPVersion.All)
for name, props in bad.items():
    zc.register_service(ServiceInfo(T, f"{name}.{T}", port=4201, properties=props,
                                    server=f"{name}.local.", parsed_addresses=sys.argv[1:]))
print("registered", flush=True)
time.sleep(60)
"""


def test_hostile_announcements_are_counted_and_ignored(net: Netns) -> None:
    hosts = [net.host(n) for n in ("good", "obs", "evil")]
    links = [net.connect(h, "brh") for h in hosts]
    evil = hosts[2].popen(
        [sys.executable, "-c", HOSTILE, links[2].ipv4 or "", links[2].link_local],
        stdout=subprocess.PIPE,
    )
    good, obs = DiscProc(hosts[0], 30), DiscProc(hosts[1], 31)
    assert evil.stdout is not None and evil.stdout.readline().strip() == "registered"
    ok = obs.wait_for(
        lambda _e: good.node in obs.seen() and len(obs.stats().get("bad_by_reason", [])) >= 4, 30
    )
    assert ok, _report([good, obs])
    # counted per resolution (a record announced again is counted again)
    assert set(dict(obs.stats()["bad_by_reason"])) == {
        "missing_field",
        "bad_node",
        "oversize",
        "bad_port",
    }
    assert list(obs.seen()) == [good.node]  # and the process is alive and well:
    obs.terminate()
    assert obs.proc.wait(15) == 0, obs.stderr()


@pytest.mark.parametrize(
    ("neighbour", "spare"),
    [(False, False), (True, False), (True, True)],
    ids=["alone", "avahi-like-neighbour", "avahi-like-neighbour-two-interfaces"],
)
def test_only_the_chosen_interface(net: Netns, neighbour: bool, spare: bool) -> None:
    """A router announces and browses on its mesh interface only (``--interface``);
    hosts on its LAN neither see it nor are seen.

    ``neighbour``: another mDNS program on the router listens on every interface (as
    umdns/avahi do), so Linux hands the LAN's multicast to our socket too unless we
    isolate it. ``spare``: the router uses two interfaces (mesh1 and an empty mesh2);
    then IPv6 isolation is not possible and the on-link filter keeps the LAN peer out
    of our view (the LAN may still get an answer from us: documented limitation)."""
    router, mesh_peer, lan_peer = net.host("r"), net.host("m"), net.host("l")
    net.connect(router, "lan")  # router's mesh0: the LAN
    r_mesh = net.connect(router, "mesh")  # router's mesh1: the mesh
    net.connect(mesh_peer, "mesh")
    net.connect(lan_peer, "lan")
    chosen = ["--interface", "mesh1"]
    if spare:
        net.connect(router, "spare")
        chosen += ["--interface", "mesh2"]
    if neighbour:
        other = DiscProc(router, 43)
        assert other.wait_for(lambda e: any(x["ev"] == "ready" for x in e), FULL_MESH_S)
    lan = DiscProc(lan_peer, 42)
    r = DiscProc(router, 40, extra=chosen)
    m = DiscProc(mesh_peer, 41)
    assert r.wait_for(lambda _e: m.node in r.seen(), FULL_MESH_S), _report([r, m, lan])
    assert m.wait_for(lambda _e: r.node in m.seen(), FULL_MESH_S), _report([r, m, lan])
    assert r.of("ready")[0]["interfaces"] == (["mesh1", "mesh2"] if spare else ["mesh1"])
    assert r.wait_for(lambda _e: r.stats().get("seen", 0) >= 1, 10)
    assert r.stats()["multicast_isolated"] is (not spare)
    assert [a[2] for a in r.seen()[m.node]["addresses"] if ":" in a[0]] == [r_mesh.ifindex]
    # The LAN host browses the LAN from before the router started: had the router
    # been heard there (or heard it), it would be within the mesh's discovery time.
    # A check for absence needs a window: a generous one.
    assert lan.wait_for(lambda _e: bool(lan.seen()) or not neighbour, FULL_MESH_S)
    leaked = lan.wait_for(lambda _e: r.node in lan.seen(), 3.0)
    assert not leaked or spare
    assert lan.node not in r.seen() and m.node in r.seen()
    for e in r.seen().values():  # nothing from the LAN's prefix either
        assert all(not a[0].startswith(f"10.{net.ipv4_net}.0.") for a in e["addresses"]), e


def _start_failed(p: DiscProc) -> bool:
    return p.wait_for(lambda _e: p.stats().get("start_failures", 0) >= 1, FULL_MESH_S)


def test_discovery_starts_once_its_interface_comes_up_after_the_node(net: Netns) -> None:
    """Boot order on a router: the node starts before its mesh link is up. Discovery
    does not stop the node; it says why it is off and starts by itself once the
    link is up (retried with backoff), without a restart."""
    a, b = net.host("n0"), net.host("n1")
    net.connect(a, "br0")
    late = net.connect(b, "br0")
    net.set_link(late, False)
    pa = DiscProc(a, 0)
    pb = DiscProc(b, 1, extra=["--interface", "mesh0"])
    assert _start_failed(pb), _report([pa, pb])
    assert pb.of("ready") and pb.proc.poll() is None  # started all the same
    st = pb.stats()
    assert st["running"] is False and "mesh0" in st["last_error"], st
    assert not pb.seen()
    net.set_link(late, True)
    _all_found([pa, pb])
    assert pb.stats()["running"] is True and pa.stats()["start_failures"] == 0


def test_discovery_starts_once_port_5353_is_free(net: Netns) -> None:
    """Another mDNS responder holds UDP 5353 without SO_REUSEADDR: zeroconf cannot
    bind (EADDRINUSE). The node runs without discovery and takes it up on a later
    try once the port is shared or free."""
    a, b = net.host("n0"), net.host("n1")
    net.connect(a, "br0")
    net.connect(b, "br0")
    holder = b.popen(
        [sys.executable, "-c",
         "import socket, time\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "s.bind(('0.0.0.0', 5353))\n"
         "print('held', flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        pa = DiscProc(a, 0)
        pb = DiscProc(b, 1)
        assert _start_failed(pb), _report([pa, pb])
        assert pb.of("ready") and pb.proc.poll() is None
        st = pb.stats()
        assert st["running"] is False and "Errno 98" in st["last_error"], st
    finally:
        holder.kill()
        holder.wait(10)
    _all_found([pa, pb])
    assert pb.stats()["running"] is True


def test_cable_pulled_and_plugged(net: Netns) -> None:
    """The kit's link helpers: a pulled cable cuts the host off, plugging it back
    restores it (and its link-local address)."""
    a, b = net.host("ca"), net.host("cb")
    la, lb = net.connect(a, "brc"), net.connect(b, "brc")
    assert lb.ipv4 is not None
    assert udp_reaches(a, b, lb.ipv4)
    net.set_link(lb, up=False)
    assert not udp_reaches(a, b, lb.ipv4)
    net.set_link(lb, up=True)
    assert udp_reaches(a, b, f"{lb.link_local}%{la.dev}", timeout=5)


def test_kit_removes_everything_even_when_the_body_fails() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="boom"), Netns() as kit:
        kit.connect(kit.host("x"), "br0")
        p = kit.hosts["x"].popen(["sleep", "60"])
        assert kit.prefix + "x" in live_namespaces()
        raise RuntimeError("boom")
    assert p.poll() is not None
    assert not [ns for ns in live_namespaces() if ns.startswith(kit.prefix)]


ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 9999))
s.settimeout(15)
print("ready", flush=True)
try:
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(data, peer)
except TimeoutError:
    pass
"""
PROBE = """
import socket, sys, time
ai = socket.getaddrinfo(sys.argv[1], 9999, type=socket.SOCK_DGRAM)[0]
s = socket.socket(ai[0], socket.SOCK_DGRAM)
s.settimeout(0.2)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        s.sendto(b"x", ai[4])
        s.recvfrom(10)
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"""


def udp_reaches(src: Host, dst: Host, addr: str, timeout: float = 2.0) -> bool:
    """A UDP echo from ``src`` to ``addr`` (on ``dst``) comes back within ``timeout``."""
    server = dst.popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        argv = src.cmd([sys.executable, "-c", PROBE, addr, str(timeout)])
        return subprocess.run(argv, capture_output=True, timeout=timeout + 20).returncode == 0
    finally:
        server.kill()
        server.wait(5)


def net_addrs(argv: list[str]) -> list[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
