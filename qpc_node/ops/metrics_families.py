"""The Prometheus side of :mod:`qpc_node.ops.metrics`: families read from the node's
statistics at collect time.

Split out so that a node with metrics off, whose Stats RPC has not been called, never
imports prometheus_client (2.3 MiB of a router's RAM; docs/performance.md): the registry
is built on first need (:attr:`NodeMetrics.registry`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from qpc_node.ops.metrics_broadcast import gossip_families, sync_families
from qpc_node.ops.metrics_mesh import federation_families, mesh_families
from qpc_node.ops.prom import counter_family as _counter
from qpc_node.ops.prom import gauge_family as _gauge

if TYPE_CHECKING:
    from qpc_node.ops.metrics import (
        ChannelStats,
        EndpointStats,
        NodeMetrics,
        RpcStats,
        StoreStats,
    )

__all__ = ["NodeCollector", "histogram_family"]


def _call_families(
    calls: Mapping[tuple[str, str], int],
    latency: Mapping[str, tuple[list[int], float]],
    bounds: Sequence[float],
) -> Iterator[Metric]:
    counts = CounterMetricFamily(
        "qpc_rpc_calls", "dispatched calls by method and status", labels=["method", "status"]
    )
    for (method, status), n in sorted(calls.items()):
        counts.add_metric([method, status], n)
    yield counts
    seconds = HistogramMetricFamily(
        "qpc_rpc_call_seconds", "time from decoded request to answer, by method", labels=["method"]
    )
    for method, (per_bucket, total) in sorted(latency.items()):
        seconds.add_metric([method], _cumulative(bounds, per_bucket), sum_value=total)
    yield seconds


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return out


def histogram_family(
    name: str, doc: str, bounds: Sequence[float], counts: Sequence[int], total: float
) -> HistogramMetricFamily:
    """A histogram from per-bucket (non-cumulative) counts; ``counts[-1]`` is +Inf."""
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{name}: {len(counts)} counts for {len(bounds)} bounds")
    return HistogramMetricFamily(name, doc, buckets=_cumulative(bounds, counts), sum_value=total)


class NodeCollector:
    """Reads the node's statistics when the registry is collected (scrape time)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        node = self._m.node
        yield _gauge(
            "qpc_node_ready", "1 when the node serves calls (not draining)", self._m.ready()
        )
        yield from _call_families(*self._m.call_counts(), self._m.call_bounds)
        if (rpc := node.rpc) is not None:
            yield from _rpc_families(rpc.statistics())
        if (endpoint := node.endpoint) is not None:
            yield from _endpoint_families(endpoint.statistics())
        if (store := node.store) is not None and store.is_open:
            yield from _store_families(store.statistics())
        if (totals := self._m.mailbox_totals) is not None:
            yield _gauge("qpc_mailboxes", "mailboxes known to this node", totals.mailboxes)
            yield _gauge("qpc_mailbox_messages", "unacked messages, all mailboxes", totals.messages)
            yield _gauge("qpc_mailbox_bytes", "unacked message bytes, all mailboxes", totals.bytes)
        if (guard := node.guard) is not None:
            g = guard.statistics()
            yield _counter("qpc_rate_limit_hits", "calls refused by a rate limit", g.refused)
        if (auth := node.auth) is not None:
            a = auth.book.statistics()
            fam = CounterMetricFamily(
                "qpc_auth_handshakes",
                "Auth.Prove outcomes (session bound or refused)",
                labels=["result"],
            )
            fam.add_metric(["ok"], a.verified)
            fam.add_metric(["failed"], a.failed)
            yield fam
            yield _counter("qpc_auth_challenges", "Auth.Challenge nonces issued", a.issued)
        if (delivery := node.delivery) is not None:
            d = delivery.statistics()
            yield _gauge("qpc_fetch_waiters", "long-poll fetches parked", d.parked_fetches)
            yield _counter("qpc_fetch_wakeups", "parked fetches woken by mail", d.wakeups)
        if (audit := node.audit) is not None:
            au = audit.statistics()
            yield _counter("qpc_audit_written", "audit events persisted", au.written)
            yield _counter("qpc_audit_dropped", "audit events dropped (buffer full)", au.dropped)
            yield _gauge("qpc_audit_buffered", "audit events waiting to be written", au.buffered)
        if (channels := node.channels) is not None:
            yield from _channel_families(channels.statistics())
        if (mesh := node.mesh) is not None:
            yield from mesh_families(mesh.statistics())
        if (fed := node.federation) is not None:
            yield from federation_families(fed.statistics())
        if (gossip := node.gossip) is not None:
            yield from gossip_families(gossip.statistics())
        if (syncer := node.syncer) is not None:
            yield from sync_families(syncer.statistics())


def _channel_families(c: ChannelStats) -> Iterator[Metric]:
    got = CounterMetricFamily(
        "qpc_channel_messages",
        "broadcast channel messages accepted (local publishes and from neighbours), by outcome",
        labels=["outcome"],
    )
    got.add_metric(["stored"], c.stored)
    got.add_metric(["duplicate"], c.duplicates)
    yield got
    refused = CounterMetricFamily(
        "qpc_channel_refused",
        "channel messages refused by the relay checks (nothing stored), by reason",
        labels=["reason"],
    )
    refused.add_metric(["malformed"], c.refused_malformed)
    refused.add_metric(["too_large"], c.refused_too_large)
    refused.add_metric(["expired"], c.refused_expired)
    refused.add_metric(["expiry_too_far"], c.refused_expiry_too_far)
    refused.add_metric(["hop_limit"], c.refused_hop_limit)
    yield refused
    evicted = CounterMetricFamily(
        "qpc_channel_evicted",
        "channel messages dropped before their expiry: over channels.max_messages/max_bytes"
        " (caps) or past channels.retention_s (retention)",
        labels=["reason"],
    )
    evicted.add_metric(["caps"], c.evicted_caps)
    evicted.add_metric(["retention"], c.evicted_retention)
    yield evicted


def _rpc_families(s: RpcStats) -> Iterator[Metric]:
    yield _counter("qpc_rpc_connections_opened", "connections that carried a call", s.connections)
    yield _counter("qpc_rpc_streams", "call streams accepted", s.streams)
    yield _gauge("qpc_rpc_active_calls", "calls in progress", s.active_calls)
    yield _counter("qpc_rpc_refused_calls", "calls refused: per-connection limit", s.refused_calls)
    yield _counter("qpc_rpc_peer_resets", "calls the peer abandoned", s.peer_resets)
    yield _counter("qpc_rpc_protocol_errors", "malformed requests", s.protocol_errors)
    yield _counter("qpc_rpc_internal_errors", "handler bugs answered INTERNAL", s.internal_errors)
    yield _gauge("qpc_rpc_buffered_bytes", "request bytes buffered right now", s.buffered_bytes)
    yield _gauge(
        "qpc_rpc_send_queued_bytes", "response bytes waiting for peers", s.send_queued_bytes
    )
    budget = CounterMetricFamily(
        "qpc_rpc_budget_refusals",
        "calls refused RESOURCE_EXHAUSTED: node-wide or per-IP byte budget full",
        labels=["budget"],
    )
    budget.add_metric(["request"], s.request_budget_refusals)
    budget.add_metric(["send"], s.send_budget_refusals)
    yield budget
    yield _counter(
        "qpc_rpc_send_timeouts", "responses not taken within send_timeout (reset)", s.send_timeouts
    )
    fam = CounterMetricFamily(
        "qpc_rpc_responses",
        "responses by status, including pre-dispatch refusals",
        labels=["status"],
    )
    for status, count in sorted(s.statuses.items()):
        fam.add_metric([status], count)
    yield fam


def _endpoint_families(e: EndpointStats) -> Iterator[Metric]:
    yield _gauge("qpc_quic_connections", "open QUIC connections (all)", e.connections)
    yield _gauge(
        "qpc_quic_server_connections", "open QUIC connections accepted", e.server_connections
    )
    yield _counter("qpc_quic_rx_datagrams", "UDP datagrams received", e.rx_datagrams)
    yield _counter("qpc_quic_tx_datagrams", "UDP datagrams sent", e.tx_datagrams)
    dropped = CounterMetricFamily(
        "qpc_quic_dropped_datagrams", "datagrams dropped", labels=["reason"]
    )
    dropped.add_metric(["tx_backlog_full"], e.tx_dropped)
    dropped.add_metric(["unparseable"], e.dropped_unparseable)
    dropped.add_metric(["unknown_cid"], e.dropped_unknown_cid)
    dropped.add_metric(["undecryptable_initial"], e.dropped_undecryptable)
    yield dropped
    yield _counter(
        "qpc_quic_refused_admission", "new connections over the limits", e.refused_admission
    )
    refusals = CounterMetricFamily(
        "qpc_quic_admission_refusals",
        "new connections refused (or dropped when confirmed), by limit",
        labels=["reason"],
    )
    r = e.refusals
    for reason, count in (
        ("invalid_token", r.invalid_token),
        ("established_full", r.established_full),
        ("per_ip", r.per_ip),
        ("half_open_per_ip", r.half_open_per_ip),
        ("half_open_full", r.half_open_full),
        ("retry_rate", r.retry_rate),
    ):
        refusals.add_metric([reason], count)
    yield refusals
    yield _gauge(
        "qpc_quic_half_open_connections",
        "server handshakes in flight (not yet confirmed)",
        e.half_open_connections,
    )
    yield _counter(
        "qpc_quic_half_open_timeouts",
        "handshakes dropped at the half-open deadline",
        e.half_open_timeouts,
    )
    yield _counter(
        "qpc_quic_retries_sent", "stateless Retry packets sent (address validation)", e.retries_sent
    )
    yield _counter("qpc_quic_invalid_tokens", "Initials with a bad Retry token", e.invalid_tokens)
    resets = CounterMetricFamily(
        "qpc_quic_stateless_resets",
        "stateless resets for packets of unknown connections",
        labels=["result"],
    )
    resets.add_metric(["sent"], e.resets_sent)
    resets.add_metric(["suppressed"], e.resets_suppressed)
    resets.add_metric(["received"], e.resets_received)
    yield resets
    yield _counter(
        "qpc_quic_connection_failures",
        "connections dropped by a core failure",
        e.connection_failures,
    )
    hs = CounterMetricFamily(
        "qpc_quic_handshakes",
        "TLS handshakes: confirmed, or the connection ended unconfirmed (refused cert/ALPN, timeout)",
        labels=["role", "result"],
    )
    hs.add_metric(["server", "ok"], e.handshakes_ok_server)
    hs.add_metric(["server", "failed"], e.handshakes_failed_server)
    hs.add_metric(["client", "ok"], e.handshakes_ok_client)
    hs.add_metric(["client", "failed"], e.handshakes_failed_client)
    yield hs


def _store_families(a: StoreStats) -> Iterator[Metric]:
    s = a.store
    yield _counter("qpc_store_transactions", "SQLite write transactions", s.transactions)
    yield _counter("qpc_store_enqueued", "messages stored", s.enqueued)
    yield _counter("qpc_store_duplicates", "enqueues dropped as duplicates (msg_id)", s.duplicates)
    yield _counter("qpc_store_fetched", "messages handed out", s.fetched)
    yield _counter("qpc_store_acked", "messages acknowledged", s.acked)
    yield _counter("qpc_store_expired_messages", "messages removed at expiry", s.expired_messages)
    yield _counter(
        "qpc_store_quota_rejections",
        "enqueues refused by a mailbox quota (all reasons: qpc_mailbox_refusals)",
        s.quota_rejections,
    )
    fair = CounterMetricFamily(
        "qpc_mailbox_refusals",
        "enqueues refused by mailbox fairness: whole mailbox full, or the pool / own"
        " share of senders the recipient has not accepted used up",
        labels=["reason"],
    )
    strangers = s.refused_stranger_pool + s.refused_stranger_share
    fair.add_metric(["mailbox_full"], s.quota_rejections - strangers)
    fair.add_metric(["stranger_pool_full"], s.refused_stranger_pool)
    fair.add_metric(["stranger_share_used"], s.refused_stranger_share)
    yield fair
    yield _counter("qpc_store_keypackages_uploaded", "KeyPackages stored", s.keypackages_uploaded)
    yield _counter("qpc_store_keypackages_served", "KeyPackages handed out", s.keypackages_served)
    yield _gauge("qpc_store_queued_jobs", "jobs waiting for the store worker", a.queued)
    yield _counter("qpc_store_jobs", "jobs the store worker ran", a.jobs)
    yield _counter("qpc_store_group_commits", "commits shared by several enqueues", a.group_commits)
    if len(a.op_seconds_buckets) == len(a.op_seconds_bounds) + 1:
        yield histogram_family(
            "qpc_store_op_seconds",
            "store worker time per operation (one job or one group commit)",
            a.op_seconds_bounds,
            a.op_seconds_buckets,
            a.op_seconds_sum,
        )
