"""Mesh routing core (sans-IO): node routes by signed distance vector; resolves users.

**Node routes** work as Babel (RFC 8966) does, with hop count as the metric:

- Every node *originates* a route announcement for itself: its node id (SHA-256 of
  its Ed25519 key), the key, a sequence number and an absolute expiry, signed by
  the node. ``hops`` rides along unsigned; each node re-announces its selected
  route with its own distance (a neighbour's ``hops`` + 1).
- **Feasibility** keeps routes loop-free at every instant, even while updates are
  lost or late: for each origin a node keeps a *feasibility distance* FD = the
  best ``(seq, metric)`` it has ever announced (a higher seq is better; at equal
  seq, a lower metric). A route from a neighbour is selectable only if the
  neighbour's announced ``(seq, hops)`` is strictly better than FD. Along any chain
  of next hops FDs then strictly improve, so the chain cannot close on itself;
  nobody can count to infinity because an unfeasible route is never taken.
- When a node's route is lost and only unfeasible ones remain, it *retracts*
  (``hops`` = 65535) and sends a **seq request** toward the origin, which answers
  with a fresh seq (a new seq is feasible everywhere); so does a node that hears
  an unfeasible route shorter than its own. Requests are repeated (rate-limited)
  while the condition lasts, so a lost one costs one ``request_interval``. The
  origin also re-signs with the next seq at half its announcement's lifetime.
- A route is dropped when its next hop's link goes down, when a retraction
  arrives, at the origin's signed expiry, or ``stale_after`` after the last
  refresh from that neighbour, whichever comes first.
- Traffic per link is bounded: at most one :class:`RouteUpdate` per
  ``min_send_interval`` holding at most ``max_batch_entries`` entries; triggered
  changes coalesce (the latest per origin / user wins) and go out after a short
  random delay; the full table goes out every ``update_interval`` with jitter.

**Origin sequence numbers** persist across restarts; they are not derived from
the wall clock. Mesh routers (OpenWrt) have no RTC and boot with a clock that may
lag what neighbours stored before the restart, and a seq lower than what they hold
makes the restarted node's announcements look like replays until those expire.
Writing flash on every bump would wear it, so seqs are reserved in blocks: the
core emits :class:`PersistSeq` (the next block's end) before it uses any seq of
that block, and the caller stores it before it transmits anything ``poll``
returned after it; after a restart, pass the stored value as ``seq_floor``. If
that store is lost anyway, a neighbour's copy of an announcement with a higher
seq than ours makes us jump past it (Babel does the same), so the mesh heals at
the next exchange instead of at expiry.

**Home bindings** (user -> home node, signed by the user's client) are kept in
:mod:`.bindings` and spread by the router; the wire records, what is signed and
the signature cache are in :mod:`.signed`. This module re-exports their public
names, so ``from qpc_node.mesh.routing import ...`` keeps working.

Time: every method takes ``now_ms``, unix wall-clock milliseconds, because
expiries are absolute and signed (they must mean the same on every node; nodes
need clocks within ``max_clock_skew_ms``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import msgspec

from qpc_node.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from qpc_node.mesh.bindings import BindingStore
from qpc_node.mesh.signed import (
    HOME_DOMAIN,
    ID_LEN,
    INFINITY,
    KEY_LEN,
    MAX_U64,
    MAX_UPDATE_BYTES,
    MAX_UPDATE_ENTRIES,
    ROUTE_DOMAIN,
    SIG_LEN,
    Announcement,
    HomeBinding,
    Outcome,
    RouteUpdate,
    SeqRequest,
    Sign,
    Verify,
    VerifyCache,
    binding_signed_bytes,
    node_id_of,
    route_signed_bytes,
    sign_announcement,
    sign_binding,
)

__all__ = [
    "HOME_DOMAIN",
    "ID_LEN",
    "INFINITY",
    "KEY_LEN",
    "MAX_U64",
    "MAX_UPDATE_BYTES",
    "MAX_UPDATE_ENTRIES",
    "ROUTE_DOMAIN",
    "SIG_LEN",
    "Announcement",
    "HomeBinding",
    "Local",
    "NextHop",
    "NoRoute",
    "Outcome",
    "PersistSeq",
    "ReceiveReport",
    "Resolution",
    "RouteEntry",
    "RouteUpdate",
    "Router",
    "RouterOutput",
    "RoutingPolicy",
    "RoutingStatistics",
    "Send",
    "SeqRequest",
    "Sign",
    "Verify",
    "binding_signed_bytes",
    "node_id_of",
    "route_signed_bytes",
    "sign_announcement",
    "sign_binding",
]
"""Public names, including the wire records and signing helpers of :mod:`.signed`."""

# -- the router -----------------------------------------------------------------------------


class RoutingPolicy(msgspec.Struct, frozen=True):
    """Timers (milliseconds) and bounds of the routing core.

    ``stale_after_ms`` is 3.5 update intervals (Babel's route expiry): two lost
    periodic updates in a row do not drop a route, a dead neighbour's do.
    """

    update_interval_ms: int = 30_000
    route_lifetime_ms: int = 300_000
    """Signed expiry of our own announcements: now + this."""
    stale_after_ms: int = 105_000
    min_send_interval_ms: int = 1_000
    trigger_delay_ms: int = 200
    """Triggered changes wait a random 0..this, so a burst of changes goes as one batch."""
    jitter: float = 0.25
    """Periodic sends come after (1 - jitter * U[0,1)) intervals: no lockstep."""
    max_hops: int = 32
    max_destinations: int = 4096
    max_bindings: int = 16_384
    binding_max_lifetime_ms: int = 7 * 86_400_000
    max_batch_entries: int = 128
    max_clock_skew_ms: int = 60_000
    seq_block: int = 1024
    request_hop_limit: int = 16
    request_interval_ms: int = 2_000
    """A seq request for the same origin is not repeated sooner (and a node answers
    requests for its own route with a new seq at most this often)."""
    gc_interval_ms: int = 10_000
    verify_cache: int = 8192

    def __post_init__(self) -> None:
        if not 0 < self.min_send_interval_ms <= self.update_interval_ms:
            raise ConfigError("routing needs 0 < min_send_interval_ms <= update_interval_ms")
        if self.stale_after_ms <= self.update_interval_ms:
            raise ConfigError("routing stale_after_ms must exceed update_interval_ms")
        if self.route_lifetime_ms < self.stale_after_ms:
            raise ConfigError("routing route_lifetime_ms must be >= stale_after_ms")
        if not 0 <= self.jitter < 1 or self.trigger_delay_ms < 0:
            raise ConfigError("routing jitter must be in [0, 1) and trigger_delay_ms >= 0")
        if not 1 <= self.max_hops < INFINITY:
            raise ConfigError(f"routing max_hops must be in 1..{INFINITY - 1}")
        if min(self.max_destinations, self.max_bindings, self.max_batch_entries) < 1:
            raise ConfigError("routing table caps and max_batch_entries must be >= 1")
        if self.max_batch_entries > MAX_UPDATE_ENTRIES:
            raise ConfigError(f"routing max_batch_entries must be <= {MAX_UPDATE_ENTRIES}")
        if self.seq_block < 1 or not 1 <= self.request_hop_limit <= 255:
            raise ConfigError("routing seq_block >= 1 and request_hop_limit in 1..255")
        if min(self.request_interval_ms, self.gc_interval_ms, self.max_clock_skew_ms) < 0:
            raise ConfigError("routing intervals must be >= 0")


class Send(msgspec.Struct, frozen=True):
    """Send ``update`` (``update.encode()``) to ``neighbour`` over its federation link."""

    neighbour: bytes
    update: RouteUpdate


class PersistSeq(msgspec.Struct, frozen=True):
    """Store ``seq`` durably before transmitting any later output; after a restart pass
    it as ``seq_floor``. Emitted once per ``seq_block`` seqs (flash-friendly)."""

    seq: int


RouterOutput = Send | PersistSeq


class Local(msgspec.Struct, frozen=True):
    """The user is homed on this node: deliver to its mailbox."""


class NextHop(msgspec.Struct, frozen=True):
    """Forward to neighbour ``node``; ``home`` is ``hops`` hops away."""

    node: bytes
    hops: int
    home: bytes


class NoRoute(msgspec.Struct, frozen=True):
    """Nothing to forward to yet (retriable: bindings and routes arrive over time)."""

    reason: Literal["unknown user", "binding expired", "no route to home"]
    home: bytes | None = None


Resolution = Local | NextHop | NoRoute


class ReceiveReport(msgspec.Struct, frozen=True):
    routes: tuple[Outcome, ...]
    bindings: tuple[Outcome, ...]


class RouteEntry(msgspec.Struct, frozen=True):
    """One row of the path table (``/mesh routes``)."""

    destination: bytes
    next_hop: bytes
    hops: int
    seq: int
    expires_ms: int


class RoutingStatistics(msgspec.Struct, frozen=True):
    destinations: int
    route_entries: int
    bindings: int
    links: int
    seq: int
    routes_accepted: int
    routes_refreshed: int
    routes_retracted: int
    routes_forged: int
    routes_expired: int
    routes_replayed: int
    routes_refused: int
    """Future expiry, beyond max_hops, table full, or from no link."""
    bindings_accepted: int
    bindings_forged: int
    bindings_expired: int
    bindings_replayed: int
    bindings_evicted: int
    bindings_restored: int
    """Read back from the store at start (and still valid)."""
    retractions_sent: int
    requests_sent: int
    requests_received: int
    updates_sent: int
    entries_sent: int
    signatures_verified: int
    verify_cache_hits: int


class _Route:
    __slots__ = ("ann", "expires", "metric")

    def __init__(self, ann: Announcement, expires: int) -> None:
        self.ann = ann
        self.metric = ann.hops + 1
        self.expires = expires


class _Source:
    """Feasibility distance for one origin: the best (seq, metric) we ever announced."""

    __slots__ = ("expiry_ms", "metric", "seq")

    def __init__(self, seq: int, metric: int, expiry_ms: int) -> None:
        self.seq = seq
        self.metric = metric
        self.expiry_ms = expiry_ms


class _Selected:
    """Our route to one origin, as we announce it; ``ann`` is kept for a retraction."""

    __slots__ = ("ann", "metric", "nb")

    def __init__(self, nb: bytes, metric: int, ann: Announcement) -> None:
        self.nb = nb
        self.metric = metric
        self.ann = ann


class _Link:
    __slots__ = ("bindings", "last_sent", "next_full_at", "requests", "routes", "send_at")

    def __init__(self, now: int) -> None:
        self.routes: dict[bytes, Announcement] = {}
        self.bindings: dict[bytes, HomeBinding] = {}
        self.requests: dict[bytes, SeqRequest] = {}
        self.send_at: int | None = None
        self.last_sent: int | None = None
        self.next_full_at = now

    def pending(self) -> int:
        return len(self.routes) + len(self.bindings) + len(self.requests)


_V = TypeVar("_V")


def _take(pending: dict[bytes, _V], n: int) -> list[_V]:
    """Pop up to ``n`` entries, oldest queued first."""
    keys = list(pending)[: max(n, 0)]
    return [pending.pop(k) for k in keys]


def _check_id(node: bytes) -> None:
    if len(node) != ID_LEN:
        raise LocalProtocolError(f"node id must be {ID_LEN} bytes, got {len(node)}")


class Router:
    """One node's routing state. Feed it link events and neighbours' updates; ``poll``."""

    def __init__(
        self,
        public_key: bytes,
        sign: Sign,
        verify: Verify,
        *,
        verify_user: Verify | None = None,
        policy: RoutingPolicy | None = None,
        rand: Callable[[], float],
        seq_floor: int = 0,
        now_ms: int,
    ) -> None:
        if len(public_key) != KEY_LEN:
            raise LocalProtocolError(f"node public key must be {KEY_LEN} bytes")
        if not 0 <= seq_floor < MAX_U64:
            raise LocalProtocolError("seq_floor out of range")
        self.public_key = public_key
        self.node_id = node_id_of(public_key)
        self._sign = sign
        self._verify_node = verify
        self._verify_user = verify_user or verify
        self._p = policy or RoutingPolicy()
        self._rand = rand
        self._next_seq = max(seq_floor, 1)
        self._reserved = seq_floor
        self._own: Announcement | None = None
        self._next_originate = now_ms
        self._last_request_bump: int | None = None
        self._links: dict[bytes, _Link] = {}
        self._routes: dict[bytes, dict[bytes, _Route]] = {}
        self._expiry_heap: list[tuple[int, bytes, bytes]] = []
        self._selected: dict[bytes, _Selected] = {}
        self._sources: dict[bytes, _Source] = {}
        self._bindings = BindingStore(
            cap=self._p.max_bindings,
            max_lifetime_ms=self._p.binding_max_lifetime_ms,
            max_clock_skew_ms=self._p.max_clock_skew_ms,
            verify=self._verify_binding,
        )
        self._requested: dict[bytes, tuple[int, int]] = {}
        """origin -> (seq, when) of our last seq request (rate limit)."""
        self._retry: dict[bytes, int] = {}
        """origin -> when to look again whether our seq request is still needed (a request
        or its answer may be lost; the periodic dump that would heal it is much later)."""
        self._verified = VerifyCache(self._p.verify_cache)
        self._retracted: dict[bytes, Announcement] = {}
        """Our recent retractions, repeated in full dumps until the announcement expires
        (a lost retraction must not leave a neighbour on a dead route until stale_after)."""
        self._recent_sends: dict[bytes, int] = {}
        self._next_gc = now_ms + self._p.gc_interval_ms
        self._out: list[RouterOutput] = []
        self._c: dict[str, int] = dict.fromkeys(
            (
                "retractions_sent",
                "requests_sent",
                "requests_received",
                "updates_sent",
                "entries_sent",
                "bindings_restored",
            ),
            0,
        )
        self._route_outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._binding_outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)

    # -- inputs -----------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The last seq we announced (0 before the first)."""
        return self._own.seq if self._own is not None else 0

    def link_up(self, neighbour: bytes, now_ms: int) -> None:
        """A federation link to ``neighbour`` is up: it gets our whole table at once.

        A new link to a neighbour we already have one to *replaces* it: the neighbour
        may have restarted with no memory of what it announced, so every route through
        the old link goes first (loop freedom depends on it: the new incarnation has no
        feasibility distances, and must not hear its old self's routes back from us).
        """
        _check_id(neighbour)
        if neighbour == self.node_id:
            raise LocalProtocolError("a link to ourselves")
        self.link_down(neighbour, now_ms)
        link = self._links[neighbour] = _Link(now_ms)
        # A flapping link does not reset the per-link rate.
        link.last_sent = self._recent_sends.pop(neighbour, None)

    def link_down(self, neighbour: bytes, now_ms: int) -> None:
        """The link is gone: every route through ``neighbour`` is withdrawn now."""
        link = self._links.pop(neighbour, None)
        if link is None:
            return
        if link.last_sent is not None:
            self._recent_sends[neighbour] = link.last_sent
        for origin in [o for o, t in self._routes.items() if neighbour in t]:
            del self._routes[origin][neighbour]
            self._reselect(origin, now_ms)

    def receive(self, neighbour: bytes, update: RouteUpdate, now_ms: int) -> ReceiveReport:
        """Apply a neighbour's batch (decoded with :meth:`RouteUpdate.decode`)."""
        if neighbour not in self._links:
            # A batch that raced the link's teardown: the routes would point at no link.
            self._route_outcomes[Outcome.NO_LINK] += len(update.routes)
            self._binding_outcomes[Outcome.NO_LINK] += len(update.bindings)
            return ReceiveReport(
                (Outcome.NO_LINK,) * len(update.routes), (Outcome.NO_LINK,) * len(update.bindings)
            )
        routes = []
        for a in update.routes:
            o = self._on_route(neighbour, a, now_ms)
            self._route_outcomes[o] += 1
            routes.append(o)
        bindings = []
        for b in update.bindings:
            o = self._on_binding(b, now_ms, neighbour)
            self._binding_outcomes[o] += 1
            bindings.append(o)
        for r in update.requests:
            self._c["requests_received"] += 1
            self._on_request(neighbour, r, now_ms)
        return ReceiveReport(tuple(routes), tuple(bindings))

    def home(self, binding: HomeBinding, now_ms: int) -> Outcome:
        """A client that authenticated here hands us its signed binding to this node."""
        binding.validate(remote=True)
        if binding.node != self.node_id:
            o = Outcome.FOREIGN
        else:
            o = self._on_binding(binding, now_ms, None)
        self._binding_outcomes[o] += 1
        return o

    def restore(self, binding: HomeBinding, now_ms: int) -> Outcome:
        """A binding this node accepted before a restart (read back from its store).

        Verified and kept like a neighbour's, but not sent on at once: links come up
        later and each gets the whole table (our own users' bindings with it), so
        nothing waits for the users or the neighbours to announce again."""
        try:
            binding.validate(remote=True)
        except RemoteProtocolError:
            return Outcome.FORGED
        o = self._bindings.offer(binding, now_ms)
        if o is Outcome.ACCEPTED:
            self._c["bindings_restored"] += 1
        return o

    # -- outputs ----------------------------------------------------------------------------

    def poll(self, now_ms: int) -> list[RouterOutput]:
        """Run due timers and flush due batches. Call after every input and at the deadline."""
        p = self._p
        if now_ms >= self._next_originate:
            self._originate(now_ms)
        heap = self._expiry_heap
        while heap and heap[0][0] <= now_ms:
            _expires, origin, nb = heapq.heappop(heap)
            table = self._routes.get(origin)
            r = table.get(nb) if table else None
            if table is not None and r is not None and r.expires <= now_ms:
                del table[nb]
                self._reselect(origin, now_ms)
        for origin in [o for o, t in self._retry.items() if t <= now_ms]:
            del self._retry[origin]
            self._reselect(origin, now_ms)
        if now_ms >= self._next_gc:
            self._gc(now_ms)
        for nb, link in self._links.items():
            if now_ms >= link.next_full_at:
                self._queue_full(nb, link, now_ms)
                link.next_full_at = now_ms + int(
                    p.update_interval_ms * (1 - p.jitter * self._rand())
                )
            if link.send_at is not None and now_ms >= link.send_at:
                self._flush(nb, link, now_ms)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> int:
        """When :meth:`poll` next has work (there is always a next periodic update)."""
        t = min(self._next_originate, self._next_gc, *self._retry.values())
        if self._expiry_heap:
            t = min(t, self._expiry_heap[0][0])
        for link in self._links.values():
            t = min(t, link.next_full_at)
            if link.send_at is not None:
                t = min(t, link.send_at)
        return t

    # -- queries ----------------------------------------------------------------------------

    def route(self, node: bytes, now_ms: int) -> Local | NextHop | NoRoute:
        """Where to send something for node ``node``."""
        if node == self.node_id:
            return Local()
        sel = self._selected.get(node)
        if sel is not None:
            r = self._routes.get(node, {}).get(sel.nb)
            if r is not None and r.expires > now_ms and sel.nb in self._links:
                return NextHop(sel.nb, sel.metric, node)
        return NoRoute("no route to home", node)

    def resolve(self, user: bytes, now_ms: int) -> Resolution:
        """Where a message for user fingerprint ``user`` goes: here, a next hop, or not yet."""
        b = self._bindings.get(user)
        if b is None:
            return NoRoute("unknown user")
        if b.expiry_ms <= now_ms:
            return NoRoute("binding expired", b.node)
        self._bindings.touch(user)
        return self.route(b.node, now_ms)

    def binding(self, user: bytes) -> HomeBinding | None:
        return self._bindings.get(user)

    def users_homed(self, now_ms: int) -> Counter[bytes]:
        """node id -> users homed there by their live bindings (this node's included)."""
        return self._bindings.homed_per_node(now_ms)

    def routes(self, now_ms: int) -> tuple[RouteEntry, ...]:
        out = []
        for origin, sel in sorted(self._selected.items()):
            r = self._routes.get(origin, {}).get(sel.nb)
            if r is not None and r.expires > now_ms:
                out.append(RouteEntry(origin, sel.nb, sel.metric, sel.ann.seq, r.expires))
        return tuple(out)

    def next_hops(self) -> dict[bytes, tuple[bytes, int]]:
        """destination -> (next hop, hops) as selected now: the forwarding state, whether
        or not its timers ran yet (the simulator's loop check reads it)."""
        return {origin: (sel.nb, sel.metric) for origin, sel in self._selected.items()}

    def next_hop(self, destination: bytes) -> bytes | None:
        sel = self._selected.get(destination)
        return None if sel is None else sel.nb

    def statistics(self) -> RoutingStatistics:
        ro, bo, c = self._route_outcomes, self._binding_outcomes, self._c
        return RoutingStatistics(
            destinations=len(self._selected),
            route_entries=sum(len(t) for t in self._routes.values()),
            bindings=len(self._bindings),
            links=len(self._links),
            seq=self.seq,
            routes_accepted=ro[Outcome.ACCEPTED],
            routes_refreshed=ro[Outcome.REFRESHED],
            routes_retracted=ro[Outcome.RETRACTED] + ro[Outcome.UNREACHABLE],
            routes_forged=ro[Outcome.FORGED],
            routes_expired=ro[Outcome.EXPIRED],
            routes_replayed=ro[Outcome.REPLAYED],
            routes_refused=ro[Outcome.FUTURE] + ro[Outcome.FULL] + ro[Outcome.NO_LINK],
            bindings_accepted=bo[Outcome.ACCEPTED],
            bindings_forged=bo[Outcome.FORGED],
            bindings_expired=bo[Outcome.EXPIRED],
            bindings_replayed=bo[Outcome.REPLAYED],
            bindings_evicted=self._bindings.evicted,
            bindings_restored=c["bindings_restored"],
            retractions_sent=c["retractions_sent"],
            requests_sent=c["requests_sent"],
            requests_received=c["requests_received"],
            updates_sent=c["updates_sent"],
            entries_sent=c["entries_sent"],
            signatures_verified=self._verified.verified,
            verify_cache_hits=self._verified.hits,
        )

    # -- announcements ----------------------------------------------------------------------

    def _originate(self, now_ms: int) -> None:
        p = self._p
        seq = self._next_seq
        if seq > MAX_U64:
            raise LocalProtocolError("origin seq exhausted")
        self._next_seq = seq + 1
        if seq >= self._reserved:
            self._reserved = min(seq + p.seq_block, MAX_U64)
            self._out.append(PersistSeq(self._reserved))
        self._own = sign_announcement(
            self.public_key, self._sign, seq, now_ms + p.route_lifetime_ms
        )
        for link in self._links.values():
            link.routes[self.node_id] = self._own
            self._arm(link, now_ms)
        # Re-signed (next seq, new expiry) at half its lifetime; periodic dumps in between
        # repeat the same signed bytes, which every neighbour verified once (cache hit).
        half = p.route_lifetime_ms // 2
        self._next_originate = now_ms + half - int(half * p.jitter * self._rand())

    def _on_route(self, nb: bytes, a: Announcement, now: int) -> Outcome:
        p = self._p
        if a.expiry_ms <= now:
            return Outcome.EXPIRED
        if a.expiry_ms > now + p.route_lifetime_ms + p.max_clock_skew_ms:
            return Outcome.FUTURE
        table = self._routes.get(a.origin)
        old = table.get(nb) if table is not None else None
        if old is not None:
            o = old.ann
            if a.seq < o.seq:
                return Outcome.REPLAYED
            if a == o:
                # The same verified content again (a periodic dump): renew the stale timer.
                assert table is not None
                self._set_route(table, a.origin, nb, a, now)
                return Outcome.REFRESHED
        if a.origin != node_id_of(a.origin_key) or (a.hops == 0 and a.origin != nb):
            # Only the origin itself is 0 hops from the origin.
            return Outcome.FORGED
        if not self._verified.check(self._verify_node, a.origin_key, a.signed_bytes(), a.signature):
            return Outcome.FORGED
        if a.origin == self.node_id:
            if a.seq >= self._next_seq:
                # A previous incarnation of us got further than our stored seq: jump past it.
                self._next_seq = a.seq + 1
                self._next_originate = now
            return Outcome.OWN
        if a.retraction or a.hops + 1 > p.max_hops:
            if table is not None and old is not None:
                del table[nb]
                self._reselect(a.origin, now)
            return Outcome.RETRACTED if a.retraction else Outcome.UNREACHABLE
        if table is None:
            if len(self._routes) >= p.max_destinations:
                return Outcome.FULL
            table = self._routes[a.origin] = {}
        self._set_route(table, a.origin, nb, a, now)
        self._reselect(a.origin, now)
        return Outcome.ACCEPTED

    def _set_route(
        self, table: dict[bytes, _Route], origin: bytes, nb: bytes, a: Announcement, now: int
    ) -> None:
        expires = min(a.expiry_ms, now + self._p.stale_after_ms)
        table[nb] = _Route(a, expires)
        heapq.heappush(self._expiry_heap, (expires, origin, nb))

    def _feasible(self, src: _Source | None, r: _Route) -> bool:
        if src is None:
            return True
        return r.ann.seq > src.seq or (r.ann.seq == src.seq and r.ann.hops < src.metric)

    def _source(self, origin: bytes, now: int) -> _Source | None:
        src = self._sources.get(origin)
        if src is not None and src.expiry_ms + self._p.max_clock_skew_ms <= now:
            # Every announcement we made from it has expired everywhere: forget the FD.
            del self._sources[origin]
            return None
        return src

    def _reselect(self, origin: bytes, now: int) -> None:
        table = self._routes.get(origin, {})
        src = self._source(origin, now)
        cur = self._selected.get(origin)
        best: tuple[tuple[int, bool, int, bytes], bytes, _Route] | None = None
        unfeasible: list[tuple[int, bytes]] = []
        for nb, r in table.items():
            if r.expires <= now or nb not in self._links:
                continue
            if not self._feasible(src, r):
                unfeasible.append((r.metric, nb))
                continue
            key = (r.metric, cur is None or nb != cur.nb, -r.ann.seq, nb)
            if best is None or key < best[0]:
                best = (key, nb, r)
        if best is None:
            if cur is not None:
                del self._selected[origin]
                if cur.ann.expiry_ms > now:
                    # Neighbours drop routes through us now, not at their stale timer.
                    retract = msgspec.structs.replace(cur.ann, hops=INFINITY)
                    self._retracted[origin] = retract
                    for link in self._links.values():
                        link.routes[origin] = retract
                        self._arm(link, now)
                    self._c["retractions_sent"] += 1
            if unfeasible and src is not None:
                targets = [n for _m, n in unfeasible]
                self._request(origin, src.seq + 1, targets, self._p.request_hop_limit, now)
            if not table:
                self._routes.pop(origin, None)
            return
        _key, nb, r = best
        shorter = [n for m, n in unfeasible if m < r.metric]
        if shorter and src is not None:
            # A shorter path exists but our FD forbids it: only a new seq unlocks it.
            self._request(origin, src.seq + 1, shorter, self._p.request_hop_limit, now)
        if src is None or r.ann.seq > src.seq:
            self._sources[origin] = _Source(r.ann.seq, r.metric, r.ann.expiry_ms)
        else:
            src.metric = min(src.metric, r.metric)
            src.expiry_ms = max(src.expiry_ms, r.ann.expiry_ms)
        adv = msgspec.structs.replace(r.ann, hops=r.metric)
        self._selected[origin] = _Selected(nb, r.metric, adv)
        self._retracted.pop(origin, None)
        if cur is not None and (cur.ann.seq, cur.metric) == (r.ann.seq, r.metric):
            # Same seq and distance (perhaps via another neighbour): nothing new to say.
            return
        for lnb, link in self._links.items():
            if lnb != nb:
                link.routes[origin] = adv
                self._arm(link, now)

    def _request(
        self, origin: bytes, seq: int, targets: Iterable[bytes], hop_limit: int, now: int
    ) -> None:
        if seq > MAX_U64:
            return
        last = self._requested.get(origin)
        if last is not None and last[0] >= seq and now - last[1] < self._p.request_interval_ms:
            return
        self._requested[origin] = (seq, now)
        self._retry[origin] = now + self._p.request_interval_ms
        req = SeqRequest(origin, seq, hop_limit)
        for nb in targets:
            link = self._links.get(nb)
            if link is not None:
                link.requests[origin] = req
                self._arm(link, now)
                self._c["requests_sent"] += 1

    def _on_request(self, nb: bytes, req: SeqRequest, now: int) -> None:
        link = self._links[nb]
        if req.origin == self.node_id:
            recent = (
                self._last_request_bump is not None
                and now - self._last_request_bump < self._p.request_interval_ms
            )
            if req.seq >= self._next_seq and not recent:
                self._last_request_bump = now
                self._originate(now)
            elif self._own is not None:
                link.routes[self.node_id] = self._own
                self._arm(link, now)
            return
        sel = self._selected.get(req.origin)
        if sel is None:
            return
        if sel.ann.seq >= req.seq:
            if sel.nb != nb:
                link.routes[req.origin] = sel.ann
                self._arm(link, now)
        elif req.hop_limit > 1 and sel.nb != nb:
            self._request(req.origin, req.seq, (sel.nb,), req.hop_limit - 1, now)

    # -- bindings ---------------------------------------------------------------------------

    def _on_binding(self, b: HomeBinding, now: int, from_nb: bytes | None) -> Outcome:
        o = self._bindings.offer(b, now)
        if o is Outcome.ACCEPTED:
            for lnb, link in self._links.items():
                if lnb != from_nb:
                    link.bindings[b.user] = b
                    self._arm(link, now)
        return o

    def _verify_binding(self, user_key: bytes, msg: bytes, sig: bytes) -> bool:
        return self._verified.check(self._verify_user, user_key, msg, sig)

    # -- sending ----------------------------------------------------------------------------

    def _arm(self, link: _Link, now: int) -> None:
        """Schedule a flush: soon (coalescing delay), but never sooner than the link's rate."""
        if link.send_at is not None:
            return
        t = now + int(self._p.trigger_delay_ms * self._rand())
        if link.last_sent is not None:
            t = max(t, link.last_sent + self._p.min_send_interval_ms)
        link.send_at = t

    def _queue_full(self, nb: bytes, link: _Link, now: int) -> None:
        if self._own is not None:
            link.routes[self.node_id] = self._own
        for origin, sel in self._selected.items():
            if sel.nb != nb:
                link.routes[origin] = sel.ann
        for origin, retract in self._retracted.items():
            if retract.expiry_ms > now:
                link.routes[origin] = retract
        for b in self._bindings.live(now):
            link.bindings[b.user] = b
        if link.pending():
            self._arm(link, now)

    def _flush(self, nb: bytes, link: _Link, now: int) -> None:
        room = self._p.max_batch_entries
        reqs = _take(link.requests, room)
        routes = _take(link.routes, room - len(reqs))
        binds = _take(link.bindings, room - len(reqs) - len(routes))
        update = RouteUpdate(
            tuple(a for a in routes if a.expiry_ms > now),
            tuple(b for b in binds if b.expiry_ms > now),
            tuple(reqs),
        )
        link.last_sent = now
        link.send_at = None
        if link.pending():
            link.send_at = now + self._p.min_send_interval_ms
        if len(update):
            self._c["updates_sent"] += 1
            self._c["entries_sent"] += len(update)
            self._out.append(Send(nb, update))

    # -- housekeeping -----------------------------------------------------------------------

    def _gc(self, now: int) -> None:
        self._next_gc = now + self._p.gc_interval_ms
        live = sum(len(t) for t in self._routes.values())
        if len(self._expiry_heap) > 2 * live + 64:
            # Each refresh pushes an entry and leaves the old one until it is due: a
            # neighbour repeating itself quickly must not grow the heap without bound.
            self._expiry_heap = [
                (r.expires, origin, nb) for origin, t in self._routes.items() for nb, r in t.items()
            ]
            heapq.heapify(self._expiry_heap)
        self._bindings.expire(now)
        for origin in [o for o, a in self._retracted.items() if a.expiry_ms <= now]:
            del self._retracted[origin]
        horizon = now - self._p.min_send_interval_ms
        for nb in [n for n, t in self._recent_sends.items() if t <= horizon]:
            del self._recent_sends[nb]
        for origin in list(self._sources):
            if origin not in self._selected:
                self._source(origin, now)
        cutoff = now - self._p.request_interval_ms
        for origin in [o for o, (_s, t) in self._requested.items() if t < cutoff]:
            del self._requested[origin]
