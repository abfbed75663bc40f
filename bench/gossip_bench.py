"""Broadcast and store-and-forward on a simulated mesh: ours, flooding and gossipsub-like.

Everything runs in `qpc_sim` (a discrete-event simulator on a virtual clock; the cores are
the real sans-IO cores behind `qpc_node/storefwd/core.py`'s GossipCore seam, the baselines
implement the same seam). One seed per scenario, so every protocol meets the same graph,
origins, latencies and per-link loss draws. Links: latency U(5, 20) ms + size over 1 Mbit/s,
Bernoulli loss per frame per link. Links are point-to-point (QUIC between routers), so
flooding costs (degree - 1) payload frames per node, not one radio broadcast.

Columns: deliv = delivered (message, node) pairs / all (origin excluded), final and within
1 s / 5 s of publishing; dups = duplicate payload receptions per delivery; tx/(n-1) =
payload frames sent per broadcast over n - 1; ctrlB = control bytes per broadcast;
cov50/cov99 = time until the last node has it (inf: some message never reached all);
lat50 = per-delivery latency p50; heal = heal-to-converge (last delivery after the heal);
syncB = reconciliation bytes (set reconciliation + pushed payloads); bySync = deliveries
that reconciliation handed a node; stretch = hops the first copy travelled / shortest path
(a copy that reconciliation re-injected restarts its hop count). The RGG rows run the node's anti-entropy as designed
(every 60 s with one random neighbour, and on link-up) and 125 s past the last publish,
so "deliv" is the system's final delivery and "@5s" shows what the core did on its own.

Run: .venv/bin/python bench/gossip_bench.py [--quick] [--seed N]
The last line summarises 50 nodes at 30 % loss (ours against flooding in the same run).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qpc_node.storefwd.plumtree import PlumtreePolicy
from qpc_sim.dm import DmScenario, run_dm
from qpc_sim.net import FullListReconciler, Reconciler
from qpc_sim.protocols import all_protocols
from qpc_sim.reconcile import NegentropyReconciler, full_list_bytes, negentropy_class
from qpc_sim.scenarios import (
    Partition,
    Result,
    Scenario,
    bfs_half,
    random_flaps,
    run,
)
from qpc_sim.topology import line, random_geometric, two_clusters

EVENTS = 0
WALL = 0.0
SYNC_PERIOD = 60.0
"""The node's syncer: every 60 s with one random neighbour (and on every link-up)."""
PREVIOUS: dict[str, Any] = {
    "directed": False,
    "flood_hops_lossy": 1,
    "ack_delay": 0.02,
    "rto_factor": 2.0,
    "initial_rtt": 0.1,
}
"""The core's policy before the path-length work (symmetric PRUNE, no lossy flooding,
batched ACKs, slower first RTO): shown side by side as `ours-prev`."""
SYNC_DRAIN = 125.0
"""Run this long after the last publish, so every node has reconciled at least once after it."""


def fmt_t(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if math.isnan(x):
        return "nan"
    return f"{x:.3f}"


HEADER = (
    f"{'scenario':<16} {'loss':>4} {'protocol':<10} {'deliv':>7} {'@1s':>6} {'@5s':>6} "
    f"{'dups':>5} {'tx/(n-1)':>8} {'ctrlB':>7} {'cov50':>6} {'cov99':>6} {'lat50':>6} "
    f"{'heal':>6} {'syncB':>8} {'bySync':>6} {'stretch':>7} {'wall':>5}"
)


def row(sc: Scenario, r: Result) -> str:
    return (
        f"{sc.name:<16} {sc.loss:>4.0%} {r.protocol:<10} {r.delivery:>7.4f} {r.delivery_1s:>6.3f} "
        f"{r.delivery_5s:>6.3f} {r.dups_per_delivery:>5.2f} {r.tx_ratio:>8.2f} "
        f"{r.control_bytes_per_msg:>7.0f} {fmt_t(r.coverage_p50):>6} {fmt_t(r.coverage_p99):>6} "
        f"{fmt_t(r.latency_p50):>6} {fmt_t(r.heal_to_converge):>6} {r.sync_bytes:>8} "
        f"{r.sync_deliveries:>6} {r.stretch:>7.2f} {r.wall:>5.1f}"
    )


def reconciler() -> Reconciler:
    """The real negentropy when the extension has it, else the full id list."""
    return NegentropyReconciler() if negentropy_class() is not None else FullListReconciler()


def show(
    sc: Scenario, seed: int, policy: object = None, only: str | None = None, label: str = ""
) -> list[Result]:
    global EVENTS, WALL
    protocols = all_protocols(seed, policy)
    if only is not None:
        protocols = {label or only: protocols[only]}
    results = run(sc, protocols, seed, reconciler())
    for r in results:
        print(row(sc, r), flush=True)
        EVENTS += r.events
        WALL += r.wall
        if r.double_deliveries:
            print(f"  !! {r.protocol}: {r.double_deliveries} double deliveries")
        if r.truncated:
            print(f"  !! {r.protocol}: run truncated by its event/wall bound")
    return results


def frames_profile(results: list[Result]) -> None:
    for r in results:
        kinds = ", ".join(f"{k} {v[0]}/{v[1]}B" for k, v in sorted(r.frame_kinds.items()))
        print(f"  frames {r.protocol}: {kinds}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--quick", action="store_true", help="fewer messages, no 1000-node row")
    args = ap.parse_args()
    seed = args.seed
    t_start = time.monotonic()
    print(f"reconciliation in the scenarios: {reconciler().name}")
    print(HEADER)
    summary: dict[str, Result] = {}
    sizes = (50, 200) if args.quick else (50, 200, 1000)
    msgs = {50: 60 if args.quick else 100, 200: 20 if args.quick else 30, 1000: 8}
    for n in sizes:
        g = random_geometric(n, 8.0, random.Random(seed * 1000 + n))
        for loss in (0.0, 0.1, 0.3):
            sc = Scenario(
                f"rgg{n}(d{g.mean_degree:.1f})",
                g,
                loss,
                msgs[n],
                interval=0.25,
                periodic_sync=SYNC_PERIOD,
                drain=SYNC_DRAIN,
            )
            res = show(sc, seed)
            if n == 50 and loss == 0.3:
                summary = {r.protocol: r for r in res}
                frames_profile(res)
    system: dict[str, Any] = {"periodic_sync": SYNC_PERIOD, "drain": SYNC_DRAIN}
    # Public policy knobs of our core, same 50-node graph and seed as above: the
    # previous policy, and flooding two hops out always (not only while lossy).
    g = random_geometric(50, 8.0, random.Random(seed * 1000 + 50))
    variants = {
        "ours-prev": msgspec.structs.replace(PlumtreePolicy(), **PREVIOUS),
        "ours-fh2": msgspec.structs.replace(PlumtreePolicy(), flood_hops=2),
    }
    for loss in (0.0, 0.3):
        for name, pol in variants.items():
            sc = Scenario(
                f"rgg50(d{g.mean_degree:.1f})", g, loss, msgs[50], interval=0.25, **system
            )
            show(sc, seed, pol, only="ours", label=name)
    print(f"  ours-prev = PlumtreePolicy defaults with {PREVIOUS}")
    print("  ours-fh2 = PlumtreePolicy defaults with flood_hops=2")
    # Sensitivity: one transmitter per node (its sends share the airtime) instead of
    # independent links; not used for the last line.
    g = random_geometric(50, 8.0, random.Random(seed * 1000 + 50))
    for loss in (0.0, 0.3):
        sc = Scenario("rgg50-radio", g, loss, msgs[50], interval=0.25, shared_radio=True, **system)
        show(sc, seed)
    # A line: every edge a bridge, 19 hops end to end.
    sc = Scenario("line20", line(20), 0.3, 20 if args.quick else 30, interval=0.25, **system)
    show(sc, seed)
    g, bridge = two_clusters(25, 8.0, random.Random(seed + 7))
    sc = Scenario("bridge50", g, 0.3, 30, interval=0.25, **system)
    show(sc, seed)
    # Flaps: a fifth of the links each go down for 3 s once while messages flow.
    g = random_geometric(50, 8.0, random.Random(seed * 1000 + 50))
    flaps = random_flaps(g, random.Random(seed + 11), 1.0, 9.0, 0.2, 3.0)
    sc = Scenario("rgg50-flaps", g, 0.1, 40, interval=0.25, flaps=flaps, **system)
    show(sc, seed)
    # Partitions while both halves publish, then a heal (a reconciliation on each link-up).
    g, bridge = two_clusters(25, 8.0, random.Random(seed + 7))
    part = Partition((bridge,), 1.0, 11.0, frozenset(range(25)))
    sc = Scenario("bridge50-cut10s", g, 0.1, 40, interval=0.25, partition=part, **system)
    show(sc, seed)
    g = random_geometric(200, 8.0, random.Random(seed * 1000 + 200))
    side, cut = bfs_half(g, random.Random(seed + 5))
    part = Partition(cut, 1.0, 11.0, side)
    sc = Scenario(
        f"rgg200-half({len(cut)}cut)", g, 0.1, 40, interval=0.25, partition=part, **system
    )
    show(sc, seed)

    print()
    print("50 nodes, 30 % loss, other seeds (graph, origins and losses all change with it):")
    for s2 in (11, 12, 14, 15) if not args.quick else (11,):
        g = random_geometric(50, 8.0, random.Random(s2 * 1000 + 50))
        sc = Scenario("rgg50", g, 0.3, msgs[50], interval=0.25, **system)
        res = {r.protocol: r for r in run(sc, all_protocols(s2), s2, reconciler())}
        fl, mine = res["flooding"], res.get("ours")
        if mine is None:
            continue
        print(
            f"  seed {s2}: delivery={mine.delivery:.4f} dups={mine.dups_per_delivery:.2f} "
            f"tx_ratio={mine.tx_ratio / fl.tx_ratio:.2f} "
            f"p50_ratio={mine.latency_p50 / fl.latency_p50:.2f}"
        )

    print()
    print("DMs (hop-by-hop custody, ack + retransmit, hold without a route):")
    print(
        f"{'scenario':<22} {'loss':>4} {'sent':>5} {'deliv':>6} {'in-time':>7} {'p50':>6} "
        f"{'p99':>6} {'tx/DM':>6} {'retx':>5} {'late':>4} {'dup':>3} {'expired':>7} {'wall':>5}"
    )
    dm_cases = []
    g50 = random_geometric(50, 8.0, random.Random(seed * 1000 + 50))
    g200 = random_geometric(200, 8.0, random.Random(seed * 1000 + 200))
    for loss in (0.0, 0.1, 0.3):
        dm_cases.append(DmScenario("dm-rgg50", g50, loss, 200))
    dm_cases.append(DmScenario("dm-rgg200", g200, 0.3, 200))
    gb, bridge = two_clusters(25, 8.0, random.Random(seed + 7))
    part = Partition((bridge,), 1.0, 21.0, frozenset(range(25)))
    dm_cases.append(
        DmScenario("dm-bridge50-cut20s", gb, 0.1, 100, partition=part, short_expiry=10.0)
    )
    dm_cases.append(
        DmScenario("dm-bridge50-cut20s", gb, 0.3, 100, partition=part, short_expiry=10.0)
    )
    global EVENTS, WALL
    for dsc in dm_cases:
        d = run_dm(dsc, seed)
        EVENTS += d.events
        WALL += d.wall
        print(
            f"{dsc.name:<22} {dsc.loss:>4.0%} {d.sent:>5} {d.delivered / d.sent:>6.3f} "
            f"{d.delivered_in_time:>7.4f} {fmt_t(d.delay_p50):>6} {fmt_t(d.delay_p99):>6} "
            f"{d.tx_per_dm:>6.2f} {d.retransmissions:>5} {d.after_expiry:>4} "
            f"{d.double_deliveries:>3} {d.expired_undelivered:>7} {d.wall:>5.1f}"
        )
    print("  in-time = delivered before expiry / DMs whose expiry is after the heal;")
    print("  late = delivered after expiry (must be 0); expired = never delivered, expired")

    print()
    print("Sync bytes vs difference size (sets of 10,000 ids; one side lacks d of them):")
    if negentropy_class() is None:
        print("  MISSING: qpc_node._core.Negentropy is not in this build; full-list figures only")
    rng = random.Random(seed)
    base = [rng.randbytes(16) for _ in range(10_000)]
    t0 = 1_700_000_000_000
    print(
        f"  {'d':>5} {'pattern':<9} {'negentropy B':>12} {'rounds':>6} {'found':>5} {'full list B':>11}"
    )
    for d in (0, 10, 100, 1000):
        for pattern in ("newest", "scattered"):
            if d == 0 and pattern == "scattered":
                continue
            full_set = [(t0 + k * 1000, i) for k, i in enumerate(base)]
            if pattern == "newest":  # the other side missed the last d (a partition)
                ours, theirs = full_set[: len(full_set) - d], full_set
            else:  # d random ids missing (losses spread over time)
                gone = set(rng.sample(range(len(full_set)), d))
                ours = [x for k, x in enumerate(full_set) if k not in gone]
                theirs = full_set
            full = full_list_bytes([i for _, i in ours], [i for _, i in theirs])
            if negentropy_class() is not None:
                nbytes, rounds, need, _ = NegentropyReconciler().session(ours, theirs)
                ok = "yes" if len(need) == d else f"{len(need)}!"
                print(f"  {d:>5} {pattern:<9} {nbytes:>12} {rounds:>6} {ok:>5} {full:>11}")
            else:
                print(f"  {d:>5} {pattern:<9} {'-':>12} {'-':>6} {'-':>5} {full:>11}")
    print("  ids: 16-byte msg ids padded with 16 zero bytes to negentropy's 32; bytes = both ways")

    print()
    total = time.monotonic() - t_start
    print(
        f"simulator: {EVENTS} events in {WALL:.1f} s of core+sim time "
        f"({EVENTS / WALL if WALL else 0:.0f} events/s); whole bench {total:.1f} s"
    )
    print(
        "disk: bytes written per held 1 KiB envelope on a real node's store: "
        "bench/held_io_bench.py (not simulated here)"
    )
    flood = summary.get("flooding")
    mine = summary.get("ours")
    if flood is None or mine is None:
        print(
            "delivery=nan dups_per_delivery=nan tx_ratio_vs_flooding=nan p50_ratio_vs_flooding=nan"
        )
        return
    print(
        f"cov50 ratio vs flooding (time to full coverage): "
        f"{mine.coverage_p50 / flood.coverage_p50:.2f}"
    )
    print(
        f"delivery={mine.delivery:.4f} dups_per_delivery={mine.dups_per_delivery:.2f} "
        f"tx_ratio_vs_flooding={mine.tx_ratio / flood.tx_ratio:.2f} "
        f"p50_ratio_vs_flooding={mine.latency_p50 / flood.latency_p50:.2f}"
    )


if __name__ == "__main__":
    main()
