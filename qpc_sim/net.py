"""The network: a virtual clock, lossy links with latency and bandwidth, flaps, partitions.

Every node runs one core behind the `GossipCore` seam (`qpc_node/storefwd/core.py`): the
simulator calls `link_up`/`link_down`/`publish`/`receive`/`tick` with the virtual `now`,
drains `poll()` after each call and turns each `Send` into frames on a link:

- a `Send` is one datagram: it waits for the link's direction to be free (size over
  bandwidth), then travels for a latency drawn from U(lo, hi);
- each frame in it is lost independently with the link's loss probability (Bernoulli, per
  frame per link), drawn from that direction's own RNG. The RNGs are seeded from (seed,
  link, direction) only, so the k-th frame on a link meets the same fate under every
  protocol compared with the same seed;
- a link that goes down drops what is in flight on it; both ends hear `link_down` at once.

Anti-entropy (the inventory sync the node runs on link-up and periodically) is modelled
outside the cores: the two ends' stores (what each node delivered, i.e. what its driver
stored) are compared, the reconciliation cost comes from a `Reconciler`, and what one side
lacks is handed to its core as `Push` frames from the other after the reconciliation's round
trips. Its bytes are accounted separately.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qpc_node.storefwd.core import Deliver, Frame, GossipCore, Push, Send
from qpc_sim.topology import Graph


def node_id(i: int) -> bytes:
    """The peer id of node i (what the cores see)."""
    return i.to_bytes(4, "big")


def node_index(peer: bytes) -> int:
    return int.from_bytes(peer, "big")


def seeded(seed: int, *parts: object) -> random.Random:
    """An RNG seeded from `seed` and `parts` only (stable across runs and protocols)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True, slots=True)
class LinkParams:
    latency_lo: float = 0.005
    latency_hi: float = 0.020
    bandwidth_bps: float = 1_000_000.0
    loss: float = 0.0
    overhead: int = 28
    """Bytes of header per datagram (UDP/IP), counted in the serialisation time only."""
    shared_radio: bool = False
    """Serialise a node's sends on one transmitter (one radio's airtime shared by all its
    links) instead of per link direction: closer to routers on one Wi-Fi channel."""


Item = tuple[int, bytes]
"""(timestamp in ms, 16-byte msg_id): what a node's store holds, as reconciliation sees it."""


class Reconciler(Protocol):
    """Cost of reconciling two item sets: (bytes both ways, round trips)."""

    name: str

    def cost(self, ours: Sequence[Item], theirs: Sequence[Item]) -> tuple[int, int]: ...


class FullListReconciler:
    """The baseline: one side sends its whole id list, the other answers with what it lacks."""

    name = "full-list"

    def cost(self, ours: Sequence[Item], theirs: Sequence[Item]) -> tuple[int, int]:
        have = {i for _, i in ours}
        lacking = sum(1 for _, i in theirs if i not in have)
        return 4 + 18 * len(ours) + 4 + 18 * lacking, 1


class _Link:
    __slots__ = ("busy", "epoch", "lat_rng", "loss_rng", "u", "up", "v")

    def __init__(self, seed: int, u: int, v: int) -> None:
        self.u = u
        self.v = v
        self.up = True
        self.epoch = 0
        # index 0: u -> v, 1: v -> u
        self.loss_rng = (seeded(seed, "loss", u, v), seeded(seed, "loss", v, u))
        self.lat_rng = (seeded(seed, "lat", u, v), seeded(seed, "lat", v, u))
        self.busy = [0.0, 0.0]


@dataclass(slots=True)
class Counters:
    """What crossed the links and what the cores did, for one run."""

    payload_frames: int = 0
    payload_bytes: int = 0
    control_frames: int = 0
    control_bytes: int = 0
    frames_lost: int = 0
    payload_arrivals: int = 0
    datagrams: int = 0
    deliveries: int = 0
    link_deliveries: int = 0
    sync_deliveries: int = 0
    double_deliveries: int = 0
    sync_runs: int = 0
    sync_recon_bytes: int = 0
    sync_payload_bytes: int = 0
    events: int = 0
    stuck_timers: int = 0
    frame_kinds: dict[str, list[int]] = field(default_factory=dict)
    """type name -> [frames sent, bytes sent]."""


class Sim:
    """One scenario: a graph, one core per node, links, and a heap of events."""

    def __init__(
        self,
        graph: Graph,
        make_core: Callable[[int, bytes], Any],
        params: LinkParams,
        seed: int,
        reconciler: Reconciler | None = None,
        max_events: int = 20_000_000,
        max_wall: float = 600.0,
    ) -> None:
        self.graph = graph
        self.params = params
        self.seed = seed
        self.now = 0.0
        self.cores: list[GossipCore] = [make_core(i, node_id(i)) for i in range(graph.n)]
        self.links: dict[tuple[int, int], _Link] = {
            (u, v): _Link(seed, u, v) for u, v in graph.edges
        }
        self.adj = graph.adjacency()
        self.reconciler = reconciler or FullListReconciler()
        self.counters = Counters()
        self.max_events = max_events
        self.max_wall = max_wall
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._sched: list[float | None] = [None] * graph.n
        self._radio: list[float] = [0.0] * graph.n
        self.published: dict[bytes, tuple[float, int]] = {}
        """msg_id -> (publish time, origin)."""
        self.delivered: list[dict[bytes, float]] = [{} for _ in range(graph.n)]
        """node -> msg_id -> first delivery time (what its driver stored)."""
        self.hops: list[dict[bytes, int]] = [{} for _ in range(graph.n)]
        """node -> msg_id -> hops the first copy travelled (as its Deliver said; over links only)."""
        self.payloads: dict[bytes, bytes] = {}
        self._context = "tick"
        self.hooks: list[Callable[[int, Deliver], None]] = []
        self.topology_hooks: list[Callable[[], None]] = []
        self.wall_seconds = 0.0
        self.truncated = False
        for i in range(graph.n):
            for j in self.adj[i]:
                self.cores[i].link_up(0.0, node_id(j))
        for i in range(graph.n):
            self._drain(i)

    # -- scheduling ------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def run(self, until: float) -> None:
        """Process events up to virtual time `until` (bounded in count and wall time)."""
        heap = self._heap
        start = time.monotonic()
        c = self.counters
        while heap and heap[0][0] <= until:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
            c.events += 1
            if c.events % 4096 == 0 and (
                c.events > self.max_events or time.monotonic() - start > self.max_wall
            ):
                self.truncated = True
                break
        self.now = max(self.now, until) if not self.truncated else self.now
        self.wall_seconds += time.monotonic() - start

    # -- driving the cores -------------------------------------------------------------
    def _drain(self, i: int) -> None:
        core = self.cores[i]
        for out in core.poll():
            if isinstance(out, Send):
                self._send(i, out)
            else:
                self._deliver(i, out)
        d = core.next_deadline()
        if d is not None and d != self._sched[i]:
            if d <= self.now and self._context == "tick":
                # A core whose deadline stays in the past after its tick would spin the
                # clock; count it and step forward a millisecond.
                self.counters.stuck_timers += 1
                d = self.now + 0.001
            self._sched[i] = d
            self.at(max(d, self.now), self._tick, i, d)

    def _tick(self, i: int, d: float) -> None:
        if self._sched[i] != d:
            return
        self._sched[i] = None
        self._context = "tick"
        self.cores[i].tick(self.now)
        self._drain(i)

    def _deliver(self, i: int, out: Deliver) -> None:
        c = self.counters
        seen = self.delivered[i]
        if out.msg_id in seen:
            c.double_deliveries += 1
            return
        seen[out.msg_id] = self.now
        c.deliveries += 1
        if self._context == "link":
            c.link_deliveries += 1
            self.hops[i][out.msg_id] = out.hops
        elif self._context == "sync":
            c.sync_deliveries += 1
        for hook in self.hooks:
            hook(i, out)

    def _send(self, i: int, out: Send) -> None:
        j = node_index(out.peer)
        key = (i, j) if i < j else (j, i)
        link = self.links.get(key)
        if link is None:
            raise ValueError(f"node {i} sent to non-neighbour {j}")
        c = self.counters
        direction = 0 if i == link.u else 1
        size = self.params.overhead
        kinds = c.frame_kinds
        for f in out.frames:
            s = f.wire_size()
            size += s
            if f.is_payload:
                c.payload_frames += 1
                c.payload_bytes += s
            else:
                c.control_frames += 1
                c.control_bytes += s
            name = type(f).__name__
            k = kinds.get(name)
            if k is None:
                kinds[name] = [1, s]
            else:
                k[0] += 1
                k[1] += s
        c.datagrams += 1
        if not link.up:
            c.frames_lost += len(out.frames)
            return
        p = self.params
        if p.shared_radio:
            start = max(self.now, self._radio[i])
            done = start + size * 8 / p.bandwidth_bps
            self._radio[i] = done
        else:
            start = max(self.now, link.busy[direction])
            done = start + size * 8 / p.bandwidth_bps
            link.busy[direction] = done
        arrive = done + link.lat_rng[direction].uniform(p.latency_lo, p.latency_hi)
        loss_rng = link.loss_rng[direction]
        if p.loss > 0:
            kept = tuple(f for f in out.frames if loss_rng.random() >= p.loss)
            c.frames_lost += len(out.frames) - len(kept)
        else:
            kept = out.frames
        if kept:
            self.at(arrive, self._arrive, link, link.epoch, j, i, kept)

    def _arrive(self, link: _Link, epoch: int, j: int, i: int, frames: tuple[Frame, ...]) -> None:
        if not link.up or link.epoch != epoch:
            self.counters.frames_lost += len(frames)
            return
        for f in frames:
            if f.is_payload:
                self.counters.payload_arrivals += 1
        self._context = "link"
        self.cores[j].receive(self.now, node_id(i), frames)
        self._drain(j)
        self._context = "tick"

    def is_up(self, u: int, v: int) -> bool:
        link = self.links.get((u, v) if u < v else (v, u))
        return link is not None and link.up

    def call(self, t: float, i: int, fn: Callable[..., None], *args: Any) -> None:
        """At `t`, call `fn(now, *args)` (a method of node i's core) and drain node i."""
        self.at(t, self._call, i, fn, args)

    def _call(self, i: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._context = "local"
        fn(self.now, *args)
        self._drain(i)
        self._context = "tick"

    # -- the workload -------------------------------------------------------------------
    def publish_at(self, t: float, origin: int, msg_id: bytes, payload: bytes) -> None:
        self.published[msg_id] = (t, origin)
        self.payloads[msg_id] = payload
        self.at(t, self._publish, origin, msg_id, payload)

    def _publish(self, origin: int, msg_id: bytes, payload: bytes) -> None:
        self._context = "local"
        self.cores[origin].publish(self.now, msg_id, payload)
        self._drain(origin)
        self._context = "tick"

    # -- link events --------------------------------------------------------------------
    def set_link(self, t: float, u: int, v: int, up: bool, sync: bool = False) -> None:
        """Schedule link (u, v) going up or down at `t` (sync: reconcile after it comes up)."""
        self.at(t, self._set_link, (min(u, v), max(u, v)), up, sync)

    def _set_link(self, key: tuple[int, int], up: bool, sync: bool) -> None:
        link = self.links[key]
        if link.up == up:
            return
        link.up = up
        link.epoch += 1
        for hook in self.topology_hooks:
            hook()
        u, v = key
        for a, b in ((u, v), (v, u)):
            core = self.cores[a]
            if up:
                core.link_up(self.now, node_id(b))
            else:
                core.link_down(self.now, node_id(b))
            self._drain(a)
        if up and sync:
            self._sync(u, v)

    # -- anti-entropy ------------------------------------------------------------------------
    def sync_at(self, t: float, u: int, v: int) -> None:
        self.at(t, self._sync, u, v)

    def _sync(self, u: int, v: int) -> None:
        """Reconcile u's and v's stores; push each side what it lacks, after the round trips."""
        link = self.links[(min(u, v), max(u, v))]
        if not link.up:
            return
        c = self.counters
        c.sync_runs += 1
        ids_u = list(self.delivered[u])
        ids_v = list(self.delivered[v])
        pub = self.published
        recon_bytes, rounds = self.reconciler.cost(
            [(int(pub[m][0] * 1000), m) for m in ids_u],
            [(int(pub[m][0] * 1000), m) for m in ids_v],
        )
        c.sync_recon_bytes += recon_bytes
        set_u, set_v = set(ids_u), set(ids_v)
        p = self.params
        rtt = p.latency_lo + p.latency_hi  # mean one-way latency, both ways
        for a, b, missing in ((u, v, set_u - set_v), (v, u, set_v - set_u)):
            if not missing:
                continue
            frames = tuple(Push(m, 1, self.payloads[m]) for m in sorted(missing))
            size = recon_bytes + sum(f.wire_size() for f in frames)
            c.sync_payload_bytes += sum(f.wire_size() for f in frames)
            delay = rounds * rtt + rtt / 2 + size * 8 / p.bandwidth_bps
            self.at(self.now + delay, self._inject, link, link.epoch, b, a, frames)

    def _inject(self, link: _Link, epoch: int, j: int, i: int, frames: tuple[Push, ...]) -> None:
        if not link.up or link.epoch != epoch:
            return
        have = self.delivered[j]
        fresh = tuple(f for f in frames if f.msg_id not in have)
        if not fresh:
            return
        self._context = "sync"
        self.cores[j].receive(self.now, node_id(i), fresh)
        self._drain(j)
        self._context = "tick"

    def periodic_sync(self, start: float, end: float, period: float) -> None:
        """Every `period`, each node reconciles with one random up neighbour (jittered)."""
        rng = seeded(self.seed, "periodic-sync")
        for i in range(self.graph.n):
            t = start + rng.uniform(0, period)
            while t < end:
                self.at(t, self._periodic, i, rng.random())
                t += period

    def _periodic(self, i: int, pick: float) -> None:
        ups = [j for j in self.adj[i] if self.links[(min(i, j), max(i, j))].up]
        if ups:
            self._sync(i, ups[int(pick * len(ups))])
