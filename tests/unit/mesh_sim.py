"""A seeded discrete-event simulator for the routing core: virtual clock, lossy links.

Each node is a real :class:`~qpc_node.mesh.routing.Router` with a real Ed25519 key;
updates travel as encoded bytes (the real codec) with a random latency and are
lost with probability ``loss``. Links are connections: a physical link
going down or up is noticed by each end after its own random delay (as keepalive
timeouts do), a message arrives only if the receiver still has the connection it
was sent on, and a new connection to a node replaces the old one (a restart).

After every event the simulator checks the invariants on the node it touched:
no forwarding loop passes through it (an event changes only that node's next
hops, so any new loop must) and no selected distance exceeds ``n - 1`` (a
counting-to-infinity symptom). A restart wipes a node's feasibility distances,
which the loop-freedom argument rests on; what keeps it loop-free is that its
neighbours drop every route through it when the new connection replaces the
old. So after a restart the loop check follows next hops only over live
connections (a pointer into a connection the restart killed is a black hole, not
a loop), and the distance bound is ``n - 1 + restarts`` (a seq's chain of
announcements visits each node *incarnation* at most once). ``converged()`` compares every node's table with
breadth-first distances on the physical graph.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_node.mesh.routing import (
    NextHop,
    PersistSeq,
    Router,
    RouteUpdate,
    RoutingPolicy,
    Send,
)

T0 = 1_800_000_000_000
"""Virtual wall clock at the start (unix ms)."""


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """The real check (cryptography / OpenSSL), as the node passes it."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=65536)
def shared_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """:func:`ed25519_verify`, memoised across the simulated nodes (a pure function:
    every router still asks and gets the real answer; the CPU is spent once)."""
    return ed25519_verify(public_key, message, signature)


_KEYS: list[Ed25519PrivateKey] = []


def key_pool(n: int) -> list[Ed25519PrivateKey]:
    """The same few keys for every run: deterministic, so a seed replays exactly."""
    while len(_KEYS) < n:
        seed = hashlib.sha256(b"mesh-sim-key-%d" % len(_KEYS)).digest()
        _KEYS.append(Ed25519PrivateKey.from_private_bytes(seed))
    return _KEYS[:n]


class SimError(AssertionError):
    pass


@dataclass
class SimStats:
    events: int = 0
    deliveries: int = 0
    lost: int = 0
    sends: int = 0
    max_entries: int = 0
    checks: int = 0


@dataclass
class Net:
    n: int
    rng: random.Random
    policy: RoutingPolicy
    loss: float = 0.0
    latency_ms: tuple[int, int] = (5, 40)
    detect_ms: tuple[int, int] = (0, 3000)
    now: int = T0
    stats: SimStats = field(default_factory=SimStats)
    on_send: Callable[[int, int, int, RouteUpdate], None] | None = None

    def __post_init__(self) -> None:
        self.keys = key_pool(self.n)
        self.pubs = [raw_public(k) for k in self.keys]
        self.routers: list[Router] = []
        self.persisted = [0] * self.n
        for i in range(self.n):
            self.routers.append(self._make(i))
        self.ids = [r.node_id for r in self.routers]
        self.index = {nid: i for i, nid in enumerate(self.ids)}
        self.edges: set[frozenset[int]] = set()
        self._heap: list[tuple[int, int, str, tuple[object, ...]]] = []
        self._tie = 0
        self._poll_at: list[int | None] = [None] * self.n
        self.restarts = 0
        self._session = 0
        self._sessions: dict[frozenset[int], int] = {}
        """Physical link -> id of the connection on it now."""
        self._view: dict[tuple[int, int], int] = {}
        """(a, b) -> the connection a's router has as its link to b."""
        for i in range(self.n):
            self._schedule_poll(i, self.now)

    def _make(self, i: int) -> Router:
        key = self.keys[i]
        return Router(
            self.pubs[i],
            key.sign,
            shared_verify,
            policy=self.policy,
            rand=self.rng.random,
            seq_floor=self.persisted[i],
            now_ms=self.now,
        )

    # -- scheduling -------------------------------------------------------------------------

    def _push(self, t: int, kind: str, data: tuple[object, ...]) -> None:
        self._tie += 1
        heapq.heappush(self._heap, (t, self._tie, kind, data))

    def _schedule_poll(self, i: int, t: int) -> None:
        cur = self._poll_at[i]
        if cur is None or t < cur:
            self._poll_at[i] = t
            self._push(t, "poll", (i,))

    def link(self, a: int, b: int, up: bool) -> None:
        """Change the physical link now; each end notices after its own delay."""
        e = frozenset((a, b))
        if up == (e in self.edges):
            return
        if up:
            self.edges.add(e)
            self._session += 1
            self._sessions[e] = self._session
            for x, y in ((a, b), (b, a)):
                self._push(self.now + self.rng.randint(0, 300), "up", (x, y, self._session))
        else:
            self.edges.discard(e)
            old = self._sessions.pop(e)
            for x, y in ((a, b), (b, a)):
                self._push(self.now + self.rng.randint(*self.detect_ms), "down", (x, y, old))

    def restart(self, i: int) -> None:
        """Node i restarts with its persisted seq floor: its connections die, new ones form.

        A neighbour notices the old connection's death after its own delay, or sooner
        when the new connection replaces it (a federation layer takes a new link from a
        known node id as the end of the old one).
        """
        self.routers[i] = self._make(i)
        self.restarts += 1
        for key in [k for k in self._view if k[0] == i]:
            del self._view[key]
        for e in list(self.edges):
            if i in e:
                (j,) = e - {i}
                old = self._sessions[e]
                self._session += 1
                self._sessions[e] = self._session
                self._push(self.now + self.rng.randint(*self.detect_ms), "down", (j, i, old))
                for x, y in ((i, j), (j, i)):
                    t = self.now + self.rng.randint(300, 1500)
                    self._push(t, "up", (x, y, self._session))
        self._schedule_poll(i, self.now)

    # -- running ----------------------------------------------------------------------------

    def run_until(self, t_end: int, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to ``t_end``; returns True if ``stop()`` became true."""
        while self._heap and self._heap[0][0] <= t_end:
            t, _tie, kind, data = heapq.heappop(self._heap)
            self.now = max(self.now, t)
            touched = self._handle(kind, data)
            if touched is None:
                continue
            self.stats.events += 1
            self._after(touched)
            if stop is not None and stop():
                return True
        self.now = max(self.now, t_end)
        return stop() if stop is not None else False

    def _handle(self, kind: str, data: tuple[object, ...]) -> int | None:
        if kind == "poll":
            (i,) = data
            assert isinstance(i, int)
            if self._poll_at[i] != self.now:
                return None  # superseded by an earlier poll
            self._poll_at[i] = None
            return i
        if kind == "up":
            x, y, session = data
            assert isinstance(x, int) and isinstance(y, int)
            if self._sessions.get(frozenset((x, y))) != session:
                return None  # that connection is already gone again
            old = self._view.get((x, y))
            if old == session:
                return None
            self._view[(x, y)] = session
            self.routers[x].link_up(self.ids[y], self.now)
            return x
        if kind == "down":
            x, y, session = data
            assert isinstance(x, int) and isinstance(y, int)
            if self._view.get((x, y)) != session:
                return None  # replaced by a newer connection already
            del self._view[(x, y)]
            self.routers[x].link_down(self.ids[y], self.now)
            return x
        if kind == "deliver":
            src, dst, session, payload = data
            assert isinstance(src, int) and isinstance(dst, int) and isinstance(payload, bytes)
            if self._view.get((dst, src)) != session:
                if self._sessions.get(frozenset((src, dst))) == session:
                    # The connection is up but the receiver is told a little later:
                    # the transport holds the data until then.
                    self._push(self.now + 50, "deliver", data)
                    return None
                # Sent on a connection that is gone.
                self.stats.lost += 1
                return None
            self.stats.deliveries += 1
            self.routers[dst].receive(self.ids[src], RouteUpdate.decode(payload), self.now)
            return dst
        raise AssertionError(kind)

    def _after(self, i: int) -> None:
        router = self.routers[i]
        for out in router.poll(self.now):
            if isinstance(out, PersistSeq):
                self.persisted[i] = out.seq
                continue
            assert isinstance(out, Send)
            j = self.index[out.neighbour]
            self.stats.sends += 1
            self.stats.max_entries = max(self.stats.max_entries, len(out.update))
            if self.on_send is not None:
                self.on_send(self.now, i, j, out.update)
            session = self._view.get((i, j))
            if self.rng.random() < self.loss or session != self._sessions.get(frozenset((i, j))):
                self.stats.lost += 1
                continue
            payload = out.update.encode()
            t = self.now + self.rng.randint(*self.latency_ms)
            self._push(t, "deliver", (i, j, session, payload))
        deadline = router.next_deadline()
        if deadline <= self.now:
            raise SimError(f"node {i}: next deadline {deadline} not after poll at {self.now}")
        self._schedule_poll(i, deadline)
        self.check_node(i)

    # -- invariants -------------------------------------------------------------------------

    def check_node(self, i: int) -> None:
        """No loop through node i; no distance beyond n - 1 (no counting to infinity)."""
        self.stats.checks += 1
        bound = self.n - 1 + self.restarts
        for dest, (nh, hops) in self.routers[i].next_hops().items():
            if hops > bound:
                raise SimError(f"node {i}: {hops} hops, bound {bound} ({self.n} nodes)")
            seen = {i}
            cur: int | None = self._follow(i, nh)
            while cur is not None and self.ids[cur] != dest:
                if cur in seen:
                    raise SimError(f"forwarding loop to {self.index[dest]} through {sorted(seen)}")
                seen.add(cur)
                nxt = self.routers[cur].next_hop(dest)
                cur = None if nxt is None else self._follow(cur, nxt)

    def _follow(self, i: int, nh: bytes) -> int | None:
        """Where a packet from i to next hop nh goes: nowhere over a connection that a
        restart killed (the restarted node has a new one, or none yet)."""
        j = self.index[nh]
        if self.restarts and self._view.get((i, j)) != self._sessions.get(frozenset((i, j))):
            return None
        return j

    def check_all(self) -> None:
        for i in range(self.n):
            self.check_node(i)

    def distances(self) -> list[dict[int, int]]:
        adj: dict[int, list[int]] = {i: [] for i in range(self.n)}
        for e in self.edges:
            a, b = tuple(e)
            adj[a].append(b)
            adj[b].append(a)
        out = []
        for s in range(self.n):
            dist = {s: 0}
            q = deque([s])
            while q:
                u = q.popleft()
                for v in adj[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        q.append(v)
            out.append(dist)
        return out

    def converged(self, dist: list[dict[int, int]] | None = None) -> bool:
        """Every reachable node has a shortest-hop route; no unreachable one has any."""
        dist = dist if dist is not None else self.distances()
        for i, r in enumerate(self.routers):
            for j in range(self.n):
                if i == j:
                    continue
                res = r.route(self.ids[j], self.now)
                want = dist[i].get(j)
                if want is None:
                    if isinstance(res, NextHop):
                        return False
                elif not (isinstance(res, NextHop) and res.hops == want):
                    return False
        return True
