"""Federation links: one per neighbour, health pings, up/down events, per-neighbour limits."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from qpc_node.errors import QpcError, StatusCode
from qpc_node.federation.core import (
    M_PING,
    Federation,
    FederationLimits,
    LinkEvent,
    LinkTimers,
)
from qpc_node.federation.routes import StaticRoutes
from qpc_node.federation.trust import MeshTrust
from qpc_node.mesh.nodeid import node_id_of_credentials
from qpc_node.quic import ALPN_FEDERATION, open_endpoint
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.testing import FakeNetwork
from qpc_node.quic.tls import load_or_create_node_credentials
from qpc_node.rpc.errors import RpcError
from qpc_node.store import AsyncStore
from qpc_node.store.federation import RelayQueueLimits
from qpc_node.wire.gen.qpc.v1 import federation_pb2
from tests.integration.fed_nodes import FAST, USER_A, envelope, fed_node, identity, peer, until


def fed_connections(node: Federation) -> int:
    ep = node.endpoint
    assert ep is not None
    return sum(1 for c in ep.connections() if c.alpn == ALPN_FEDERATION and c.close_error is None)


async def test_static_peers_on_both_sides_make_one_link(tmp_path: Path) -> None:
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    pa, pb = _free_port(), _free_port()  # fixed: each names the other before either starts
    with trio.fail_after(30):
        async with (
            fed_node(tmp_path, "a", port=pa, peers=(peer(pb, b_id),)) as a,
            fed_node(tmp_path, "b", port=pb, peers=(peer(pa, a_id),)) as b,
        ):
            await a.fed.wait_link(b_id)
            await b.fed.wait_link(a_id)
            await until(lambda: fed_connections(a.fed) == 1 and fed_connections(b.fed) == 1)
            (la,), (lb,) = a.fed.links(), b.fed.links()
            assert la.dialled_by_us != lb.dialled_by_us  # the same connection on both sides
            assert await a.fed.ping(b_id) > 0
            assert await b.fed.ping(a_id) > 0


async def test_when_both_dial_at_once_the_lower_node_ids_link_wins(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            for _ in range(3):  # a few rounds: which dial completes first varies
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(a.fed.connect, "127.0.0.1", b.info.port)
                    nursery.start_soon(b.fed.connect, "127.0.0.1", a.info.port)
                await until(lambda: fed_connections(a.fed) == 1 and fed_connections(b.fed) == 1)
                (la,), (lb,) = a.fed.links(), b.fed.links()
                assert la.dialled_by_us == (a.node_id < b.node_id)
                assert lb.dialled_by_us == (b.node_id < a.node_id)
                assert await a.fed.ping(b.node_id) > 0


async def test_link_events_up_and_down(tmp_path: Path) -> None:
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a:
            async with fed_node(tmp_path, "b") as b:
                await a.fed.connect("127.0.0.1", b.info.port, expected=b_id)
                up: LinkEvent = await a.fed.events.receive()
                assert (up.kind, up.node_id, up.address) == ("up", b_id, f"127.0.0.1:{b.info.port}")
            down: LinkEvent = await a.fed.events.receive()  # B stopped: its CONNECTION_CLOSE
            assert (down.kind, down.node_id) == ("down", b_id)
            assert a.fed.links() == []


@asynccontextmanager
async def bare_federation(
    tmp: Path, net: FakeNetwork, name: str, host: str, timers: LinkTimers, *, port: int = 4201
) -> AsyncIterator[Federation]:
    """A Federation on a fake-network endpoint (no Node): for a peer that goes silent."""
    creds = load_or_create_node_credentials(tmp / name / "keys")
    store = await AsyncStore.open(tmp / name / "node.db")
    try:
        fed = Federation(creds, store, MeshTrust(), StaticRoutes(b"\0" * 32))
        fed.timers = timers
        # QUIC's own idle timeout far away: only the federation pings may notice.
        settings = QuicSettings(dead_peer_timeout=120.0)
        async with (
            open_endpoint(
                sock=net.bind(host, port), server_tls=fed.server_tls, settings=settings
            ) as ep,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(ep.serve, fed.handle_stream)
            await nursery.start(fed.run, ep)
            yield fed
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_silent_peer_is_down_within_the_detection_bound(tmp_path: Path) -> None:
    net = FakeNetwork()
    timers = LinkTimers(ping_interval=0.2, ping_timeout=0.2, dead_after=0.8, call_timeout=1.0)
    with trio.fail_after(30):
        async with (
            bare_federation(tmp_path, net, "a", "10.0.0.1", timers) as a,
            bare_federation(tmp_path, net, "b", "10.0.0.2", timers) as b,
        ):
            nid = await a.connect("10.0.0.2", 4201)
            assert nid == b.node_id
            assert (await a.events.receive()).kind == "up"
            net.blackhole(net_addr("10.0.0.2"))  # B stops answering, sends no close
            t0 = trio.current_time()
            with trio.fail_after(timers.detection_bound + 1.0):
                down = await a.events.receive()
            assert (down.kind, down.node_id) == ("down", b.node_id)
            assert "no answer" in down.reason
            assert trio.current_time() - t0 >= timers.dead_after - timers.ping_interval


def net_addr(host: str) -> tuple[str, int]:
    return (host, 4201)


def test_default_timers_detect_a_silent_peer_within_15s() -> None:
    assert LinkTimers().detection_bound <= 15.0


async def test_one_abusive_neighbour_cannot_starve_the_others(tmp_path: Path) -> None:
    """A floods B: A's calls are refused over its budget, C's still get through;
    A fills B's custody queue toward a dead hop: A gets QUEUE_FULL, C still QUEUED."""
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    _, c_id = identity(tmp_path, "c")
    far, user = os.urandom(32), os.urandom(32)  # a node nobody links to, and its user
    limits = FederationLimits(
        calls_per_second=20.0, call_burst=20.0, queue=RelayQueueLimits(max_per_source=3)
    )
    with trio.fail_after(45):
        async with fed_node(
            tmp_path, "b", routes=StaticRoutes(b_id, {user: far}), limits=limits
        ) as b:
            peers = (peer(b.info.port, b_id),)
            async with (
                fed_node(
                    tmp_path, "a", routes=StaticRoutes(a_id, {user: far}, {far: b_id}), peers=peers
                ) as a,
                fed_node(
                    tmp_path, "c", routes=StaticRoutes(c_id, {user: far}, {far: b_id}), peers=peers
                ) as c,
            ):
                await a.fed.wait_link(b_id)
                await c.fed.wait_link(b_id)
                link = a.fed._link(b_id)
                refused = 0
                for i in range(60):
                    try:
                        await link.rpc.call(
                            M_PING, federation_pb2.PingRequest(nonce=i), federation_pb2.PingResponse
                        )
                    except RpcError as err:
                        assert err.code == StatusCode.RESOURCE_EXHAUSTED
                        refused += 1
                assert refused > 0
                assert await c.fed.ping(b_id) > 0  # C's budget is its own
                stats = {n.node_id: n for n in b.fed.statistics().neighbours}
                assert stats[a_id].limited_calls >= refused  # (+ its link pings, if refused)
                assert stats[c_id].limited_calls == 0

                a_msgs = [envelope(os.urandom(16), user) for _ in range(6)]
                c_msgs = [envelope(os.urandom(16), user) for _ in range(2)]
                await a.fed.submit(a_msgs, origin=USER_A)
                await until(
                    lambda: (
                        b.fed.statistics().neighbours
                        and {n.node_id: n for n in b.fed.statistics().neighbours}[
                            a_id
                        ].relay_in.get("RELAY_QUEUE_FULL", 0)
                        > 0
                    )
                )
                await c.fed.submit(c_msgs, origin=USER_A)
                await until(
                    lambda: a.fed.statistics().queued == 3 and c.fed.statistics().queued == 0
                )
                stats = {n.node_id: n for n in b.fed.statistics().neighbours}
                assert stats[a_id].relay_in["RELAY_QUEUED"] == 3
                assert stats[c_id].relay_in == {"RELAY_QUEUED": 2}
                assert b.fed.statistics().queued == 5
                assert {n.node_id: n for n in b.fed.statistics().neighbours}[far].queued_toward == 5


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_test_timers_are_fast() -> None:
    assert FAST.detection_bound < 5


async def test_a_restarted_peer_that_redials_replaces_the_dead_link_at_once(
    tmp_path: Path,
) -> None:
    """The lower node id dialled; the other dies without a word (kill -9) and, restarted,
    dials back. Its new connection must win now, not after the old one is found dead."""
    net = FakeNetwork()
    # race_window 0: the redial counts as "later" without the test waiting out a window
    # (the window itself is what test_when_both_dial_at_once... exercises).
    slow = LinkTimers(
        ping_interval=5.0, ping_timeout=5.0, dead_after=20.0, call_timeout=2.0, race_window=0.0
    )
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_id = node_id_of_credentials(load_or_create_node_credentials(a_dir / "keys"))
    b_id = node_id_of_credentials(load_or_create_node_credentials(b_dir / "keys"))
    lo, hi = ("a", "b") if a_id < b_id else ("b", "a")
    lo_host, hi_host = "10.0.0.1", "10.0.0.2"
    with trio.fail_after(30):
        async with bare_federation(tmp_path, net, lo, lo_host, slow) as low:
            async with bare_federation(tmp_path, net, hi, hi_host, slow) as high:
                assert await low.connect(hi_host, 4201) == high.node_id
                await high.wait_link(low.node_id)
                net.blackhole(net_addr(hi_host))  # dies silently: no CONNECTION_CLOSE
            net.blackhole(net_addr(hi_host), enabled=False)
            assert low.link_up(high.node_id)  # not noticed yet (slow pings)
            async with bare_federation(tmp_path, net, hi, hi_host, slow) as again:
                await again.connect(lo_host, 4201)
                with trio.fail_after(3):  # well before the old link could be found dead
                    assert await again.ping(low.node_id) > 0
                    assert await low.ping(again.node_id) > 0


RACE = LinkTimers(
    ping_interval=5.0, ping_timeout=5.0, dead_after=20.0, call_timeout=2.0, race_window=60.0
)
"""Slow pings (the old link is not found dead during a test) and a race window no
restart in a test gets out of: only the boot id tells a restart from a second dial."""


def _low_and_high(tmp_path: Path) -> tuple[str, str]:
    a_id = node_id_of_credentials(load_or_create_node_credentials(tmp_path / "a" / "keys"))
    b_id = node_id_of_credentials(load_or_create_node_credentials(tmp_path / "b" / "keys"))
    return ("a", "b") if a_id < b_id else ("b", "a")


async def test_a_peer_restarted_within_the_race_window_is_a_new_incarnation(
    tmp_path: Path,
) -> None:
    """The lower node id dialled; the other is killed a moment after the link came up
    and, restarted, dials back well within ``race_window``. Timing says "both dialled
    at once" (and keeps the lower id's, dead, connection); the boot id says "a new
    process": its connection wins at once and the link is reported as replaced, so the
    mesh withdraws the old incarnation's routes and sends the new one a full table.

    The new process dials from another port: on the old one it would answer the old
    connection's next packet (a PTO probe the kill left in flight) with a stateless
    reset, and whether that or its new connection reaches the lower node first is a
    race -- the reset-first order is the next two tests'."""
    net = FakeNetwork()
    lo, hi = _low_and_high(tmp_path)
    lo_host, hi_host = "10.0.0.1", "10.0.0.2"
    with trio.fail_after(30):
        async with bare_federation(tmp_path, net, lo, lo_host, RACE) as low:
            async with bare_federation(tmp_path, net, hi, hi_host, RACE) as high:
                assert await low.connect(hi_host, 4201) == high.node_id
                first: LinkEvent = await low.events.receive()
                assert (first.kind, first.replaced) == ("up", False)
                await high.wait_link(low.node_id)
                net.blackhole(net_addr(hi_host))  # dies silently: no CONNECTION_CLOSE
            net.blackhole(net_addr(hi_host), enabled=False)
            assert low.link_up(high.node_id)  # not noticed yet (slow pings)
            async with bare_federation(tmp_path, net, hi, hi_host, RACE, port=4202) as again:
                await again.connect(lo_host, 4201)
                with trio.fail_after(3):  # well before the old link could be found dead
                    ev: LinkEvent = await low.events.receive()
                    assert (ev.kind, ev.node_id, ev.replaced) == ("up", again.node_id, True)
                    assert await again.ping(low.node_id) > 0
                    assert await low.ping(again.node_id) > 0
                (info,) = low.links()
                assert not info.dialled_by_us  # the new incarnation's connection won
                assert low.statistics().link_ups == 1  # a new incarnation, not a new link
                assert low.endpoint is not None
                assert low.endpoint.statistics().resets_received == 0


async def test_a_restarted_peer_resets_the_old_connection_and_its_new_one_comes_up(
    tmp_path: Path,
) -> None:
    """Restarted on its old address, the peer answers the old connection's next
    packet with a stateless reset (its reset key comes from its persistent TLS key):
    the old link is down at once, not after ``dead_after``, and the new incarnation's
    connection is a fresh link."""
    net = FakeNetwork()
    lo, hi = _low_and_high(tmp_path)
    lo_host, hi_host = "10.0.0.1", "10.0.0.2"
    with trio.fail_after(30):
        async with bare_federation(tmp_path, net, lo, lo_host, RACE) as low:
            async with bare_federation(tmp_path, net, hi, hi_host, RACE) as high:
                assert await low.connect(hi_host, 4201) == high.node_id
                assert (await low.events.receive()).kind == "up"
                await high.wait_link(low.node_id)
                net.blackhole(net_addr(hi_host))  # dies silently: no CONNECTION_CLOSE
            net.blackhole(net_addr(hi_host), enabled=False)
            async with bare_federation(tmp_path, net, hi, hi_host, RACE) as again:
                with trio.fail_after(3):  # well before the old link could be found dead
                    # The ping's packet on the old connection (or a probe before it)
                    # reaches the new process, which resets it.
                    with contextlib.suppress(QpcError):
                        await low.ping(again.node_id)
                    down: LinkEvent = await low.events.receive()
                    assert (down.kind, down.node_id) == ("down", again.node_id)
                    assert "stateless reset" in down.reason
                    assert not low.link_up(again.node_id)
                    await again.connect(lo_host, 4201)
                    up: LinkEvent = await low.events.receive()
                    assert (up.kind, up.node_id, up.replaced) == ("up", again.node_id, False)
                    assert await again.ping(low.node_id) > 0
                    assert await low.ping(again.node_id) > 0
                (info,) = low.links()
                assert not info.dialled_by_us
                st = low.statistics()
                assert (st.link_ups, st.link_downs) == (2, 1)


async def test_a_restart_on_the_old_address_is_news_to_routing_in_either_order(
    tmp_path: Path,
) -> None:
    """What the product promises when a peer restarts on its old address and dials
    back: its stateless reset of the old connection and its new connection race (the
    reset answers a packet the old connection happened to have in flight), so the
    lower node reports either ``up`` *replaced* (new connection first) or ``down``
    then a fresh ``up`` (reset first). Either way routing drops what it learnt from
    the old incarnation and sends the new one a full table, at once."""
    net = FakeNetwork()
    lo, hi = _low_and_high(tmp_path)
    lo_host, hi_host = "10.0.0.1", "10.0.0.2"
    with trio.fail_after(30):
        async with bare_federation(tmp_path, net, lo, lo_host, RACE) as low:
            async with bare_federation(tmp_path, net, hi, hi_host, RACE) as high:
                assert await low.connect(hi_host, 4201) == high.node_id
                assert (await low.events.receive()).kind == "up"
                await high.wait_link(low.node_id)
                net.blackhole(net_addr(hi_host))  # dies silently: no CONNECTION_CLOSE
            net.blackhole(net_addr(hi_host), enabled=False)
            async with bare_federation(tmp_path, net, hi, hi_host, RACE) as again:
                await again.connect(lo_host, 4201)
                with trio.fail_after(3):  # well before the old link could be found dead
                    seen = [await low.events.receive()]
                    if seen[0].kind == "down":
                        seen.append(await low.events.receive())
                    assert [(e.kind, e.replaced) for e in seen] in (
                        [("up", True)],
                        [("down", False), ("up", False)],
                    )
                    assert {e.node_id for e in seen} == {again.node_id}
                    assert await again.ping(low.node_id) > 0
                    assert await low.ping(again.node_id) > 0
                (info,) = low.links()
                assert not info.dialled_by_us
                st = low.statistics()
                # Each incarnation announced once: a fresh up, or a replacing one.
                assert st.link_ups + st.restarts == 2
                assert st.link_ups - st.link_downs == 1


async def test_a_second_dial_of_the_same_process_is_no_restart(tmp_path: Path) -> None:
    """Same boot id on both connections (one process dialled twice within the window):
    the simultaneous-dial rule keeps one and nothing is reported as replaced."""
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "b") as b:
            await a.fed.connect("127.0.0.1", b.info.port)
            await b.fed.connect("127.0.0.1", a.info.port)
            await until(lambda: fed_connections(a.fed) == 1 and fed_connections(b.fed) == 1)
            (la,), (lb,) = a.fed.links(), b.fed.links()
            assert la.dialled_by_us == (a.node_id < b.node_id) != lb.dialled_by_us
            ups = []
            while True:
                try:
                    ups.append(a.fed.events.receive_nowait())
                except trio.WouldBlock:
                    break
            assert [(e.kind, e.replaced) for e in ups] == [("up", False)]
