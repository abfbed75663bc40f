"""Prometheus families of the mesh and the federation (peer table, routing, links,
relay, custody), from their typed ``statistics()``; split from :mod:`metrics` so
that module keeps the node's own layers. Sources are described by Protocols: this
module imports no outer layer either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from qpc_node.ops.prom import counter_family as _counter
from qpc_node.ops.prom import gauge_family as _gauge

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class PeerStats(Protocol):
    @property
    def peers(self) -> int: ...
    @property
    def up(self) -> int: ...
    @property
    def connecting(self) -> int: ...
    @property
    def backoff(self) -> int: ...
    @property
    def dial_failures(self) -> int: ...
    @property
    def liveness_timeouts(self) -> int: ...


class RoutingStats(Protocol):
    @property
    def destinations(self) -> int: ...
    @property
    def bindings(self) -> int: ...
    @property
    def updates_sent(self) -> int: ...
    @property
    def routes_accepted(self) -> int: ...
    @property
    def routes_refreshed(self) -> int: ...
    @property
    def routes_retracted(self) -> int: ...
    @property
    def routes_forged(self) -> int: ...
    @property
    def routes_expired(self) -> int: ...
    @property
    def routes_replayed(self) -> int: ...
    @property
    def routes_refused(self) -> int: ...
    @property
    def bindings_accepted(self) -> int: ...
    @property
    def bindings_forged(self) -> int: ...
    @property
    def bindings_expired(self) -> int: ...
    @property
    def bindings_replayed(self) -> int: ...
    @property
    def bindings_evicted(self) -> int: ...
    @property
    def bindings_restored(self) -> int: ...


class MeshStats(Protocol):
    @property
    def peers(self) -> PeerStats: ...
    @property
    def routing(self) -> RoutingStats: ...
    @property
    def updates_received(self) -> int: ...
    @property
    def updates_rejected(self) -> int: ...
    @property
    def announce_failures(self) -> int: ...
    @property
    def handovers_pending(self) -> int: ...


class MeshSource(Protocol):
    def statistics(self) -> MeshStats: ...


class NeighbourStats(Protocol):
    @property
    def node_id(self) -> bytes: ...
    @property
    def limited_calls(self) -> int: ...
    @property
    def relay_in(self) -> Mapping[str, int]: ...
    @property
    def relayed_out(self) -> int: ...
    @property
    def refused_out(self) -> Mapping[str, int]: ...
    @property
    def deferred_out(self) -> Mapping[str, int]: ...
    @property
    def queued_toward(self) -> int: ...


class StoreFwdStats(Protocol):
    @property
    def held_now(self) -> int: ...
    @property
    def held(self) -> int: ...
    @property
    def hold_refused(self) -> int: ...
    @property
    def evicted_expired(self) -> int: ...
    @property
    def evicted_delivered(self) -> int: ...
    @property
    def evicted_hops(self) -> int: ...
    @property
    def released(self) -> int: ...
    @property
    def expired_held(self) -> int: ...
    @property
    def rerouted(self) -> int: ...
    @property
    def rerouted_held(self) -> int: ...
    @property
    def expiry_too_far(self) -> int: ...
    @property
    def receipts_sent(self) -> int: ...
    @property
    def receipts_applied(self) -> int: ...
    @property
    def receipts_repeated(self) -> int: ...
    @property
    def receipts_unknown_msg(self) -> int: ...
    @property
    def receipts_forged(self) -> int: ...
    @property
    def receipts_wrong_home(self) -> int: ...
    @property
    def receipts_unknown_home(self) -> int: ...
    @property
    def receipts_malformed(self) -> int: ...
    @property
    def receipts_lost(self) -> int: ...
    @property
    def purged(self) -> int: ...
    @property
    def sprayed(self) -> int: ...


class FederationStats(Protocol):
    @property
    def links(self) -> int: ...
    @property
    def neighbours(self) -> Sequence[NeighbourStats]: ...
    @property
    def queued(self) -> int: ...
    @property
    def expired_in_custody(self) -> int: ...
    @property
    def send_failures(self) -> int: ...
    @property
    def trust_refusals(self) -> int: ...
    @property
    def link_ups(self) -> int: ...
    @property
    def link_downs(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def handed_over(self) -> int: ...
    @property
    def storefwd(self) -> StoreFwdStats: ...


class FederationSource(Protocol):
    def statistics(self) -> FederationStats: ...


NEIGHBOUR_LABELS = 8
"""Per-neighbour series at most (the largest values); the rest is summed as ``other``.
A mesh node may have many neighbours: label cardinality stays bounded."""


def _top_neighbours(
    name: str, doc: str, values: Iterable[tuple[bytes, int]], *, counter: bool
) -> Metric:
    """One series per neighbour (16 hex digits of its id) for the ``NEIGHBOUR_LABELS``
    largest non-zero values, and ``other`` for the rest."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    ranked = sorted(((v, nid) for nid, v in values if v > 0), key=lambda t: (-t[0], t[1]))
    fam: CounterMetricFamily | GaugeMetricFamily
    if counter:
        fam = CounterMetricFamily(name, doc, labels=["neighbour"])
    else:
        fam = GaugeMetricFamily(name, doc, labels=["neighbour"])
    for v, nid in ranked[:NEIGHBOUR_LABELS]:
        fam.add_metric([nid.hex()[:16]], v)
    fam.add_metric(["other"], sum(v for v, _ in ranked[NEIGHBOUR_LABELS:]))
    return fam


def _by_status(name: str, doc: str, maps: Iterable[Mapping[str, int]]) -> CounterMetricFamily:
    """Summed over neighbours; the statuses are the RelayStatus enum (bounded)."""
    from prometheus_client.core import CounterMetricFamily

    total: dict[str, int] = {}
    for m in maps:
        for status, n in m.items():
            total[status] = total.get(status, 0) + n
    fam = CounterMetricFamily(name, doc, labels=["status"])
    for status, n in sorted(total.items()):
        fam.add_metric([status], n)
    return fam


def mesh_families(m: MeshStats) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    p, r = m.peers, m.routing
    peers = GaugeMetricFamily("qpc_mesh_peers", "peer table entries by state", labels=["state"])
    for state, n in (
        ("up", p.up),
        ("connecting", p.connecting),
        ("backoff", p.backoff),
        ("discovered", p.peers - p.up - p.connecting - p.backoff),
    ):
        peers.add_metric([state], n)
    yield peers
    yield _counter("qpc_mesh_dial_failures", "federation dials that failed", p.dial_failures)
    yield _counter(
        "qpc_mesh_liveness_timeouts",
        "peers dropped as silent (no link activity)",
        p.liveness_timeouts,
    )
    yield _gauge("qpc_mesh_routes", "destination nodes with a selected route", r.destinations)
    yield _gauge("qpc_mesh_bindings", "home bindings known (user -> home node)", r.bindings)
    yield _counter("qpc_mesh_updates_sent", "route updates (announcements) sent", r.updates_sent)
    yield _counter(
        "qpc_mesh_announce_failures", "route updates a neighbour did not take", m.announce_failures
    )
    got = CounterMetricFamily(
        "qpc_mesh_updates_received",
        "route updates from neighbours: applied, or refused whole (undecodable, no link)",
        labels=["result"],
    )
    got.add_metric(["applied"], m.updates_received)
    got.add_metric(["rejected"], m.updates_rejected)
    yield got
    routes = CounterMetricFamily(
        "qpc_mesh_route_announcements",
        "node route announcements received, by outcome",
        labels=["outcome"],
    )
    for outcome, n in (
        ("accepted", r.routes_accepted),
        ("refreshed", r.routes_refreshed),
        ("retracted", r.routes_retracted),
        ("forged", r.routes_forged),
        ("replayed", r.routes_replayed),
        ("expired", r.routes_expired),
        ("refused", r.routes_refused),
    ):
        routes.add_metric([outcome], n)
    yield routes
    binds = CounterMetricFamily(
        "qpc_mesh_binding_announcements",
        "home bindings received (from neighbours and clients), by outcome",
        labels=["outcome"],
    )
    for outcome, n in (
        ("accepted", r.bindings_accepted),
        ("forged", r.bindings_forged),
        ("replayed", r.bindings_replayed),
        ("expired", r.bindings_expired),
    ):
        binds.add_metric([outcome], n)
    yield binds
    yield _counter(
        "qpc_mesh_bindings_evicted", "bindings dropped to stay within the cap", r.bindings_evicted
    )
    yield _counter(
        "qpc_mesh_bindings_restored",
        "bindings read back from the store at start",
        r.bindings_restored,
    )
    yield _gauge(
        "qpc_mesh_handovers_pending",
        "re-homed users whose mail here waits to go to their new home",
        m.handovers_pending,
    )


def federation_families(f: FederationStats) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    n = f.neighbours
    yield _gauge("qpc_mesh_links_up", "federation links up", f.links)
    events = CounterMetricFamily(
        "qpc_mesh_link_events", "federation links that came up / went down", labels=["event"]
    )
    events.add_metric(["up"], f.link_ups)
    events.add_metric(["down"], f.link_downs)
    yield events
    yield _counter(
        "qpc_mesh_neighbour_restarts",
        "neighbours that came back as a new process (another boot id) while linked",
        f.restarts,
    )
    yield _by_status(
        "qpc_relay_envelopes_in",
        "envelopes neighbours handed us, by our answer",
        (x.relay_in for x in n),
    )
    yield _counter(
        "qpc_relay_envelopes_out",
        "envelopes a next hop took custody of from us",
        sum(x.relayed_out for x in n),
    )
    yield _by_status(
        "qpc_relay_refused_out",
        "envelopes a next hop refused for good (custody ended), by status",
        (x.refused_out for x in n),
    )
    yield _by_status(
        "qpc_relay_deferred_out",
        "answers 'not yet' from a next hop (kept and retried), by status",
        (x.deferred_out for x in n),
    )
    yield _gauge("qpc_relay_custody_queued", "envelopes held in custody, all next hops", f.queued)
    yield _top_neighbours(
        "qpc_relay_custody_queued_by_hop",
        "envelopes held in custody toward a next hop",
        ((x.node_id, x.queued_toward) for x in n),
        counter=False,
    )
    yield _counter(
        "qpc_relay_custody_expired", "envelopes that expired in custody", f.expired_in_custody
    )
    yield _counter("qpc_relay_send_failures", "relay batches not taken (error)", f.send_failures)
    yield _counter(
        "qpc_relay_handed_over",
        "messages of re-homed users moved from the mailbox here toward their new home",
        f.handed_over,
    )
    yield _top_neighbours(
        "qpc_federation_limit_hits",
        "federation calls refused by a neighbour's call or byte budget",
        ((x.node_id, x.limited_calls) for x in n),
        counter=True,
    )
    yield _counter(
        "qpc_federation_trust_refusals", "federation peers refused by trust", f.trust_refusals
    )
    yield from storefwd_families(f.storefwd)


def storefwd_families(s: StoreFwdStats) -> Iterator[Metric]:
    """Store-and-forward (qpc_node/storefwd/forward.py): held, evicted, released,
    receipts, spray."""
    from prometheus_client.core import CounterMetricFamily

    yield _gauge("qpc_storefwd_held", "envelopes held while no route exists", s.held_now)
    yield _counter("qpc_storefwd_held_in", "envelopes taken into hold (RELAY_HELD)", s.held)
    yield _counter(
        "qpc_storefwd_hold_refused", "envelopes refused: the hold quota was full", s.hold_refused
    )
    ev = CounterMetricFamily(
        "qpc_storefwd_evicted", "held envelopes evicted for room, by reason", labels=["reason"]
    )
    for reason, n in (
        ("expired", s.evicted_expired),
        ("delivered", s.evicted_delivered),
        ("most_hops", s.evicted_hops),
    ):
        ev.add_metric([reason], n)
    yield ev
    yield _counter("qpc_storefwd_released", "held envelopes released toward a route", s.released)
    yield _counter(
        "qpc_storefwd_expired",
        "envelopes that expired while held (never delivered)",
        s.expired_held,
    )
    rr = CounterMetricFamily(
        "qpc_storefwd_rerouted",
        "custody rows whose next hop stayed down, by where they went",
        labels=["to"],
    )
    rr.add_metric(["next_hop"], s.rerouted)
    rr.add_metric(["held"], s.rerouted_held)
    yield rr
    yield _counter(
        "qpc_storefwd_expiry_too_far",
        "envelopes refused: expiry beyond storefwd.max_expiry_ahead_s",
        s.expiry_too_far,
    )
    rc = CounterMetricFamily(
        "qpc_storefwd_receipts", "delivery receipts, by outcome", labels=["outcome"]
    )
    for outcome, n in (
        ("sent", s.receipts_sent),
        ("applied", s.receipts_applied),
        ("repeated", s.receipts_repeated),
        ("unknown_msg", s.receipts_unknown_msg),
        ("forged", s.receipts_forged),
        ("wrong_home", s.receipts_wrong_home),
        ("unknown_home", s.receipts_unknown_home),
        ("malformed", s.receipts_malformed),
        ("lost", s.receipts_lost),
    ):
        rc.add_metric([outcome], n)
    yield rc
    yield _counter("qpc_storefwd_purged", "replicas purged by receipts", s.purged)
    yield _counter("qpc_storefwd_sprayed", "copies given to carrier neighbours", s.sprayed)
