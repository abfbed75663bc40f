"""Scenarios and their metrics: one graph, one workload, every protocol on the same seed.

A scenario publishes `messages` broadcasts from random origins, one every `interval`
seconds after a warm-up, optionally cuts a set of links (a partition, while both sides
keep publishing) and heals it, optionally flaps links, then runs until `drain` seconds
after the last event. Each protocol gets a fresh `Sim` with the same seed, so the same
graph, origins, link latencies and loss draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qpc_sim.net import LinkParams, Reconciler, Sim, seeded
from qpc_sim.topology import Graph, bfs_distances

CoreFactory = Callable[[int, bytes], Any]
"""(node index, node id) -> a GossipCore."""


@dataclass(frozen=True, slots=True)
class Partition:
    """Cut `edges` at `cut`, heal them at `heal` (a reconciliation runs on each link-up)."""

    edges: tuple[tuple[int, int], ...]
    cut: float
    heal: float
    side_a: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    graph: Graph
    loss: float
    messages: int
    interval: float = 0.2
    payload_size: int = 512
    warmup: float = 1.0
    drain: float = 20.0
    partition: Partition | None = None
    flaps: tuple[tuple[float, int, int, bool], ...] = ()
    periodic_sync: float | None = None
    sync_on_up: bool = True
    origins: tuple[int, ...] | None = None
    """Fixed origins (cycled); default: uniformly random nodes."""
    shared_radio: bool = False
    """See `LinkParams.shared_radio`."""


@dataclass(slots=True)
class Result:
    scenario: str
    protocol: str
    n: int
    messages: int
    delivery: float
    delivery_1s: float
    delivery_5s: float
    dups_per_delivery: float
    tx_ratio: float
    control_bytes_per_msg: float
    coverage_p50: float
    coverage_p99: float
    latency_p50: float
    heal_to_converge: float | None
    """Seconds from the heal to the last delivery (converged only if delivery == 1)."""
    sync_bytes: int
    double_deliveries: int
    events: int
    wall: float
    truncated: bool
    frame_kinds: dict[str, list[int]] = field(default_factory=dict)
    missing: int = 0
    """(message, node) pairs never delivered."""
    sync_deliveries: int = 0
    """Deliveries that reconciliation handed a node (not its core's own repair)."""
    stretch: float = 0.0
    """Mean hops the first copy travelled over the shortest path's (deliveries over links)."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for an empty list."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def msg_id_for(seed: int, k: int) -> bytes:
    return seeded(seed, "msg", k).randbytes(16)


def build(
    scenario: Scenario, make_core: CoreFactory, seed: int, reconciler: Reconciler | None = None
) -> Sim:
    """A Sim with the scenario's workload, partition and flaps scheduled (not yet run)."""
    params = LinkParams(loss=scenario.loss, shared_radio=scenario.shared_radio)
    sim = Sim(scenario.graph, make_core, params, seed, reconciler)
    rng = seeded(seed, "workload")
    payload = bytes(scenario.payload_size)
    n = scenario.graph.n
    part = scenario.partition
    for k in range(scenario.messages):
        t = scenario.warmup + k * scenario.interval
        if scenario.origins:
            origin = scenario.origins[k % len(scenario.origins)]
        elif part is not None and part.side_a and part.cut <= t < part.heal:
            # Both halves publish while cut: alternate sides.
            side = (
                sorted(part.side_a) if k % 2 == 0 else [i for i in range(n) if i not in part.side_a]
            )
            origin = side[rng.randrange(len(side))]
        else:
            origin = rng.randrange(n)
        sim.publish_at(t, origin, msg_id_for(seed, k), payload)
    if part is not None:
        for u, v in part.edges:
            sim.set_link(part.cut, u, v, up=False)
            sim.set_link(part.heal, u, v, up=True, sync=scenario.sync_on_up)
    for t, u, v, up in scenario.flaps:
        sim.set_link(t, u, v, up=up, sync=up and scenario.sync_on_up)
    end = end_time(scenario)
    if scenario.periodic_sync:
        sim.periodic_sync(scenario.warmup, end, scenario.periodic_sync)
    return sim


def end_time(scenario: Scenario) -> float:
    last = scenario.warmup + max(0, scenario.messages - 1) * scenario.interval
    if scenario.partition is not None:
        last = max(last, scenario.partition.heal)
    if scenario.flaps:
        last = max(last, max(t for t, *_ in scenario.flaps))
    return last + scenario.drain


def measure(scenario: Scenario, protocol: str, sim: Sim) -> Result:
    n = scenario.graph.n
    c = sim.counters
    m = len(sim.published)
    pairs = m * (n - 1)
    got = got1 = got5 = 0
    lat: list[float] = []
    cov: list[float] = []
    last_delivery = 0.0
    adj = sim.adj
    hops_sum = bfs_sum = 0
    for msg_id, (t0, origin) in sim.published.items():
        dist = bfs_distances(adj, origin)
        latest = 0.0
        count = 0
        for i in range(n):
            if i == origin:
                continue
            t = sim.delivered[i].get(msg_id)
            if t is None:
                continue
            d = t - t0
            count += 1
            h = sim.hops[i].get(msg_id, 0)
            if h > 0 and dist[i] > 0:
                hops_sum += h
                bfs_sum += dist[i]
            lat.append(d)
            got1 += d <= 1.0
            got5 += d <= 5.0
            latest = max(latest, d)
            last_delivery = max(last_delivery, t)
        got += count
        cov.append(latest if count == n - 1 else math.inf)
    link_deliveries = c.link_deliveries
    dups = (c.payload_arrivals - link_deliveries) / c.deliveries if c.deliveries else 0.0
    heal = None
    if scenario.partition is not None:
        # Last delivery after the heal; read it with `delivery` (below 1: not converged).
        heal = max(0.0, last_delivery - scenario.partition.heal)
    return Result(
        scenario=scenario.name,
        protocol=protocol,
        n=n,
        messages=m,
        delivery=got / pairs if pairs else 1.0,
        delivery_1s=got1 / pairs if pairs else 1.0,
        delivery_5s=got5 / pairs if pairs else 1.0,
        dups_per_delivery=dups,
        tx_ratio=c.payload_frames / m / (n - 1) if m else 0.0,
        control_bytes_per_msg=c.control_bytes / m if m else 0.0,
        coverage_p50=percentile(cov, 50),
        coverage_p99=percentile(cov, 99),
        latency_p50=percentile(lat, 50),
        heal_to_converge=heal,
        sync_bytes=c.sync_recon_bytes + c.sync_payload_bytes,
        double_deliveries=c.double_deliveries,
        events=c.events,
        wall=sim.wall_seconds,
        truncated=sim.truncated,
        frame_kinds=dict(c.frame_kinds),
        missing=pairs - got,
        sync_deliveries=c.sync_deliveries,
        stretch=hops_sum / bfs_sum if bfs_sum else math.nan,
    )


def run(
    scenario: Scenario,
    protocols: dict[str, CoreFactory],
    seed: int,
    reconciler: Reconciler | None = None,
) -> list[Result]:
    """Every protocol through the same scenario and seed; results in `protocols` order."""
    out = []
    for name, factory in protocols.items():
        sim = build(scenario, factory, seed, reconciler)
        sim.run(end_time(scenario))
        out.append(measure(scenario, name, sim))
    return out


def bfs_half(
    graph: Graph, rng: random.Random
) -> tuple[frozenset[int], tuple[tuple[int, int], ...]]:
    """A connected half of the graph (a BFS prefix from a random node) and the edges cut."""
    adj = graph.adjacency()
    start = rng.randrange(graph.n)
    order = [start]
    seen = {start}
    k = 0
    while k < len(order) and len(order) < graph.n // 2:
        for v in adj[order[k]]:
            if v not in seen and len(order) < graph.n // 2:
                seen.add(v)
                order.append(v)
        k += 1
    side = frozenset(order)
    cut = tuple(e for e in graph.edges if (e[0] in side) != (e[1] in side))
    return side, cut


def random_flaps(
    graph: Graph, rng: random.Random, start: float, end: float, share: float, down: float
) -> tuple[tuple[float, int, int, bool], ...]:
    """A `share` of the links each go down once for `down` seconds at a random time."""
    edges = list(graph.edges)
    rng.shuffle(edges)
    out: list[tuple[float, int, int, bool]] = []
    for u, v in edges[: int(len(edges) * share)]:
        t = rng.uniform(start, max(start, end - down))
        out.append((t, u, v, False))
        out.append((t + down, u, v, True))
    return tuple(sorted(out))
