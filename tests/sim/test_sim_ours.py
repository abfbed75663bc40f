"""Our Plumtree core in the simulator, against flooding on the same seed and losses.

What must hold whatever the timers: every node delivers a message at most once; at 30 %
per-link loss the system (core + the node's periodic anti-entropy) delivers >= 99.9 % and
the core alone does nearly all of it; fewer payload transmissions than flooding; a
partition while both halves publish converges after the heal.
"""

from __future__ import annotations

import random

import pytest

from qpc_sim.flooding import Flooding
from qpc_sim.protocols import ours
from qpc_sim.scenarios import Partition, Scenario, run
from qpc_sim.topology import random_geometric, two_clusters

SEED = 11


def both() -> dict[str, object]:
    return {"flooding": lambda i, peer: Flooding(peer), "ours": ours(SEED)}


@pytest.mark.parametrize("loss", [0.0, 0.1, 0.3])
def test_ours_delivers_exactly_once_with_fewer_transmissions_than_flooding(loss: float) -> None:
    g = random_geometric(50, 8.0, random.Random(SEED))
    sc = Scenario("rgg50", g, loss, 30, interval=0.25, periodic_sync=60.0, drain=125.0)
    flood, mine = run(sc, both(), SEED)
    assert mine.double_deliveries == 0
    assert mine.delivery >= 0.999
    # The core itself repairs the losses: anti-entropy hands over at most a few pairs.
    assert mine.sync_deliveries <= 0.005 * mine.messages * (mine.n - 1)
    assert mine.tx_ratio < flood.tx_ratio
    assert mine.dups_per_delivery < flood.dups_per_delivery
    if loss == 0.0:
        assert mine.delivery_1s == 1.0


def test_ours_partition_while_both_halves_publish_converges_after_the_heal() -> None:
    g, bridge = two_clusters(20, 8.0, random.Random(SEED))
    part = Partition((bridge,), 1.0, 6.0, frozenset(range(20)))
    sc = Scenario("cut", g, 0.1, 16, interval=0.25, partition=part, drain=10.0)
    (mine,) = run(sc, {"ours": ours(SEED)}, SEED)
    assert mine.delivery == 1.0
    assert mine.delivery_1s < 0.8  # really cut
    assert mine.heal_to_converge is not None and mine.heal_to_converge < 5.0
    assert mine.double_deliveries == 0


def test_ours_is_reproducible_from_the_seed() -> None:
    g = random_geometric(50, 8.0, random.Random(SEED))
    sc = Scenario("rgg50", g, 0.3, 10, interval=0.25, drain=10.0)
    a = run(sc, {"ours": ours(SEED)}, SEED)[0]
    b = run(sc, {"ours": ours(SEED)}, SEED)[0]
    assert (a.delivery, a.dups_per_delivery, a.tx_ratio, a.latency_p50, a.frame_kinds) == (
        b.delivery,
        b.dups_per_delivery,
        b.tx_ratio,
        b.latency_p50,
        b.frame_kinds,
    )


def test_ours_announces_what_it_held_across_a_healed_bridge_until_the_peer_has_it() -> None:
    """A long cut and no reconciliation: what was published before the heal is older than
    the re-announce window, so only the link-up announcement carries it over the bridge.
    That announcement is repeated until the other side is known to hold each id (one lost
    IHAVE frame used to strand those messages on their side for good)."""
    g, bridge = two_clusters(20, 8.0, random.Random(SEED))
    part = Partition((bridge,), 1.0, 11.0, frozenset(range(20)))
    sc = Scenario("cut10", g, 0.1, 16, interval=0.25, partition=part, drain=20.0, sync_on_up=False)
    (mine,) = run(sc, {"ours": ours(SEED)}, SEED)
    assert mine.sync_deliveries == 0  # the core alone
    assert mine.delivery == 1.0, mine.missing
    assert mine.double_deliveries == 0
