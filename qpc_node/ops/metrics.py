"""Prometheus metrics of one node, pulled from its long-lived objects at scrape time.

Why pull: the node's objects already keep counters for the REPL (``statistics()``);
a custom collector reads them when a scraper asks, so the hot path pays nothing.
The exceptions are per-method call counts and latency histograms, which the RPC
server reports through its observer hook (one dict lookup and a locked add per call).

Every node owns its own ``CollectorRegistry`` (never the process-wide default), so
two nodes in one test process do not collide.

Sources are the node's attributes ``store``, ``rpc``, ``endpoint``, ``guard``,
``auth``, ``delivery``, ``audit``, ``mesh`` and ``federation`` (:class:`NodeView`;
the last two only on a mesh node: peers, routes, bindings, announcements, links,
relay and custody, per neighbour for at most ``NEIGHBOUR_LABELS`` neighbours so
label cardinality stays bounded on a big mesh); one that is still None
is simply not exported -- no fake zeros. Each source's ``statistics()`` returns a
frozen, typed snapshot and the collector reads its attributes by name, never a
dict with defaults: a renamed or removed field fails ``mypy --strict`` where the
node is handed to :class:`NodeMetrics`, instead of exporting a silent zero.
Layers built later (mesh discovery, gossip, store-and-forward) add their own
collector with :meth:`NodeMetrics.register`.

This module imports no outer layer: sources are described by Protocols.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from qpc_node.errors import QpcError
from qpc_node.ops.metrics_mesh import (
    FederationSource,
    MeshSource,
    federation_families,
    mesh_families,
)
from qpc_node.ops.prom import counter_family as _counter
from qpc_node.ops.prom import gauge_family as _gauge

CALL_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""RPC latency buckets: sub-millisecond lookups up to 30 s long-polls (FetchWait)."""

MAILBOX_REFRESH_INTERVAL = 1.0
"""Scrapes closer together than this reuse the last mailbox totals (no store query)."""
MAILBOX_REFRESH_TIMEOUT = 2.0
"""A busy store worker delays a scrape at most this long (then the last totals stand)."""


# -- what the collector reads (structural: fakes in tests satisfy them too) ---------


class RpcStats(Protocol):
    @property
    def connections(self) -> int: ...
    @property
    def streams(self) -> int: ...
    @property
    def active_calls(self) -> int: ...
    @property
    def refused_calls(self) -> int: ...
    @property
    def peer_resets(self) -> int: ...
    @property
    def protocol_errors(self) -> int: ...
    @property
    def internal_errors(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    @property
    def send_queued_bytes(self) -> int: ...
    @property
    def request_budget_refusals(self) -> int: ...
    @property
    def send_budget_refusals(self) -> int: ...
    @property
    def send_timeouts(self) -> int: ...
    @property
    def statuses(self) -> Mapping[str, int]: ...


class RpcSource(Protocol):
    def statistics(self) -> RpcStats: ...


class EndpointStats(Protocol):
    @property
    def connections(self) -> int: ...
    @property
    def server_connections(self) -> int: ...
    @property
    def rx_datagrams(self) -> int: ...
    @property
    def tx_datagrams(self) -> int: ...
    @property
    def tx_dropped(self) -> int: ...
    @property
    def dropped_unparseable(self) -> int: ...
    @property
    def dropped_unknown_cid(self) -> int: ...
    @property
    def refused_admission(self) -> int: ...
    @property
    def connection_failures(self) -> int: ...
    @property
    def handshakes_ok_server(self) -> int: ...
    @property
    def handshakes_ok_client(self) -> int: ...
    @property
    def handshakes_failed_server(self) -> int: ...
    @property
    def handshakes_failed_client(self) -> int: ...
    @property
    def half_open_connections(self) -> int: ...
    @property
    def dropped_undecryptable(self) -> int: ...
    @property
    def half_open_timeouts(self) -> int: ...
    @property
    def retries_sent(self) -> int: ...
    @property
    def invalid_tokens(self) -> int: ...
    @property
    def resets_sent(self) -> int: ...
    @property
    def resets_suppressed(self) -> int: ...
    @property
    def resets_received(self) -> int: ...
    @property
    def refusals(self) -> RefusalStats: ...


class RefusalStats(Protocol):
    @property
    def invalid_token(self) -> int: ...
    @property
    def established_full(self) -> int: ...
    @property
    def per_ip(self) -> int: ...
    @property
    def half_open_per_ip(self) -> int: ...
    @property
    def half_open_full(self) -> int: ...
    @property
    def retry_rate(self) -> int: ...


class EndpointSource(Protocol):
    def statistics(self) -> EndpointStats: ...


class StoreCounters(Protocol):
    @property
    def transactions(self) -> int: ...
    @property
    def enqueued(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def fetched(self) -> int: ...
    @property
    def acked(self) -> int: ...
    @property
    def expired_messages(self) -> int: ...
    @property
    def quota_rejections(self) -> int: ...
    @property
    def refused_stranger_pool(self) -> int: ...
    @property
    def refused_stranger_share(self) -> int: ...
    @property
    def keypackages_uploaded(self) -> int: ...
    @property
    def keypackages_served(self) -> int: ...


class StoreStats(Protocol):
    @property
    def store(self) -> StoreCounters: ...
    @property
    def queued(self) -> int: ...
    @property
    def jobs(self) -> int: ...
    @property
    def group_commits(self) -> int: ...
    @property
    def op_seconds_buckets(self) -> Sequence[int]: ...
    @property
    def op_seconds_sum(self) -> float: ...
    @property
    def op_seconds_bounds(self) -> Sequence[float]: ...


class MailboxTotalsLike(Protocol):
    @property
    def mailboxes(self) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def bytes(self) -> int: ...


class StoreSource(Protocol):
    @property
    def is_open(self) -> bool: ...
    def statistics(self) -> StoreStats: ...
    async def mailbox_totals(self) -> MailboxTotalsLike: ...


class GuardStats(Protocol):
    @property
    def refused(self) -> int: ...


class GuardSource(Protocol):
    def statistics(self) -> GuardStats: ...


class ChallengeStats(Protocol):
    @property
    def issued(self) -> int: ...
    @property
    def verified(self) -> int: ...
    @property
    def failed(self) -> int: ...


class ChallengeSource(Protocol):
    def statistics(self) -> ChallengeStats: ...


class AuthSource(Protocol):
    @property
    def book(self) -> ChallengeSource: ...


class DeliveryStats(Protocol):
    @property
    def parked_fetches(self) -> int: ...
    @property
    def wakeups(self) -> int: ...


class DeliverySource(Protocol):
    def statistics(self) -> DeliveryStats: ...


class ChannelStats(Protocol):
    @property
    def stored(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def evicted_caps(self) -> int: ...
    @property
    def evicted_retention(self) -> int: ...
    @property
    def refused_malformed(self) -> int: ...
    @property
    def refused_too_large(self) -> int: ...
    @property
    def refused_expired(self) -> int: ...
    @property
    def refused_expiry_too_far(self) -> int: ...
    @property
    def refused_hop_limit(self) -> int: ...


class ChannelSource(Protocol):
    def statistics(self) -> ChannelStats: ...


class AuditStats(Protocol):
    @property
    def buffered(self) -> int: ...
    @property
    def written(self) -> int: ...
    @property
    def dropped(self) -> int: ...


class AuditSource(Protocol):
    def statistics(self) -> AuditStats: ...


class NodeView(Protocol):
    """What the node must offer: ``serving()`` and its sources, each None until built.

    Read-only properties, so ``Node``'s attributes typed with the concrete classes
    (``endpoint: Endpoint | None``) satisfy them; ``NodeMetrics(node)`` in node.py is
    where mypy checks every component's statistics type against what is read here.
    """

    def serving(self) -> bool: ...
    @property
    def store(self) -> StoreSource | None: ...
    @property
    def rpc(self) -> RpcSource | None: ...
    @property
    def endpoint(self) -> EndpointSource | None: ...
    @property
    def guard(self) -> GuardSource | None: ...
    @property
    def auth(self) -> AuthSource | None: ...
    @property
    def delivery(self) -> DeliverySource | None: ...
    @property
    def audit(self) -> AuditSource | None: ...
    @property
    def channels(self) -> ChannelSource | None: ...
    @property
    def mesh(self) -> MeshSource | None: ...
    @property
    def federation(self) -> FederationSource | None: ...


# -- samples, for the Stats RPC and the REPL ----------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One exported number: ``name`` with its suffix (``_total``, ``_count``...)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def histogram_family(
    name: str, doc: str, bounds: Sequence[float], counts: Sequence[int], total: float
) -> HistogramMetricFamily:
    """A histogram from per-bucket (non-cumulative) counts; ``counts[-1]`` is +Inf."""
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{name}: {len(counts)} counts for {len(bounds)} bounds")
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=total)


class NodeCollector(Collector):
    """Reads the node's statistics when the registry is collected (scrape time)."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        node = self._m.node
        yield _gauge(
            "qpc_node_ready", "1 when the node serves calls (not draining)", self._m.ready()
        )
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


class NodeMetrics:
    """The metrics of one node: its registry, the RPC observer, readiness, a snapshot."""

    def __init__(self, node: NodeView, *, process: bool = True) -> None:
        self._node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.mailbox_totals: MailboxTotalsLike | None = None
        self._refreshed_at: float | None = None
        self._calls = Counter(
            "qpc_rpc_calls",
            "dispatched calls by method and status",
            ["method", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "qpc_rpc_call_seconds",
            "time from decoded request to answer, by method",
            ["method"],
            buckets=CALL_SECONDS_BUCKETS,
            registry=self.registry,
        )
        # Label children cached per (method, status): labels() takes a lock and
        # validates on every call. Bounded: method names come from the method table.
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.registry.register(NodeCollector(self))
        if process:  # RSS, CPU, open fds of this process (from /proc; nothing elsewhere)
            ProcessCollector(registry=self.registry)

    # -- wiring -------------------------------------------------------------------

    @property
    def node(self) -> NodeView:
        return self._node

    def register(self, collector: Collector) -> None:
        """The seam for later layers: discovery peers, gossip sends/duplicates,
        store-and-forward queue depth and expiries register their own collector here
        (one family per number, read from their statistics() in ``collect``)."""
        self.registry.register(collector)

    def unregister(self, collector: Collector) -> None:
        self.registry.unregister(collector)

    def observe_call(self, method: str, status: str, seconds: float) -> None:
        """RpcServer observer: ``RpcServer(..., observer=metrics.observe_call)``."""
        children = self._children.get((method, status))
        if children is None:
            children = (self._calls.labels(method, status), self._latency.labels(method))
            self._children[(method, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    # -- reading ------------------------------------------------------------------

    def ready(self) -> bool:
        """Store open, endpoint serving, not draining (/readyz)."""
        store = self._node.store
        return self._node.serving() and store is not None and store.is_open

    async def refresh(self) -> None:
        """Update what needs a store query (mailbox totals), at most once a second."""
        store = self._node.store
        now = trio.current_time()
        if store is None or not store.is_open:
            return
        if self._refreshed_at is not None and now - self._refreshed_at < MAILBOX_REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        with trio.move_on_after(MAILBOX_REFRESH_TIMEOUT):
            try:
                self.mailbox_totals = await store.mailbox_totals()
            except QpcError:  # closed under us (draining): keep the last totals
                return

    def exposition(self) -> bytes:
        """Prometheus text format of everything registered."""
        return generate_latest(self.registry)

    def samples(self, *, buckets: bool = False) -> list[Sample]:
        """Flat samples (no ``_created``; no ``_bucket`` unless asked)."""
        out: list[Sample] = []
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_created") or (s.name.endswith("_bucket") and not buckets):
                    continue
                out.append(Sample(s.name, tuple(sorted(s.labels.items())), float(s.value)))
        return out

    async def snapshot(self, *, buckets: bool = False) -> list[Sample]:
        await self.refresh()
        return self.samples(buckets=buckets)


def format_stats(samples: Iterable[Sample]) -> str:
    """Human lines for the REPL's ``/stats``: the same numbers as /metrics.

    A histogram's ``_count``/``_sum`` pair becomes one line with the mean; buckets
    (if present) are left out.
    """
    rows: list[tuple[str, str]] = []
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    listed = [s for s in samples if not s.name.endswith("_bucket")]
    for s in listed:
        if s.name.endswith("_sum"):
            sums[(s.name.removesuffix("_sum"), s.labels)] = s.value
    for s in listed:
        base = s.name.removesuffix("_count")
        if s.name.endswith("_sum") and (s.name.removesuffix("_sum"), s.labels) in sums:
            continue
        label = ",".join(f"{k}={v}" for k, v in s.labels)
        braces = f"{{{label}}}" if label else ""
        if s.name.endswith("_count") and (base, s.labels) in sums:
            total = sums[(base, s.labels)]
            mean = total / s.value if s.value else 0.0
            key = base.removeprefix("qpc_") + braces
            rows.append((key, f"n={_num(s.value)} mean={mean * 1000:.2f}ms"))
        else:
            rows.append((s.name.removeprefix("qpc_") + braces, _num(s.value)))
    if not rows:
        return "(no statistics)"
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _num(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.6g}"
