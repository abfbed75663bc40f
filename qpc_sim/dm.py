"""DM scenarios: envelopes between random pairs, over the same lossy, flapping links."""

from __future__ import annotations

from dataclasses import dataclass

from qpc_sim.net import LinkParams, Sim, seeded
from qpc_sim.scenarios import Partition, percentile
from qpc_sim.topology import Graph
from qpc_sim.unicast import Custody, DmResult, Routes


@dataclass(frozen=True, slots=True)
class DmScenario:
    name: str
    graph: Graph
    loss: float
    dms: int
    interval: float = 0.1
    expiry: float = 120.0
    short_expiry: float | None = None
    """Every other DM sent during the cut gets this (shorter) expiry: those must never arrive."""
    payload_size: int = 1024
    warmup: float = 0.5
    drain: float = 30.0
    partition: Partition | None = None


def run_dm(sc: DmScenario, seed: int) -> DmResult:
    holder: list[Routes] = []

    def make(i: int, _peer: bytes) -> Custody:
        return Custody(i, lambda me, dst: holder[0](me, dst))

    sim = Sim(sc.graph, make, LinkParams(loss=sc.loss), seed)
    routes = Routes(sim.adj, sim.is_up)
    holder.append(routes)
    sim.topology_hooks.append(routes.changed)
    rng = seeded(seed, "dm-workload")
    n = sc.graph.n
    part = sc.partition
    plan: dict[bytes, tuple[float, int, int, float]] = {}
    payload = bytes(sc.payload_size)
    for k in range(sc.dms):
        t = sc.warmup + k * sc.interval
        expiry = sc.expiry
        if part is not None and part.side_a and part.cut <= t < part.heal:
            a = sorted(part.side_a)
            b = [i for i in range(n) if i not in part.side_a]
            src, dst = (a[rng.randrange(len(a))], b[rng.randrange(len(b))])
            if k % 2:
                src, dst = dst, src
            if sc.short_expiry is not None and k % 4 < 2:
                expiry = sc.short_expiry
        else:
            src = rng.randrange(n)
            dst = rng.randrange(n - 1)
            dst += dst >= src
        dm_id = seeded(seed, "dm", k).randbytes(16)
        plan[dm_id] = (t, src, dst, t + expiry)
        core = sim.cores[src]
        assert isinstance(core, Custody)
        sim.call(t, src, core.send_dm, dm_id, dst, t + expiry, payload)
    if part is not None:
        for u, v in part.edges:
            sim.set_link(part.cut, u, v, up=False)
            sim.set_link(part.heal, u, v, up=True)
    last = sc.warmup + sc.dms * sc.interval
    if part is not None:
        last = max(last, part.heal)
    sim.run(last + sc.drain)
    delivered = after = expired_undelivered = 0
    delays: list[float] = []
    eligible = in_time = 0
    for dm_id, (t0, _src, dst, expiry) in plan.items():
        td = sim.delivered[dst].get(dm_id)
        if td is not None:
            delivered += 1
            delays.append(td - t0)
            after += td > expiry
        elif expiry <= sim.now:
            expired_undelivered += 1
        if part is None or expiry > part.heal:
            eligible += 1
            in_time += td is not None and td <= expiry
    stats = [c.stats for c in sim.cores if isinstance(c, Custody)]
    return DmResult(
        scenario=sc.name,
        sent=sc.dms,
        delivered=delivered,
        delivered_in_time=in_time / eligible if eligible else 1.0,
        delay_p50=percentile(delays, 50),
        delay_p99=percentile(delays, 99),
        tx_per_dm=sim.counters.payload_frames / sc.dms,
        double_deliveries=sim.counters.double_deliveries,
        after_expiry=after,
        expired_undelivered=expired_undelivered,
        retransmissions=sum(s.retransmissions for s in stats),
        peak_held=max(s.peak_held for s in stats),
        events=sim.counters.events,
        wall=sim.wall_seconds,
    )
