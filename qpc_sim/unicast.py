"""A model of unicast store-and-forward (DMs): hop-by-hop custody along shortest paths.

Each node that holds an envelope sends it to the next hop on a shortest path over the
links that are up now (routing is modelled as converged, but a holder only re-checks its
route every `route_check` seconds, standing in for the time route announcements take),
keeps custody until that hop acknowledges (after persisting), and retransmits with a
doubling timeout. A holder with no route keeps the envelope (holding costs no hops) and
forwards it once a route appears. Envelopes carry an absolute expiry and a hop limit; an
expired envelope is dropped wherever it is and never delivered. The destination delivers
each envelope once (a retransmission whose ack was lost is re-acked, not re-delivered).

The cores implement the same `GossipCore` surface the simulator drives (`publish` is not
used; `send_dm` starts an envelope), so DMs share the links, losses and flaps of the
broadcast scenarios.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qpc_node.storefwd.core import MSG_ID_LEN, Deliver, Frame, Send

Route = Callable[[int, int], "int | None"]
"""(this node, destination) -> next hop over links up now, or None."""


@dataclass(frozen=True, slots=True)
class Envelope:
    dm_id: bytes
    dst: int
    expiry: float
    hops: int
    payload: bytes

    @property
    def is_payload(self) -> bool:
        return True

    def wire_size(self) -> int:
        return 2 + MSG_ID_LEN + 6 + 9 + 3 + 4 + len(self.payload)


@dataclass(frozen=True, slots=True)
class CustodyAck:
    dm_ids: tuple[bytes, ...]

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4 + (2 + MSG_ID_LEN) * len(self.dm_ids)


@dataclass(slots=True)
class _Held:
    env: Envelope
    next_hop: int | None = None
    due: float = 0.0
    rto: float = 0.0
    tries: int = 0


@dataclass(slots=True)
class UnicastStats:
    expired_drops: int = 0
    hop_limit_drops: int = 0
    duplicates: int = 0
    retransmissions: int = 0
    peak_held: int = 0


class Custody:
    """One node's custody store: hold, forward hop by hop, retransmit, expire."""

    def __init__(
        self,
        me: int,
        route: Route,
        hop_limit: int = 16,
        rto: float = 0.1,
        rto_max: float = 1.6,
        route_check: float = 1.0,
    ) -> None:
        self.me = me
        self.route = route
        self.hop_limit = hop_limit
        self.rto0 = rto
        self.rto_max = rto_max
        self.route_check = route_check
        self.held: dict[bytes, _Held] = {}
        self.known: dict[bytes, float] = {}
        """dm_id -> expiry, for everything this node took or delivered (exactly once)."""
        self._up: set[int] = set()
        self._out: list[Send | Deliver] = []
        self.stats = UnicastStats()

    def link_up(self, now: float, peer: bytes) -> None:
        self._up.add(int.from_bytes(peer, "big"))
        for h in self.held.values():
            if h.next_hop is None:
                h.due = now

    def link_down(self, now: float, peer: bytes) -> None:
        j = int.from_bytes(peer, "big")
        self._up.discard(j)
        for h in self.held.values():
            if h.next_hop == j:
                h.next_hop = None
                h.due = now

    def publish(self, now: float, msg_id: bytes, payload: bytes) -> None:
        raise NotImplementedError("DMs start with send_dm")

    def send_dm(self, now: float, dm_id: bytes, dst: int, expiry: float, payload: bytes) -> None:
        env = Envelope(dm_id, dst, expiry, 0, payload)
        self.known[dm_id] = expiry
        if dst == self.me:
            self._out.append(Deliver(dm_id, payload, 0, None))
            return
        self.held[dm_id] = _Held(env, due=now)
        self.tick(now)

    def receive(self, now: float, peer: bytes, frames: Sequence[Frame]) -> None:
        acks: list[bytes] = []
        for f in frames:
            if isinstance(f, CustodyAck):
                for m in f.dm_ids:
                    # Any hop we sent it to took custody (an ack may outlive a re-route).
                    self.held.pop(m, None)
            elif isinstance(f, Envelope):
                acks.append(f.dm_id)
                if f.dm_id in self.known:
                    self.stats.duplicates += 1
                elif now >= f.expiry:
                    self.stats.expired_drops += 1
                elif f.hops > self.hop_limit:
                    self.stats.hop_limit_drops += 1
                else:
                    self.known[f.dm_id] = f.expiry
                    if f.dst == self.me:
                        self._out.append(Deliver(f.dm_id, f.payload, f.hops, peer))
                    else:
                        self.held[f.dm_id] = _Held(f, due=now)
        if acks:
            self._out.append(Send(peer, (CustodyAck(tuple(acks)),)))
        self.stats.peak_held = max(self.stats.peak_held, len(self.held))
        self.tick(now)

    def tick(self, now: float) -> None:
        for m, h in list(self.held.items()):
            if now >= h.env.expiry:
                del self.held[m]
                self.stats.expired_drops += 1
                continue
            if h.due > now:
                continue
            if h.next_hop is None or h.next_hop not in self._up:
                h.next_hop = self.route(self.me, h.env.dst)
                h.rto = self.rto0
                h.tries = 0
                if h.next_hop is None:
                    h.due = now + self.route_check
                    continue
            if h.tries:
                self.stats.retransmissions += 1
            h.tries += 1
            env = h.env
            fwd = Envelope(env.dm_id, env.dst, env.expiry, env.hops + 1, env.payload)
            self._out.append(Send(h.next_hop.to_bytes(4, "big"), (fwd,)))
            h.due = now + h.rto
            h.rto = min(h.rto * 2, self.rto_max)
            if h.tries % 4 == 0:
                # Four silent tries: ask routing again (it may know a better way by now).
                h.next_hop = None
                h.due = now + h.rto
        for m in [m for m, e in self.known.items() if e + 60.0 < now]:
            del self.known[m]

    def next_deadline(self) -> float | None:
        if not self.held:
            return None
        return min(min(h.due, h.env.expiry) for h in self.held.values())

    def poll(self) -> list[Send | Deliver]:
        out, self._out = self._out, []
        return out

    def holding(self) -> Iterable[tuple[bytes, bytes]]:
        return [(m, h.env.payload) for m, h in self.held.items()]


class Routes:
    """Shortest-path next hops over the links up now (recomputed per topology version)."""

    def __init__(self, adj: list[list[int]], is_up: Callable[[int, int], bool]) -> None:
        self.adj = adj
        self.is_up = is_up
        self.version = 0
        self._cache: dict[int, tuple[int, list[int]]] = {}

    def changed(self) -> None:
        self.version += 1

    def __call__(self, me: int, dst: int) -> int | None:
        hit = self._cache.get(dst)
        if hit is None or hit[0] != self.version:
            dist = [-1] * len(self.adj)
            dist[dst] = 0
            queue = deque([dst])
            while queue:
                u = queue.popleft()
                for v in self.adj[u]:
                    if dist[v] < 0 and self.is_up(u, v):
                        dist[v] = dist[u] + 1
                        queue.append(v)
            hit = (self.version, dist)
            self._cache[dst] = hit
        dist = hit[1]
        if dist[me] <= 0:
            return None
        for v in self.adj[me]:
            if dist[v] == dist[me] - 1 and self.is_up(me, v):
                return v
        return None


@dataclass(frozen=True, slots=True)
class DmResult:
    scenario: str
    sent: int
    delivered: int
    delivered_in_time: float
    """Share delivered before expiry, of those whose expiry was after the heal (or all)."""
    delay_p50: float
    delay_p99: float
    tx_per_dm: float
    double_deliveries: int
    after_expiry: int
    expired_undelivered: int
    retransmissions: int
    peak_held: int
    events: int
    wall: float
