"""Prometheus families of broadcast delivery (``qpc_gossip_*``, from the gossip driver
and its Plumtree core and seen-filter) and of inventory sync (``qpc_sync_*``, from the
Syncer's core), read from their typed ``statistics()`` at scrape time.

Few families, labelled by reason / role / direction rather than one metric per field:
an operator of a big mesh graphs ``qpc_gossip_pushes_dropped_total`` by ``reason`` or
``qpc_sync_sessions_total`` by ``role, outcome`` without knowing the field names.
Every label set is fixed here (bounded), except sync refusal reasons, which are the
``SyncRefusal.Reason`` enum names; a number a peer sends outside that enum is shown as
``other`` so a neighbour cannot grow the label set. Sources are Protocols: this module
imports no outer layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from qpc_node.ops.prom import counter_family as _counter
from qpc_node.ops.prom import gauge_family as _gauge

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, Metric


class SeenStats(Protocol):
    @property
    def ids(self) -> int: ...
    @property
    def expired_ids(self) -> int: ...
    @property
    def evicted_ids(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...


class PlumtreeStats(Protocol):
    @property
    def peers(self) -> int: ...
    @property
    def eager_peers(self) -> int: ...
    @property
    def cache_entries(self) -> int: ...
    @property
    def cache_bytes(self) -> int: ...
    @property
    def missing(self) -> int: ...
    @property
    def unacked(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def retransmission_duplicates(self) -> int: ...
    @property
    def duplicate_publishes(self) -> int: ...
    @property
    def pushes_sent(self) -> int: ...
    @property
    def retransmits(self) -> int: ...
    @property
    def graft_pushes(self) -> int: ...
    @property
    def ihave_entries_sent(self) -> int: ...
    @property
    def ihave_entries_received(self) -> int: ...
    @property
    def grafts_sent(self) -> int: ...
    @property
    def grafts_received(self) -> int: ...
    @property
    def graft_misses(self) -> int: ...
    @property
    def graft_gave_up(self) -> int: ...
    @property
    def prunes_sent(self) -> int: ...
    @property
    def prunes_received(self) -> int: ...
    @property
    def acks_sent(self) -> int: ...
    @property
    def acks_received(self) -> int: ...
    @property
    def demotions(self) -> int: ...
    @property
    def hop_shortcuts(self) -> int: ...
    @property
    def over_hop_limit(self) -> int: ...
    @property
    def missing_dropped(self) -> int: ...
    @property
    def queue_dropped(self) -> int: ...
    @property
    def untracked_pushes(self) -> int: ...
    @property
    def ids_truncated(self) -> int: ...
    @property
    def bad_frames(self) -> int: ...
    @property
    def unknown_peer_frames(self) -> int: ...
    @property
    def peers_refused(self) -> int: ...
    @property
    def cache_evicted(self) -> int: ...
    @property
    def seen(self) -> SeenStats: ...


class GossipStats(Protocol):
    @property
    def calls_in(self) -> int: ...
    @property
    def malformed_calls(self) -> int: ...
    @property
    def calls_out(self) -> int: ...
    @property
    def call_failures(self) -> int: ...
    @property
    def frames_in(self) -> int: ...
    @property
    def frames_out(self) -> int: ...
    @property
    def frames_dropped_bad_id(self) -> int: ...
    @property
    def frames_dropped_bad_hops(self) -> int: ...
    @property
    def frames_dropped_too_many_ids(self) -> int: ...
    @property
    def frames_dropped_too_large(self) -> int: ...
    @property
    def frames_dropped_empty(self) -> int: ...
    @property
    def pushes_rate_limited(self) -> int: ...
    @property
    def pushes_over_hops(self) -> int: ...
    @property
    def pushes_invalid(self) -> int: ...
    @property
    def pushes_id_mismatch(self) -> int: ...
    @property
    def queue_dropped(self) -> int: ...
    @property
    def published(self) -> int: ...
    @property
    def delivered(self) -> int: ...
    @property
    def deliver_failures(self) -> int: ...
    @property
    def link_ups(self) -> int: ...
    @property
    def link_downs(self) -> int: ...
    @property
    def core(self) -> PlumtreeStats: ...


class GossipSource(Protocol):
    def statistics(self) -> GossipStats: ...


class SyncStats(Protocol):
    @property
    def sessions_initiated(self) -> int: ...
    @property
    def sessions_completed(self) -> int: ...
    @property
    def sessions_capped(self) -> int: ...
    @property
    def sessions_failed(self) -> int: ...
    @property
    def sessions_served(self) -> int: ...
    @property
    def sessions_open(self) -> int: ...
    @property
    def rounds(self) -> int: ...
    @property
    def bytes_sent(self) -> int: ...
    @property
    def bytes_received(self) -> int: ...
    @property
    def ids_have(self) -> int: ...
    @property
    def ids_need(self) -> int: ...
    @property
    def items_pushed(self) -> int: ...
    @property
    def items_taken(self) -> int: ...
    @property
    def snapshots(self) -> int: ...
    @property
    def snapshot_truncated(self) -> int: ...
    @property
    def refusals_sent(self) -> Mapping[str, int]: ...
    @property
    def refusals_received(self) -> Mapping[str, int]: ...
    @property
    def bad_answers(self) -> int: ...
    @property
    def last_session_s(self) -> float | None: ...


class SyncerSource(Protocol):
    def statistics(self) -> SyncStats: ...


def _labelled(
    name: str, doc: str, label: str, values: Iterable[tuple[str, int]]
) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    fam = CounterMetricFamily(name, doc, labels=[label])
    for value, n in values:
        fam.add_metric([value], n)
    return fam


def gossip_families(g: GossipStats) -> Iterator[Metric]:
    """The gossip driver (storefwd/gossip.py) and its Plumtree core (storefwd/plumtree.py)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    p, s = g.core, g.core.seen
    peers = GaugeMetricFamily(
        "qpc_gossip_peers",
        "gossip neighbours by edge: eager (spanning tree, pushed to) or lazy (IHAVE only)",
        labels=["edge"],
    )
    peers.add_metric(["eager"], p.eager_peers)
    peers.add_metric(["lazy"], p.peers - p.eager_peers)
    yield peers
    calls = CounterMetricFamily(
        "qpc_gossip_calls",
        "Federation/Gossip calls: in (served; malformed ones refused whole), out (made;"
        " failed ones are lost like a radio frame and repaired by ACK/IHAVE/GRAFT)",
        labels=["direction", "result"],
    )
    calls.add_metric(["in", "ok"], g.calls_in - g.malformed_calls)
    calls.add_metric(["in", "malformed"], g.malformed_calls)
    calls.add_metric(["out", "ok"], g.calls_out - g.call_failures)
    calls.add_metric(["out", "failed"], g.call_failures)
    yield calls
    yield _labelled(
        "qpc_gossip_frames",
        "gossip frames (push, ihave, graft, prune, ack) accepted from / handed to neighbours",
        "direction",
        (("in", g.frames_in), ("out", g.frames_out)),
    )
    yield _labelled(
        "qpc_gossip_frames_dropped",
        "gossip frames dropped before the core: by the wire checks, malformed for the core,"
        " or from a neighbour the core does not know",
        "reason",
        (
            ("bad_id", g.frames_dropped_bad_id),
            ("bad_hops", g.frames_dropped_bad_hops),
            ("too_many_ids", g.frames_dropped_too_many_ids),
            ("too_large", g.frames_dropped_too_large),
            ("empty", g.frames_dropped_empty),
            ("malformed", p.bad_frames),
            ("unknown_peer", p.unknown_peer_frames),
        ),
    )
    yield _labelled(
        "qpc_gossip_pushes_dropped",
        "pushes (channel messages) refused by the relay checks, nothing stored or forwarded:"
        " invalid (channel checks: size, expiry, hop limit), id_mismatch (msg_id not the"
        " message's), over_hops (beyond gossip max hops), rate_limited (per neighbour)",
        "reason",
        (
            ("invalid", g.pushes_invalid),
            ("id_mismatch", g.pushes_id_mismatch),
            ("over_hops", g.pushes_over_hops),
            ("rate_limited", g.pushes_rate_limited),
        ),
    )
    yield _labelled(
        "qpc_gossip_messages",
        "channel messages: published here, delivered (first reception, handed to the"
        " channel store), deliver_failed (the store refused it), duplicate_publish",
        "outcome",
        (
            ("published", g.published),
            ("delivered", g.delivered),
            ("deliver_failed", g.deliver_failures),
            ("duplicate_publish", p.duplicate_publishes),
        ),
    )
    yield _labelled(
        "qpc_gossip_duplicates",
        "pushes received for a message already seen: retransmission (our ACK was lost),"
        " other (a redundant edge; usually PRUNEd)",
        "cause",
        (
            ("retransmission", p.retransmission_duplicates),
            ("other", p.duplicates - p.retransmission_duplicates),
        ),
    )
    yield _labelled(
        "qpc_gossip_pushes_sent",
        "payload transmissions: push (first sends on eager edges and GRAFT answers),"
        " retransmit (no ACK within the RTO)",
        "kind",
        (("push", p.pushes_sent), ("retransmit", p.retransmits)),
    )
    control = CounterMetricFamily(
        "qpc_gossip_control",
        "control traffic: ihave (announced ids), graft, prune and ack (frames; one ACK frame"
        " acknowledges a batch of ids)",
        labels=["frame", "direction"],
    )
    for frame, sent, received in (
        ("ihave", p.ihave_entries_sent, p.ihave_entries_received),
        ("graft", p.grafts_sent, p.grafts_received),
        ("prune", p.prunes_sent, p.prunes_received),
        ("ack", p.acks_sent, p.acks_received),
    ):
        control.add_metric([frame, "sent"], sent)
        control.add_metric([frame, "received"], received)
    yield control
    yield _labelled(
        "qpc_gossip_repairs",
        "tree repair: graft_answered (ids pushed for a GRAFT), graft_missed (asked for an"
        " id no longer cached), graft_gave_up (no announcer answered), demotion (an eager"
        " edge that stopped ACKing), hop_shortcut (a shorter path GRAFTed)",
        "event",
        (
            ("graft_answered", p.graft_pushes),
            ("graft_missed", p.graft_misses),
            ("graft_gave_up", p.graft_gave_up),
            ("demotion", p.demotions),
            ("hop_shortcut", p.hop_shortcuts),
        ),
    )
    yield _labelled(
        "qpc_gossip_limited",
        "work cut by a bound: outbox (frames to a neighbour over the queue), queue (ACK/IHAVE"
        " ids over the per-peer queue), missing (announced ids over the pending cap),"
        " ids_truncated (ids over the per-frame cap), untracked (pushes over the unacked"
        " cap: no retransmission), peers_refused, cache_evicted, max_hops (not forwarded)",
        "what",
        (
            ("outbox", g.queue_dropped),
            ("queue", p.queue_dropped),
            ("missing", p.missing_dropped),
            ("ids_truncated", p.ids_truncated),
            ("untracked", p.untracked_pushes),
            ("peers_refused", p.peers_refused),
            ("cache_evicted", p.cache_evicted),
            ("max_hops", p.over_hop_limit),
        ),
    )
    yield _gauge("qpc_gossip_unacked", "pushes in flight awaiting a per-hop ACK", p.unacked)
    yield _gauge(
        "qpc_gossip_missing", "announced messages not yet received (GRAFT pending)", p.missing
    )
    yield _gauge("qpc_gossip_cache_entries", "messages cached to answer GRAFTs", p.cache_entries)
    yield _gauge("qpc_gossip_cache_bytes", "payload bytes cached to answer GRAFTs", p.cache_bytes)
    yield _gauge("qpc_gossip_seen_ids", "message ids in the seen-filter", s.ids)
    yield _gauge("qpc_gossip_seen_bytes", "seen-filter memory (estimate)", s.memory_bytes)
    yield _labelled(
        "qpc_gossip_seen_dropped",
        "ids leaving the seen-filter: expired (bucket aged out) or evicted (over the id cap)",
        "reason",
        (("expired", s.expired_ids), ("evicted", s.evicted_ids)),
    )
    yield _labelled(
        "qpc_gossip_link_events",
        "federation links the gossip driver saw come up / go down",
        "event",
        (("up", g.link_ups), ("down", g.link_downs)),
    )


def _reason(name: str) -> str:
    """Enum names as they are; a number outside the enum (``reason_<n>``) as ``other``."""
    return "other" if name.startswith("reason_") else name


def sync_families(s: SyncStats) -> Iterator[Metric]:
    """Inventory sync (storefwd/sync.py core, storefwd/syncer.py driver)."""
    from prometheus_client.core import CounterMetricFamily

    sessions = CounterMetricFamily(
        "qpc_sync_sessions",
        "sync sessions (one per scope) by role: initiator (opened here: started, then"
        " completed, capped at the round/id cap, or failed), responder (served here)",
        labels=["role", "outcome"],
    )
    for role, outcome, n in (
        ("initiator", "started", s.sessions_initiated),
        ("initiator", "completed", s.sessions_completed),
        ("initiator", "capped", s.sessions_capped),
        ("initiator", "failed", s.sessions_failed),
        ("responder", "served", s.sessions_served),
    ):
        sessions.add_metric([role, outcome], n)
    yield sessions
    yield _gauge("qpc_sync_sessions_open", "responder sessions open now", s.sessions_open)
    yield _counter("qpc_sync_rounds", "negentropy rounds, both roles", s.rounds)
    yield _labelled(
        "qpc_sync_bytes",
        "sync messages and item batches (protobuf bytes), both roles",
        "direction",
        (("sent", s.bytes_sent), ("received", s.bytes_received)),
    )
    yield _labelled(
        "qpc_sync_ids",
        "ids reconciliation found (initiator): have (we had, the peer lacked),"
        " need (the peer had, we lacked)",
        "side",
        (("have", s.ids_have), ("need", s.ids_need)),
    )
    yield _labelled(
        "qpc_sync_items",
        "items moved: pushed (handed to peers, pushes and fetch answers), taken (peer items"
        " our sources accepted)",
        "direction",
        (("pushed", s.items_pushed), ("taken", s.items_taken)),
    )
    refusals = CounterMetricFamily(
        "qpc_sync_refusals",
        "sync refusals by direction (sent by us, received from peers) and reason",
        labels=["direction", "reason"],
    )
    for direction, by_reason in (("sent", s.refusals_sent), ("received", s.refusals_received)):
        summed: dict[str, int] = {}
        for name, n in by_reason.items():
            summed[_reason(name)] = summed.get(_reason(name), 0) + n
        for reason, n in sorted(summed.items()):
            refusals.add_metric([direction, reason], n)
    yield refusals
    yield _counter(
        "qpc_sync_bad_answers", "malformed or oversized answers (initiator)", s.bad_answers
    )
    yield _labelled(
        "qpc_sync_snapshots",
        "responder snapshots read from a source; truncated: cut to the item cap",
        "result",
        (("read", s.snapshots), ("truncated", s.snapshot_truncated)),
    )
    if s.last_session_s is not None:
        yield _gauge(
            "qpc_sync_last_session_seconds",
            "duration of the last session this node completed",
            s.last_session_s,
        )
