"""Plumtree broadcast with per-hop acknowledgements: the sans-IO core of channel delivery.

Epidemic broadcast trees (Leitão et al., SRDS 2007): every message is pushed eagerly along
the edges of a spanning tree and announced lazily (IHAVE, batched) to the other
neighbours. A node that hears of a message it lacks waits T1, then GRAFTs an announcer
(rotating over them every T2), which both fetches the message and makes that edge part of
the tree; a payload that arrives twice PRUNEs the later edge out of the tree. So, once the
tree is stable, a message costs about one transmission per node, and a broken tree repairs
itself through the lazy edges.

On lossy radio links a single lost push would cost a whole subtree a GRAFT round trip, so
tree edges are made reliable hop by hop: every push is ACKed (ACKs batched), the sender
retransmits after RTO = max(rto_factor x SRTT, rto_min) with backoff, a few times; an edge
that stays silent is demoted to lazy and the message announced on it instead (its other
end will GRAFT it from whoever answers). A retransmission from the neighbour that first
delivered a message is only re-ACKed, never PRUNEd.

Latency against flooding is path length, so two departures from the paper: a PRUNE
stops pushes one way only (each node keeps the in-edges that deliver first for it,
instead of also losing the direction its neighbour found fastest), and a node whose
pushes keep needing retransmissions pushes on every link near the origin, where copies
are few and flooding's first copy simply takes whichever link survived
(``PlumtreePolicy.directed``, ``flood_hops_lossy``; figures in bench/README.md).

The IHAVE hop-count optimisation keeps the tree shallow: when a neighbour announces a
message at least ``hop_shortcut`` hops closer to the source than the path it came by, that
neighbour is GRAFTed and the old parent PRUNEd.

Everything is bounded (peers, unacked pushes and queued ACK/IHAVE ids per peer, pending
grafts and their announcers, ids read from one frame, the payload cache by bytes, entries
and age), and whatever a neighbour sends is counted, never raised: a malformed or
unexpected frame is dropped with a typed counter.

Times are seconds (``now``), as in :mod:`.core`. Hop counts: a local publish is 0, a Push
carries the hops it will have travelled on arrival (the sender's + 1).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

import msgspec

from qpc_node.storefwd.core import (
    MSG_ID_LEN,
    Ack,
    Deliver,
    Frame,
    Graft,
    IHave,
    Prune,
    Push,
    Send,
)
from qpc_node.storefwd.seen import SeenFilter, SeenStatistics

__all__ = ["PlumtreeCore", "PlumtreePolicy", "PlumtreeStatistics"]


class PlumtreePolicy(msgspec.Struct, frozen=True):
    """Timers and bounds; defaults from the design note (shared/research/gossip.md (b))."""

    ihave_delay: float = 0.02
    """Lazy IHAVEs are batched this long (the note says 50-100 ms; 20 ms measured better
    on qpc_sim at 30 % loss: p99 coverage 2.7 -> 0.95 s, p50 -4 %, same duplicates)."""
    ack_delay: float = 0.0
    """Per-hop ACKs are batched this long (piggybacked at once on other frames). The
    sender's SRTT includes it, so it lengthens every retransmission timeout: 0 (ACK at
    the next poll, still one frame per batch of receptions) measured best on qpc_sim."""
    graft_timeout: float = 0.08
    """T1: wait this long after the first IHAVE before GRAFTing (latency vs duplicates;
    the note's 150 ms was tuned without eager redundancy, which makes GRAFTs rarer)."""
    graft_retry: float = 0.25
    """T2: then GRAFT the next announcer this often."""
    graft_tries: int = 8
    """GRAFTs per missing message before giving up (anti-entropy sync takes over)."""
    rto_min: float = 0.05
    rto_factor: float = 1.5
    rto_max: float = 2.0
    initial_rtt: float = 0.03
    """SRTT before the first sample (the driver may seed it from the link's ping RTT)."""
    retries: int = 3
    """Retransmissions of an unACKed eager push before the edge is demoted to lazy
    (timeouts grow linearly: RTO, 2 RTO, 3 RTO, ...)."""
    reannounce_interval: float = 0.5
    reannounce_window: float = 5.0
    """An IHAVE is lost as easily as a push: for this long after a first reception,
    every interval, a message is announced again to each neighbour not known to hold it
    (it pushed, announced or ACKed it) and not awaiting its ACK."""
    eager_degree: int = 3
    """Eager (tree) edges a node keeps. A duplicate PRUNEs its sender while the node has
    more eager edges than this and the sender is not among the ones that delivered first
    most often lately; a lazy neighbour announcing something is GRAFTed while it has
    fewer. 1 is classic Plumtree (a tree, one copy per node); a few more mean a lost push
    on one edge rarely costs a repair round trip (latency under loss), for about one
    duplicate per delivery. Classic Plumtree needs ``directed`` off as well: one in-edge
    per node is no spanning tree."""
    directed: bool = True
    """A PRUNE stops pushes one way only: the node that got a duplicate stops its sender
    pushing to it, but keeps pushing its own copies to that sender until told otherwise.
    Each node thus keeps the ``eager_degree`` in-edges that deliver first for it (a
    symmetric PRUNE, classic Plumtree, also drops the direction the other end found
    fastest, and first copies take longer paths)."""
    first_memory: float = 0.9
    """Decay of the per-neighbour score of first deliveries (per first delivery here)."""
    ack_repeat: bool = True
    """Each ACK id is sent again in the next ACK batch: an ACK is tiny, the retransmitted
    payload (and the duplicate it causes) is not."""
    flood_hops: int = 1
    """Messages that travelled fewer hops than this are pushed on every edge, not only
    the eager ones (1: the origin node pushes to all its neighbours)."""
    flood_hops_lossy: int = 2
    lossy_retransmit: float = 0.1
    """Under loss the eager overlay's paths are long (a lost push waits an RTO; the
    surviving copy often took a detour) where flooding's first copy rides the fastest
    surviving path: while more than ``lossy_retransmit`` of this node's eager pushes
    needed a retransmission lately, it floods below ``flood_hops_lossy`` instead. At
    30 % loss (rgg50) that brings the first copy's path from 1.45 to 1.25 x the shortest
    and p50 latency from 1.5 to about 1.3 x flooding's; on clean links it would only add
    duplicates."""
    loss_memory: float = 1 / 64
    """Weight of each push outcome in that retransmission estimate."""
    hop_shortcut: int = 2
    """GRAFT an announcer whose path is at least this many hops shorter (0 = off)."""
    max_hops: int = 64
    """Delivered but not forwarded beyond this hop count."""
    cache_bytes: int = 16 * 1024 * 1024
    cache_entries: int = 50_000
    cache_age: float = 600.0
    """Payloads kept in RAM to answer GRAFTs (and `holding()`), bounded three ways."""
    relink_announce: int = 256
    relink_age: float = 120.0
    """On link up, IHAVE the newest cached ids (at most this many, this young) to the peer."""
    relink_tries: int = 6
    """That announcement is repeated (after reannounce_interval, doubling) for the ids the
    peer is still not known to hold, at most this many times: it is the only way an id
    older than reannounce_window crosses a healed link when reconciliation is slow."""
    max_peers: int = 64
    max_missing: int = 4096
    max_announcers: int = 8
    max_unacked: int = 1024
    max_queued: int = 4096
    """ACK ids and IHAVE entries queued per peer between flushes."""
    max_ids_per_frame: int = 512
    """Ids read from one received IHAVE/GRAFT/ACK frame; the rest is dropped and counted."""
    ids_per_sent_frame: int = 256
    seen_bucket_seconds: float = 600.0
    seen_buckets: int = 12
    seen_max_ids: int = 1_000_000


class PlumtreeStatistics(msgspec.Struct, frozen=True):
    peers: int
    eager_peers: int
    """Neighbours we let push to us (the tree edges ``eager_degree`` bounds)."""
    pushing_to: int
    """Neighbours we push to (they have not PRUNEd us)."""
    cache_entries: int
    cache_bytes: int
    missing: int
    unacked: int
    published: int
    delivered: int
    duplicates: int
    retransmission_duplicates: int
    pushes_sent: int
    retransmits: int
    retransmits_cancelled: int
    graft_pushes: int
    ihave_entries_sent: int
    ihave_entries_received: int
    grafts_sent: int
    grafts_received: int
    graft_misses: int
    graft_gave_up: int
    prunes_sent: int
    prunes_received: int
    acks_sent: int
    acks_received: int
    acks_unknown: int
    demotions: int
    hop_shortcuts: int
    over_hop_limit: int
    duplicate_publishes: int
    missing_dropped: int
    queue_dropped: int
    untracked_pushes: int
    ids_truncated: int
    bad_frames: int
    unknown_peer_frames: int
    peers_refused: int
    cache_evicted: int
    seen: SeenStatistics


class _Pending:
    """An eager push awaiting its ACK."""

    __slots__ = ("deadline", "push", "sent", "tries")

    def __init__(self, push: Push, sent: float, deadline: float) -> None:
        self.push = push
        self.sent = sent
        self.tries = 0
        self.deadline = deadline


class _Peer:
    __slots__ = (
        "ack_again",
        "ack_out",
        "eager",
        "graft_ids",
        "ihave_out",
        "inbound",
        "out",
        "relink",
        "relink_at",
        "relink_tries",
        "score",
        "srtt",
        "unacked",
    )

    def __init__(self, srtt: float) -> None:
        self.eager = True  # we push to it (until it PRUNEs us)
        self.inbound = True  # it pushes to us (until we PRUNE it); with ``directed`` off
        # both flags move together (a tree edge both ways)
        self.score = 0.0  # first deliveries, decayed (see PlumtreePolicy.first_memory)
        self.srtt = srtt
        self.unacked: dict[bytes, _Pending] = {}
        self.ack_out: list[bytes] = []
        self.ack_again: list[bytes] = []
        self.ihave_out: list[tuple[bytes, int]] = []
        self.out: list[Frame] = []
        self.graft_ids: list[bytes] = []
        self.relink: list[bytes] = []  # link-up announcement not yet known to have landed
        self.relink_at = 0.0
        self.relink_tries = 0


class _Entry:
    __slots__ = ("hops", "known", "parent", "payload", "pushers", "t")

    def __init__(self, payload: bytes, hops: int, parent: bytes | None, t: float) -> None:
        self.payload = payload
        self.hops = hops
        self.parent = parent
        self.t = t
        # Neighbours known to hold it (pushed, announced or ACKed it): no re-announce.
        self.known: set[bytes] = set() if parent is None else {parent}
        # Neighbours that pushed it to us (the first is the parent).
        self.pushers: set[bytes] = set() if parent is None else {parent}


class _Missing:
    __slots__ = ("announcers", "tries")

    def __init__(self) -> None:
        self.announcers: list[tuple[bytes, int]] = []
        self.tries = 0


_RTO = 0
_GRAFT = 1
_REANNOUNCE = 2
_RELINK = 3


class _Counters(msgspec.Struct):
    published: int = 0
    delivered: int = 0
    duplicates: int = 0
    retransmission_duplicates: int = 0
    pushes_sent: int = 0
    retransmits: int = 0
    retransmits_cancelled: int = 0
    graft_pushes: int = 0
    ihave_entries_sent: int = 0
    ihave_entries_received: int = 0
    grafts_sent: int = 0
    grafts_received: int = 0
    graft_misses: int = 0
    graft_gave_up: int = 0
    prunes_sent: int = 0
    prunes_received: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    acks_unknown: int = 0
    demotions: int = 0
    hop_shortcuts: int = 0
    over_hop_limit: int = 0
    duplicate_publishes: int = 0
    missing_dropped: int = 0
    queue_dropped: int = 0
    untracked_pushes: int = 0
    ids_truncated: int = 0
    bad_frames: int = 0
    unknown_peer_frames: int = 0
    peers_refused: int = 0
    cache_evicted: int = 0


class PlumtreeCore:
    """One node's Plumtree state (implements :class:`~.core.GossipCore`)."""

    def __init__(
        self, policy: PlumtreePolicy | None = None, *, seen: SeenFilter | None = None
    ) -> None:
        self.policy = p = policy or PlumtreePolicy()
        self._seen = seen or SeenFilter(
            bucket_seconds=p.seen_bucket_seconds, buckets=p.seen_buckets, max_ids=p.seen_max_ids
        )
        self._peers: dict[bytes, _Peer] = {}
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._cache_size = 0
        self._missing: dict[bytes, _Missing] = {}
        self._timers: list[tuple[float, int, int, bytes, bytes]] = []
        self._seq = 0
        self._ack_at: float | None = None
        self._ihave_at: float | None = None
        self._ack_due = False
        self._ihave_due = False
        self._recent: deque[bytes] = deque()
        self._reannounce_armed = False
        self._dirty: dict[bytes, None] = {}
        self._ack_peers: dict[bytes, None] = {}
        self._ihave_peers: dict[bytes, None] = {}
        self._out: list[Send | Deliver] = []
        self._now = 0.0  # the latest time an entry point was given (poll has none)
        self._inc = 1.0  # growing increment: scores decay without touching every peer
        self._eager_n = 0  # eager edges, as of the last tick (see tick)
        self._retx = 0.0  # share of eager pushes retransmitted lately (see flood_hops_lossy)
        self._c = _Counters()

    # ------------------------------------------------------------------ links
    def link_up(self, now: float, peer: bytes) -> None:
        if peer in self._peers:
            return
        if len(self._peers) >= self.policy.max_peers:
            self._c.peers_refused += 1
            return
        st = self._peers[peer] = _Peer(self.policy.initial_rtt)
        self._eager_n += 1
        # What it may have missed while away: announce the newest ids (it GRAFTs what it
        # lacks); anti-entropy sync covers anything older.
        # The newest are picked, then announced oldest first: the peer GRAFTs (and
        # stores, and shows its users) in that order, the order they were sent in.
        p = self.policy
        picked: list[tuple[bytes, int]] = []
        for mid in reversed(self._cache):
            e = self._cache[mid]
            if len(picked) >= p.relink_announce or now - e.t > p.relink_age:
                break
            picked.append((mid, e.hops))
        for mid, hops in reversed(picked):
            st.ihave_out.append((mid, hops))
            st.relink.append(mid)
        if picked:
            self._ihave_peers[peer] = None
            self._arm_ihave(now)
            if p.relink_tries > 0:
                st.relink_at = now + p.reannounce_interval
                self._timer(st.relink_at, _RELINK, peer, b"")

    def link_down(self, now: float, peer: bytes) -> None:
        st = self._peers.pop(peer, None)
        if st is not None and st.inbound:
            self._eager_n -= 1
        self._dirty.pop(peer, None)
        self._ack_peers.pop(peer, None)
        self._ihave_peers.pop(peer, None)
        # Announcers on that link are skipped when their GRAFT turn comes.

    def set_rtt(self, peer: bytes, rtt: float) -> None:
        """Seed a peer's SRTT from a measurement outside the core (the link's ping)."""
        st = self._peers.get(peer)
        if st is not None and rtt > 0:
            st.srtt = rtt

    # ------------------------------------------------------------------ publish / receive
    def publish(self, now: float, msg_id: bytes, payload: bytes) -> None:
        self._now = now
        if len(msg_id) != MSG_ID_LEN:
            raise ValueError(f"msg_id must be {MSG_ID_LEN} bytes")
        if not self._seen.add(now, msg_id):
            self._c.duplicate_publishes += 1
            return
        self._c.published += 1
        self._out.append(Deliver(msg_id, payload, 0, None))
        self._accept(now, msg_id, payload, 0, None)

    def inject(self, now: float, msg_id: bytes, payload: bytes, peer: bytes | None) -> bool:
        """A message this node got outside the tree (inventory sync with ``peer``): a
        first reception, pushed on eager edges and announced on lazy ones as if a Push
        from ``peer`` had brought it -- not flooded to every edge as a publish is, and
        not sent back to ``peer``. Not delivered (the caller stored it already). False
        if it was seen here before."""
        self._now = now
        if len(msg_id) != MSG_ID_LEN:
            raise ValueError(f"msg_id must be {MSG_ID_LEN} bytes")
        if not self._seen.add(now, msg_id):
            return False
        m = self._missing.pop(msg_id, None)
        self._accept(now, msg_id, payload, max(1, self.policy.flood_hops), peer, m)
        return True

    def receive(self, now: float, peer: bytes, frames: Sequence[Frame]) -> None:
        self._now = now
        st = self._peers.get(peer)
        if st is None:
            self.link_up(now, peer)
            st = self._peers.get(peer)
            if st is None:
                self._c.unknown_peer_frames += len(frames)
                return
        for f in frames:
            if isinstance(f, Push):
                self._on_push(now, peer, st, f)
            elif isinstance(f, IHave):
                self._on_ihave(now, peer, st, f)
            elif isinstance(f, Ack):
                self._on_ack(now, peer, st, f)
            elif isinstance(f, Graft):
                self._on_graft(now, peer, st, f)
            elif isinstance(f, Prune):
                self._c.prunes_received += 1
                st.eager = False
                if not self.policy.directed:
                    st.inbound = False
            else:
                self._c.bad_frames += 1

    def _ids(self, ids: Sequence[bytes]) -> Sequence[bytes]:
        cap = self.policy.max_ids_per_frame
        if len(ids) > cap:
            self._c.ids_truncated += len(ids) - cap
            return ids[:cap]
        return ids

    def _on_push(self, now: float, peer: bytes, st: _Peer, f: Push) -> None:
        mid = f.msg_id
        if len(mid) != MSG_ID_LEN or not 0 < f.hops <= 255 or not isinstance(f.payload, bytes):
            self._c.bad_frames += 1
            return
        self._queue_ack(now, peer, st, mid)
        if self._seen.add(now, mid):
            st.inbound = True
            if not self.policy.directed:
                st.eager = True
            st.score += self._inc
            self._inc /= self.policy.first_memory
            if self._inc > 1e200:
                self._renormalise()
            self._c.delivered += 1
            m = self._missing.pop(mid, None)
            self._out.append(Deliver(mid, f.payload, f.hops, peer))
            self._accept(now, mid, f.payload, f.hops, peer, m)
            return
        self._c.duplicates += 1
        # It holds the message: whatever we still had in flight to it is done.
        st.unacked.pop(mid, None)
        e = self._cache.get(mid)
        if e is None:
            pass
        elif peer in e.pushers:
            # Our ACK was lost and it retransmitted: re-ACKed above, edge kept.
            self._c.retransmission_duplicates += 1
            return
        else:
            e.known.add(peer)
            e.pushers.add(peer)
            if st.inbound and not self._surplus(st):
                return  # one of the few redundant edges kept: a lost push elsewhere
        # PRUNEd again when a pruned sender still pushes: our PRUNE may have been lost.
        self._unwant(st)
        st.out.append(Prune())
        self._dirty[peer] = None
        self._c.prunes_sent += 1

    def _queue_ack(self, now: float, peer: bytes, st: _Peer, mid: bytes) -> None:
        if len(st.ack_out) < self.policy.max_queued:
            st.ack_out.append(mid)
            self._ack_peers[peer] = None
            if self._ack_at is None:
                self._ack_at = now + self.policy.ack_delay
        else:
            self._c.queue_dropped += 1

    def _accept(
        self,
        now: float,
        mid: bytes,
        payload: bytes,
        hops: int,
        parent: bytes | None,
        missing: _Missing | None = None,
    ) -> None:
        """A first reception (or publish): cache it, push on eager edges, announce on lazy."""
        e = _Entry(payload, hops, parent, now)
        known = e.known
        if missing is not None:
            known.update(a for a, _ in missing.announcers)
        self._cache_put(now, mid, e)
        if hops >= self.policy.max_hops:
            self._c.over_hop_limit += 1
            return
        if self.policy.reannounce_window > 0:
            self._recent.append(mid)
            if not self._reannounce_armed:
                self._reannounce_armed = True
                self._timer(now + self.policy.reannounce_interval, _REANNOUNCE, b"", b"")
        nh = hops + 1
        push: Push | None = None
        maxq = self.policy.max_queued
        p = self.policy
        flood = hops < (p.flood_hops_lossy if self._retx > p.lossy_retransmit else p.flood_hops)
        for pid, st in self._peers.items():
            if pid in known:
                continue
            if st.eager or flood:
                if push is None:
                    push = Push(mid, nh, payload)
                self._push(now, pid, st, push)
            elif len(st.ihave_out) < maxq:
                st.ihave_out.append((mid, hops))
                self._ihave_peers[pid] = None
            else:
                self._c.queue_dropped += 1
        if self._ihave_peers and self._ihave_at is None:
            self._arm_ihave(now)

    def _rto(self, st: _Peer, tries: int) -> float:
        p = self.policy
        return min(max(p.rto_factor * st.srtt, p.rto_min) * (1 + tries), p.rto_max)

    def _push(self, now: float, pid: bytes, st: _Peer, push: Push) -> None:
        un = st.unacked
        if push.msg_id in un:
            return  # already in flight to it (a repeated GRAFT): its timer runs
        st.out.append(push)
        self._dirty[pid] = None
        self._c.pushes_sent += 1
        if len(un) >= self.policy.max_unacked:
            self._c.untracked_pushes += 1
            return
        at = now + self._rto(st, 0)
        un[push.msg_id] = _Pending(push, now, at)
        self._timer(at, _RTO, pid, push.msg_id)

    def _on_ack(self, now: float, peer: bytes, st: _Peer, f: Ack) -> None:
        self._c.acks_received += 1
        un = st.unacked
        cache = self._cache
        for mid in self._ids(f.msg_ids):
            rec = un.pop(mid, None) if isinstance(mid, bytes) else None
            e = cache.get(mid) if isinstance(mid, bytes) else None
            if e is not None:
                e.known.add(peer)  # it holds it (also an ACK answering a re-announce)
            if rec is None:
                self._c.acks_unknown += 1
                continue
            if rec.tries == 0:  # Karn: only never-retransmitted pushes give a sample
                st.srtt = 0.875 * st.srtt + 0.125 * (now - rec.sent)
                self._retx -= self.policy.loss_memory * self._retx

    def _surplus(self, st: _Peer) -> bool:
        """More eager edges than wanted, and `st` is not among the best of them."""
        keep = self.policy.eager_degree
        eager = 0
        better = 0
        for s in self._peers.values():
            if s.inbound:
                eager += 1
                if s is not st and s.score >= st.score:
                    better += 1
        return eager > keep and better >= keep

    def _want(self, st: _Peer) -> None:
        """It is to push to us (we GRAFT it)."""
        st.inbound = True
        if not self.policy.directed:
            st.eager = True

    def _unwant(self, st: _Peer) -> None:
        """It is to stop pushing to us (we PRUNE it)."""
        st.inbound = False
        if not self.policy.directed:
            st.eager = False

    def _renormalise(self) -> None:
        for s in self._peers.values():
            s.score /= self._inc
        self._inc = 1.0

    def _on_ihave(self, now: float, peer: bytes, st: _Peer, f: IHave) -> None:
        if not st.inbound and f.entries and self._eager_n < self.policy.eager_degree:
            # Fewer eager edges than wanted (pruned, demoted or gone down): a live lazy
            # neighbour becomes a tree edge again.
            self._want(st)
            st.out.append(Graft(()))
            self._c.grafts_sent += 1
            self._dirty[peer] = None
            self._eager_n += 1
        entries = f.entries
        cap = self.policy.max_ids_per_frame
        if len(entries) > cap:
            self._c.ids_truncated += len(entries) - cap
            entries = entries[:cap]
        self._c.ihave_entries_received += len(entries)
        p = self.policy
        seen = self._seen
        cache = self._cache
        for ent in entries:
            try:
                mid, hops = ent
            except (TypeError, ValueError):
                self._c.bad_frames += 1
                continue
            if not isinstance(mid, bytes) or len(mid) != MSG_ID_LEN or not isinstance(hops, int):
                self._c.bad_frames += 1
                continue
            e = cache.get(mid)  # cheaper than the seen-filter, and the common case
            if e is not None or mid in seen:
                if e is not None:
                    # It holds it: a push still awaiting its ACK would only be a
                    # duplicate when retransmitted.
                    if st.unacked.pop(mid, None) is not None:
                        self._c.retransmits_cancelled += 1
                    if peer in e.known:
                        # Announced again: it does not know we hold it (our IHAVE or
                        # ACK was lost). One ACK stops its re-announcing.
                        self._queue_ack(now, peer, st, mid)
                    e.known.add(peer)
                if (
                    p.hop_shortcut
                    and e is not None
                    and e.parent is not None
                    and e.parent != peer
                    and e.hops - (hops + 1) >= p.hop_shortcut
                ):
                    # A much shorter path: make it the tree edge and prune the old parent.
                    self._c.hop_shortcuts += 1
                    old_id = e.parent
                    old = self._peers.get(old_id)
                    e.parent = peer
                    e.pushers.discard(old_id)
                    e.pushers.add(peer)
                    e.hops = hops + 1
                    if not st.inbound:
                        self._want(st)
                        st.out.append(Graft(()))
                        self._c.grafts_sent += 1
                        self._dirty[peer] = None
                    if old is not None and old.inbound:
                        self._unwant(old)
                        old.out.append(Prune())
                        self._c.prunes_sent += 1
                        self._dirty[old_id] = None
                continue
            m = self._missing.get(mid)
            if m is None:
                if len(self._missing) >= p.max_missing:
                    self._c.missing_dropped += 1
                    continue
                m = self._missing[mid] = _Missing()
                self._timer(now + p.graft_timeout, _GRAFT, b"", mid)
            if len(m.announcers) < p.max_announcers and all(a != peer for a, _ in m.announcers):
                m.announcers.append((peer, hops))

    def _on_graft(self, now: float, peer: bytes, st: _Peer, f: Graft) -> None:
        self._c.grafts_received += 1
        st.eager = True
        if not self.policy.directed:
            st.inbound = True
        for mid in self._ids(f.msg_ids):
            e = self._cache.get(mid) if isinstance(mid, bytes) else None
            if e is None:
                self._c.graft_misses += 1
                continue
            self._c.graft_pushes += 1
            self._push(now, peer, st, Push(mid, e.hops + 1, e.payload))

    # ------------------------------------------------------------------ timers
    def _timer(self, at: float, kind: int, peer: bytes, mid: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at, self._seq, kind, peer, mid))

    def _arm_ihave(self, now: float) -> None:
        if self._ihave_at is None:
            self._ihave_at = now + self.policy.ihave_delay

    def next_deadline(self) -> float | None:
        d = self._timers[0][0] if self._timers else None
        for t in (self._ack_at, self._ihave_at):
            if t is not None and (d is None or t < d):
                d = t
        return d

    def tick(self, now: float) -> None:
        self._now = now
        # Recounted here, not on every flag change: the under-degree GRAFT may act on a
        # count one timer round old.
        self._eager_n = sum(1 for s in self._peers.values() if s.inbound)
        if self._ack_at is not None and self._ack_at <= now:
            self._ack_at = None
            self._ack_due = True
        if self._ihave_at is not None and self._ihave_at <= now:
            self._ihave_at = None
            self._ihave_due = True
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, peer, mid = heapq.heappop(timers)
            if kind == _RTO:
                self._on_rto(now, peer, mid)
            elif kind == _GRAFT:
                self._on_graft_timer(now, mid)
            elif kind == _RELINK:
                self._relink(now, peer)
            else:
                self._reannounce(now)
        self._expire_cache(now)

    def _on_rto(self, now: float, pid: bytes, mid: bytes) -> None:
        st = self._peers.get(pid)
        if st is None:
            return
        rec = st.unacked.get(mid)
        if rec is None or now < rec.deadline:
            return  # ACKed, or a stale timer
        if rec.tries >= self.policy.retries:
            # The edge is not carrying: demote it and announce instead (it GRAFTs).
            del st.unacked[mid]
            self._c.demotions += st.eager
            st.eager = False
            if not self.policy.directed:
                st.inbound = False
            if len(st.ihave_out) < self.policy.max_queued:
                st.ihave_out.append((mid, rec.push.hops - 1))
                self._ihave_peers[pid] = None
                self._arm_ihave(now)
            return
        self._c.retransmits += 1
        if rec.tries == 0:
            self._retx += self.policy.loss_memory * (1.0 - self._retx)
        rec.tries += 1
        rec.deadline = now + self._rto(st, rec.tries)
        st.out.append(rec.push)
        self._dirty[pid] = None
        self._timer(rec.deadline, _RTO, pid, mid)

    def _relink(self, now: float, pid: bytes) -> None:
        """Announce again what the link-up IHAVE offered and the peer is not known to hold."""
        st = self._peers.get(pid)
        if st is None or now < st.relink_at or not st.relink:
            return  # gone, or a timer of an earlier link-up
        cache = self._cache
        left = []
        for mid in st.relink:
            e = cache.get(mid)
            if e is not None and pid not in e.known and mid not in st.unacked:
                left.append(mid)
        p = self.policy
        st.relink_tries += 1
        if not left or st.relink_tries > p.relink_tries:
            st.relink = []
            return
        st.relink = left
        for mid in left:
            if len(st.ihave_out) >= p.max_queued:
                self._c.queue_dropped += 1
                break
            st.ihave_out.append((mid, cache[mid].hops))
        self._ihave_peers[pid] = None
        self._arm_ihave(now)
        st.relink_at = now + p.reannounce_interval * (2**st.relink_tries)
        self._timer(st.relink_at, _RELINK, pid, b"")

    def _reannounce(self, now: float) -> None:
        p = self.policy
        cache = self._cache
        limit = now - p.reannounce_window
        maxq = p.max_queued
        peers = self._peers
        keep: deque[bytes] = deque()
        for mid in self._recent:
            e = cache.get(mid)
            if e is None or e.t <= limit:
                continue
            if len(e.known) >= len(peers) and all(pid in e.known for pid in peers):
                continue  # every neighbour holds it: never again (the common case)
            keep.append(mid)
            for pid, st in peers.items():
                if pid in e.known or mid in st.unacked or len(st.ihave_out) >= maxq:
                    continue
                st.ihave_out.append((mid, e.hops))
                self._ihave_peers[pid] = None
        self._recent = keep
        if self._ihave_peers:
            self._arm_ihave(now)
        if keep:
            self._timer(now + p.reannounce_interval, _REANNOUNCE, b"", b"")
        else:
            self._reannounce_armed = False

    def _on_graft_timer(self, now: float, mid: bytes) -> None:
        m = self._missing.get(mid)
        if m is None:
            return
        if mid in self._seen:
            del self._missing[mid]
            return
        p = self.policy
        if m.tries >= p.graft_tries:
            del self._missing[mid]
            self._c.graft_gave_up += 1
            return
        m.tries += 1
        # Rotate over the announcers that are still linked.
        for _ in range(len(m.announcers)):
            peer, hops = m.announcers.pop(0)
            st = self._peers.get(peer)
            if st is None:
                continue
            m.announcers.append((peer, hops))
            self._want(st)
            st.graft_ids.append(mid)
            self._dirty[peer] = None
            self._c.grafts_sent += 1
            break
        if not m.announcers:
            del self._missing[mid]
            self._c.graft_gave_up += 1
            return
        self._timer(now + p.graft_retry, _GRAFT, b"", mid)

    # ------------------------------------------------------------------ cache
    def _cache_put(self, now: float, mid: bytes, e: _Entry) -> None:
        self._cache[mid] = e
        self._cache_size += len(e.payload)
        p = self.policy
        cache = self._cache
        while cache and (self._cache_size > p.cache_bytes or len(cache) > p.cache_entries):
            _, old = cache.popitem(last=False)
            self._cache_size -= len(old.payload)
            self._c.cache_evicted += 1

    def _expire_cache(self, now: float) -> None:
        cache = self._cache
        limit = now - self.policy.cache_age
        while cache:
            mid = next(iter(cache))
            e = cache[mid]
            if e.t > limit:
                break
            del cache[mid]
            self._cache_size -= len(e.payload)

    def holding(self) -> Iterable[tuple[bytes, bytes]]:
        return [(mid, e.payload) for mid, e in self._cache.items()]

    def has(self, msg_id: bytes) -> bool:
        """Whether this node has seen ``msg_id`` (delivered or published)."""
        return msg_id in self._seen

    # ------------------------------------------------------------------ output
    def poll(self) -> list[Send | Deliver]:
        peers = self._dirty
        if self._ack_due:
            self._ack_due = False
            peers.update(self._ack_peers)
            ack_all = True
        else:
            ack_all = False
        if self._ihave_due:
            self._ihave_due = False
            peers.update(self._ihave_peers)
            ihave_all = True
        else:
            ihave_all = False
        out = self._out
        rearm = False
        if peers:
            chunk = self.policy.ids_per_sent_frame
            for pid in peers:
                st = self._peers.get(pid)
                if st is None:
                    continue
                frames: list[Frame] = st.out
                st.out = []
                if st.graft_ids:
                    ids = st.graft_ids
                    st.graft_ids = []
                    for i in range(0, len(ids), chunk):
                        frames.append(Graft(tuple(ids[i : i + chunk])))
                # ACKs and IHAVEs ride along with anything sent, else wait for their batch.
                if (st.ack_out or st.ack_again) and (ack_all or frames):
                    new, again = st.ack_out, st.ack_again
                    ids = again + new if again else new
                    st.ack_out = []
                    st.ack_again = new if self.policy.ack_repeat else []
                    if st.ack_again:
                        self._ack_peers[pid] = None
                        rearm = True
                    else:
                        self._ack_peers.pop(pid, None)
                    for i in range(0, len(ids), chunk):
                        frames.append(Ack(tuple(ids[i : i + chunk])))
                        self._c.acks_sent += 1
                if st.ihave_out and (ihave_all or frames):
                    ents = st.ihave_out
                    st.ihave_out = []
                    self._ihave_peers.pop(pid, None)
                    self._c.ihave_entries_sent += len(ents)
                    for i in range(0, len(ents), chunk):
                        frames.append(IHave(tuple(ents[i : i + chunk])))
                if frames:
                    out.append(Send(pid, tuple(frames)))
            peers.clear()
        if rearm and self._ack_at is None:
            self._ack_at = self._now + self.policy.ack_delay
        self._out = []
        return out

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> PlumtreeStatistics:
        c = self._c
        return PlumtreeStatistics(
            peers=len(self._peers),
            eager_peers=sum(1 for s in self._peers.values() if s.inbound),
            pushing_to=sum(1 for s in self._peers.values() if s.eager),
            cache_entries=len(self._cache),
            cache_bytes=self._cache_size,
            missing=len(self._missing),
            unacked=sum(len(s.unacked) for s in self._peers.values()),
            published=c.published,
            delivered=c.delivered,
            duplicates=c.duplicates,
            retransmission_duplicates=c.retransmission_duplicates,
            pushes_sent=c.pushes_sent,
            retransmits=c.retransmits,
            retransmits_cancelled=c.retransmits_cancelled,
            graft_pushes=c.graft_pushes,
            ihave_entries_sent=c.ihave_entries_sent,
            ihave_entries_received=c.ihave_entries_received,
            grafts_sent=c.grafts_sent,
            grafts_received=c.grafts_received,
            graft_misses=c.graft_misses,
            graft_gave_up=c.graft_gave_up,
            prunes_sent=c.prunes_sent,
            prunes_received=c.prunes_received,
            acks_sent=c.acks_sent,
            acks_received=c.acks_received,
            acks_unknown=c.acks_unknown,
            demotions=c.demotions,
            hop_shortcuts=c.hop_shortcuts,
            over_hop_limit=c.over_hop_limit,
            duplicate_publishes=c.duplicate_publishes,
            missing_dropped=c.missing_dropped,
            queue_dropped=c.queue_dropped,
            untracked_pushes=c.untracked_pushes,
            ids_truncated=c.ids_truncated,
            bad_frames=c.bad_frames,
            unknown_peer_frames=c.unknown_peer_frames,
            peers_refused=c.peers_refused,
            cache_evicted=c.cache_evicted,
            seen=self._seen.statistics(),
        )
