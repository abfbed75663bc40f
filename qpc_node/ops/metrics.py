"""Prometheus metrics of one node, pulled from its long-lived objects at scrape time.

Why pull: the node's objects already keep counters for the REPL (``statistics()``);
a custom collector reads them when a scraper asks, so the hot path pays nothing.
The exceptions are per-method call counts and latency histograms, which the RPC
server reports through its observer hook (one dict lookup and a locked add per call).

Every node owns its own ``CollectorRegistry`` (never the process-wide default), so
two nodes in one test process do not collide.

Sources are the node's attributes ``store``, ``rpc``, ``endpoint``, ``guard``,
``auth``, ``delivery``, ``audit``, ``channels``, ``mesh``, ``federation``, ``gossip``
and ``syncer`` (:class:`NodeView`; the last four only on a mesh node: peers, routes,
bindings, announcements, links, relay and custody, per neighbour for at most
``NEIGHBOUR_LABELS`` neighbours so label cardinality stays bounded on a big mesh;
broadcast and inventory sync in :mod:`.metrics_broadcast`); one that is still None
is simply not exported -- no fake zeros. Each source's ``statistics()`` returns a
frozen, typed snapshot and the collector reads its attributes by name, never a
dict with defaults: a renamed or removed field fails ``mypy --strict`` where the
node is handed to :class:`NodeMetrics`, instead of exporting a silent zero.
Layers built later add their own collector with :meth:`NodeMetrics.register`.

This module imports no outer layer: sources are described by Protocols.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio

from qpc_node.errors import QpcError

# Runtime imports (not TYPE_CHECKING): tests resolve NodeView's hints with get_type_hints.
from qpc_node.ops.metrics_broadcast import GossipSource, SyncerSource
from qpc_node.ops.metrics_mesh import FederationSource, MeshSource

if TYPE_CHECKING:
    # Only for annotations: prometheus_client is imported when the registry is first
    # needed (a scrape, a Stats call), never by a node that has neither (module docstring).
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector


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
    @property
    def gossip(self) -> GossipSource | None: ...
    @property
    def syncer(self) -> SyncerSource | None: ...


# -- samples, for the Stats RPC and the REPL ----------------------------------------


class Sample(msgspec.Struct, frozen=True):
    """One exported number: ``name`` with its suffix (``_total``, ``_count``...)."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


class NodeMetrics:
    """The metrics of one node: its registry, the RPC observer, readiness, a snapshot.

    The RPC call counters are plain dicts (``observe_call`` is on every call's path and
    must not need prometheus_client); the registry that exports them, and the node's
    statistics, is built on first use (:attr:`registry`), so a node with metrics off
    imports prometheus_client only when its Stats RPC is first called.
    """

    call_bounds: Sequence[float] = CALL_SECONDS_BUCKETS

    def __init__(self, node: NodeView, *, process: bool = True) -> None:
        self._node = node
        self._process = process
        self._registry: CollectorRegistry | None = None
        # Collectors registered before the registry exists, in registration order.
        self._pending: list[Collector] = []
        self.mailbox_totals: MailboxTotalsLike | None = None
        self._refreshed_at: float | None = None
        # (method, status) -> calls; method -> (per-bucket counts, +Inf last; sum of seconds).
        # Bounded: method names come from the method table, statuses from StatusCode.
        self._calls: dict[tuple[str, str], int] = {}
        self._latency: dict[str, tuple[list[int], float]] = {}

    # -- wiring -------------------------------------------------------------------

    @property
    def node(self) -> NodeView:
        return self._node

    @property
    def registry(self) -> CollectorRegistry:
        """This node's own registry (never the process-wide default), built on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            from qpc_node.ops.metrics_families import NodeCollector

            registry = CollectorRegistry(auto_describe=False)
            registry.register(NodeCollector(self))
            if self._process:  # RSS, CPU, open fds of this process (from /proc; nothing elsewhere)
                ProcessCollector(registry=registry)
            for collector in self._pending:
                registry.register(collector)
            self._pending.clear()
            self._registry = registry
        return self._registry

    def register(self, collector: Collector) -> None:
        """The seam for later layers: discovery peers, gossip sends/duplicates,
        store-and-forward queue depth and expiries register their own collector here
        (one family per number, read from their statistics() in ``collect``)."""
        if self._registry is None:
            self._pending.append(collector)
        else:
            self._registry.register(collector)

    def unregister(self, collector: Collector) -> None:
        if self._registry is None:
            self._pending.remove(collector)
        else:
            self._registry.unregister(collector)

    def observe_call(self, method: str, status: str, seconds: float) -> None:
        """RpcServer observer: ``RpcServer(..., observer=metrics.observe_call)``."""
        key = (method, status)
        self._calls[key] = self._calls.get(key, 0) + 1
        counts, total = self._latency.get(method) or ([0] * (len(self.call_bounds) + 1), 0.0)
        counts[_bucket(self.call_bounds, seconds)] += 1
        self._latency[method] = (counts, total + seconds)

    def call_counts(
        self,
    ) -> tuple[Mapping[tuple[str, str], int], Mapping[str, tuple[list[int], float]]]:
        """What :meth:`observe_call` counted (read by the collector at collect time)."""
        return self._calls, self._latency

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
        from prometheus_client.exposition import generate_latest

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


def _bucket(bounds: Sequence[float], value: float) -> int:
    """The latency bucket ``value`` falls in: the first bound >= value (prometheus' ``le``);
    ``len(bounds)`` is +Inf."""
    return bisect_left(bounds, value)
