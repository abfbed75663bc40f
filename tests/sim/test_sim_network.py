"""The simulator itself and the baselines: invariants that must hold whatever the protocol.

Seeded and bounded (tens of nodes, tens of messages, virtual time only).
"""

from __future__ import annotations

import random

import pytest

from qpc_sim.dm import DmScenario, run_dm
from qpc_sim.flooding import Flooding
from qpc_sim.gossipsub import Gossipsub
from qpc_sim.net import LinkParams, Sim
from qpc_sim.scenarios import Partition, Scenario, build, end_time, measure, run
from qpc_sim.topology import components, line, random_geometric, two_clusters

SEED = 5


def baselines() -> dict[str, object]:
    return {
        "flooding": lambda i, peer: Flooding(peer),
        "gossipsub": lambda i, peer: Gossipsub(peer, seed=SEED),
    }


def test_random_geometric_graph_is_connected_with_the_mean_degree_asked() -> None:
    for n in (50, 200):
        g = random_geometric(n, 8.0, random.Random(n))
        assert len(components(g.n, g.edges)) == 1
        assert 7.5 <= g.mean_degree <= 8.5
        assert all(u < v for u, v in g.edges)
        assert len(set(g.edges)) == len(g.edges)


def test_two_clusters_are_joined_by_exactly_the_bridge() -> None:
    g, bridge = two_clusters(20, 8.0, random.Random(1))
    without = tuple(e for e in g.edges if e != bridge)
    assert len(components(g.n, g.edges)) == 1
    assert sorted(len(c) for c in components(g.n, without)) == [20, 20]


def test_flooding_without_loss_sends_exactly_one_frame_per_edge_direction_but_one() -> None:
    # Each node forwards to every neighbour except its source; the origin to all: 2E - n + 1.
    g = random_geometric(50, 8.0, random.Random(SEED))
    sc = Scenario("rgg50", g, 0.0, 10)
    sim = build(sc, lambda i, peer: Flooding(peer), SEED)
    sim.run(end_time(sc))
    r = measure(sc, "flooding", sim)
    assert r.delivery == 1.0
    assert sim.counters.payload_frames == 10 * (2 * len(g.edges) - g.n + 1)
    assert r.double_deliveries == 0


def test_loss_is_per_frame_at_the_rate_asked_and_the_same_for_the_same_seed() -> None:
    g = random_geometric(50, 8.0, random.Random(SEED))
    sc = Scenario("rgg50", g, 0.3, 20)
    sims = []
    for _ in range(2):
        sim = build(sc, lambda i, peer: Flooding(peer), SEED)
        sim.run(end_time(sc))
        sims.append(sim)
    a, b = (s.counters for s in sims)
    assert a.frames_lost == b.frames_lost and a.payload_arrivals == b.payload_arrivals
    assert sims[0].delivered == sims[1].delivered
    rate = a.frames_lost / (a.payload_frames + a.control_frames)
    assert 0.27 < rate < 0.33


def test_a_link_keeps_its_loss_draws_whatever_else_is_sent() -> None:
    # The k-th frame on a link direction meets the same fate under any protocol: the draw
    # comes from that direction's own RNG, seeded by (seed, link, direction) only.
    g = line(3)
    sims = [Sim(g, lambda i, peer: Flooding(peer), LinkParams(loss=0.5), SEED) for _ in range(2)]
    link_a = sims[0].links[(0, 1)]
    link_b = sims[1].links[(0, 1)]
    other = sims[1].links[(1, 2)]
    for _ in range(50):
        other.loss_rng[0].random()  # traffic elsewhere in the second run
    fates_a = [link_a.loss_rng[0].random() < 0.5 for _ in range(100)]
    fates_b = [link_b.loss_rng[0].random() < 0.5 for _ in range(100)]
    assert fates_a == fates_b


@pytest.mark.parametrize("loss", [0.0, 0.3])
def test_every_node_delivers_each_message_at_most_once(loss: float) -> None:
    g = random_geometric(50, 8.0, random.Random(SEED))
    for r in run(Scenario("rgg50", g, loss, 20), baselines(), SEED):
        assert r.double_deliveries == 0, r.protocol
        assert r.delivery <= 1.0


def test_gossipsub_sends_fewer_payload_frames_than_flooding_with_fewer_duplicates() -> None:
    g = random_geometric(50, 8.0, random.Random(SEED))
    flood, gs = run(Scenario("rgg50", g, 0.0, 20, warmup=2.0), baselines(), SEED)
    assert flood.delivery == gs.delivery == 1.0
    assert gs.tx_ratio < flood.tx_ratio
    assert gs.dups_per_delivery < flood.dups_per_delivery


def test_partition_heals_through_reconciliation_on_link_up() -> None:
    g, bridge = two_clusters(20, 8.0, random.Random(SEED))
    part = Partition((bridge,), 1.0, 6.0, frozenset(range(20)))
    sc = Scenario("cut", g, 0.0, 16, interval=0.25, partition=part, drain=10.0)
    for r in run(sc, baselines(), SEED):
        assert r.delivery == 1.0, r.protocol
        assert r.delivery_1s < 0.8  # the halves really were cut while publishing
        assert r.heal_to_converge is not None and r.heal_to_converge < 2.0
        assert r.sync_bytes > 0
        assert r.double_deliveries == 0


def test_without_reconciliation_a_flood_published_during_the_cut_never_crosses() -> None:
    g, bridge = two_clusters(20, 8.0, random.Random(SEED))
    part = Partition((bridge,), 1.0, 6.0, frozenset(range(20)))
    sc = Scenario("cut", g, 0.0, 16, interval=0.25, partition=part, drain=10.0, sync_on_up=False)
    (flood,) = run(sc, {"flooding": lambda i, peer: Flooding(peer)}, SEED)
    assert flood.delivery < 0.9
    assert flood.sync_bytes == 0


@pytest.mark.parametrize("loss", [0.0, 0.3])
def test_dms_are_delivered_exactly_once_at_loss(loss: float) -> None:
    g = random_geometric(50, 8.0, random.Random(SEED))
    r = run_dm(DmScenario("dm", g, loss, 60), SEED)
    assert r.delivered == r.sent
    assert r.double_deliveries == 0
    assert r.after_expiry == 0
    if loss:
        assert r.retransmissions > 0


def test_dms_across_a_partition_are_held_delivered_after_the_heal_and_never_after_expiry() -> None:
    g, bridge = two_clusters(20, 8.0, random.Random(SEED))
    part = Partition((bridge,), 1.0, 11.0, frozenset(range(20)))
    sc = DmScenario("dm-cut", g, 0.3, 60, partition=part, short_expiry=4.0)
    r = run_dm(sc, SEED)
    assert r.after_expiry == 0
    assert r.double_deliveries == 0
    assert r.delivered_in_time == 1.0  # every DM whose expiry outlived the cut arrived
    assert r.expired_undelivered > 0  # and the short-lived ones sent across did not
    assert r.peak_held > 0


def test_a_shared_radio_serialises_a_nodes_sends_and_links_do_not() -> None:
    # A star: the centre floods to 8 leaves at once. Per-link bandwidth: each leaf waits one
    # frame time; one radio: the last leaf waits for all 8 frames.
    from qpc_sim.topology import Graph

    star = Graph("star", 9, tuple((0, i) for i in range(1, 9)))
    last: dict[bool, float] = {}
    for shared in (False, True):
        sc = Scenario("star", star, 0.0, 1, payload_size=12_000, origins=(0,), shared_radio=shared)
        sim = build(sc, lambda i, peer: Flooding(peer), SEED)
        sim.run(end_time(sc))
        (msg,) = sim.published
        t0 = sim.published[msg][0]
        last[shared] = max(sim.delivered[i][msg] for i in range(1, 9)) - t0
    frame = (12_000 + 100) * 8 / 1_000_000  # about 0.1 s per frame at 1 Mbit/s
    assert last[False] < 2 * frame + 0.02
    assert last[True] >= 8 * frame
