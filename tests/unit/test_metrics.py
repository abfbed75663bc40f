"""The node's metrics collector and the tiny HTTP server.

The sources handed to ``NodeMetrics`` return the components' real statistics types
(``ServerStatistics``, ``AsyncStoreStatistics``, ...), built by keyword: a renamed or
removed field breaks these tests at once. The static half of that guarantee (mypy
refusing a node whose statistics type drifted) is in test_statistics_types.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue
from msgspec.structs import replace
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from qpc_node.errors import QpcError, StatusCode
from qpc_node.federation.stats import FederationStatistics, NeighbourStatistics
from qpc_node.mesh.peers import PeerTableStatistics
from qpc_node.mesh.routing import RoutingStatistics
from qpc_node.mesh.service import MeshStatistics
from qpc_node.ops.http import (
    BadRequest,
    HttpServer,
    Response,
    metrics_routes,
    parse_request_head,
)
from qpc_node.ops.metrics import (
    AuditSource,
    AuthSource,
    ChannelSource,
    DeliverySource,
    EndpointSource,
    EndpointStats,
    GuardSource,
    NodeMetrics,
    RefusalStats,
    RpcSource,
    Sample,
    StoreSource,
    format_stats,
)
from qpc_node.ops.metrics_broadcast import (
    GossipSource,
    GossipStats,
    PlumtreeStats,
    SeenStats,
    SyncerSource,
)
from qpc_node.ops.metrics_families import histogram_family
from qpc_node.ops.metrics_mesh import NEIGHBOUR_LABELS, FederationSource, MeshSource
from qpc_node.quic.admission import AdmissionRefusals
from qpc_node.quic.endpoint import EndpointStatistics
from qpc_node.rpc import CallContext, MethodTable, RpcClient, RpcError, RpcServer
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.rpc.server import ServerStatistics
from qpc_node.service.audit import AuditStatistics
from qpc_node.service.auth import ChallengeBook
from qpc_node.service.delivery import DeliveryStatistics
from qpc_node.service.guard import Guard
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.service.stats import STATS_METHOD, StatsService, samples_from_proto
from qpc_node.store.async_store import AsyncStoreStatistics
from qpc_node.store.channels import ChannelStoreStatistics
from qpc_node.store.errors import StoreClosed
from qpc_node.store.records import StoreStatistics
from qpc_node.store.store import MailboxTotals
from qpc_node.storefwd.gossip import GossipStatistics
from qpc_node.storefwd.plumtree import PlumtreeStatistics
from qpc_node.storefwd.seen import SeenStatistics
from qpc_node.storefwd.stats import StoreFwdStatistics
from qpc_node.storefwd.sync import SyncStatistics
from qpc_node.wire.gen.qpc.v1 import ops_pb2


@dataclass
class FakeStore:
    """A store whose numbers the test picks; the types are AsyncStore's own."""

    open: bool = True
    totals: MailboxTotals = field(default_factory=lambda: MailboxTotals(2, 5, 900))
    queries: int = 0
    fail: bool = False

    @property
    def is_open(self) -> bool:
        return self.open

    def statistics(self) -> AsyncStoreStatistics:
        return AsyncStoreStatistics(
            store=StoreStatistics(
                schema_version=1,
                transactions=7,
                enqueued=5,
                duplicates=1,
                fetched=3,
                acked=2,
                expired_messages=4,
                quota_rejections=0,
                keypackages_uploaded=6,
                keypackages_served=1,
            ),
            queued=0,
            jobs=9,
            group_commits=1,
            grouped_batches=2,
            largest_group=2,
            op_seconds_bounds=(0.001, 0.01),
            op_seconds_buckets=(3, 5, 1),
            op_seconds_sum=0.25,
        )

    async def mailbox_totals(self) -> MailboxTotals:
        self.queries += 1
        if self.fail:
            raise StoreClosed("closed")
        return self.totals


S = TypeVar("S")


@dataclass
class Fixed(Generic[S]):
    """A source whose ``statistics()`` returns a given snapshot of a real type."""

    stats: S

    def statistics(self) -> S:
        return self.stats


@dataclass
class FakeAuth:
    book: ChallengeBook = field(default_factory=ChallengeBook)


@dataclass
class FakeNode:
    """What ``NodeMetrics`` reads (``NodeView``), each source None until given."""

    is_serving: bool = True
    store: StoreSource | None = None
    rpc: RpcSource | None = None
    endpoint: EndpointSource | None = None
    guard: GuardSource | None = None
    auth: AuthSource | None = None
    delivery: DeliverySource | None = None
    audit: AuditSource | None = None
    channels: ChannelSource | None = None
    mesh: MeshSource | None = None
    federation: FederationSource | None = None
    gossip: GossipSource | None = None
    syncer: SyncerSource | None = None

    def serving(self) -> bool:
        return self.is_serving


def rpc_source() -> Fixed[ServerStatistics]:
    return Fixed(
        ServerStatistics(
            connections=3,
            streams=11,
            active_calls=1,
            refused_calls=0,
            peer_resets=2,
            protocol_errors=1,
            internal_errors=0,
            buffered_bytes=64,
            peak_buffered_bytes=128,
            send_queued_bytes=0,
            peak_send_queued_bytes=0,
            request_budget_refusals=0,
            send_budget_refusals=0,
            send_timeouts=0,
            statuses=MappingProxyType({"OK": 9, "UNAUTHENTICATED": 2}),
        )
    )


def endpoint_source() -> Fixed[EndpointStatistics]:
    """Every counter a distinct value, so an exported sample shows which field it read."""
    names = [f for f in EndpointStatistics.__struct_fields__ if f != "refusals"]
    reasons = list(AdmissionRefusals.__struct_fields__)
    refusals = AdmissionRefusals(**{r: 100 + i for i, r in enumerate(reasons)})
    counts = {name: i + 1 for i, name in enumerate(names)}
    return Fixed(EndpointStatistics(**counts, refusals=refusals))


def real_guard() -> Guard:
    return Guard(
        per_ip=TokenBucketLimiter[str](rate=100, burst=100),
        per_identity=TokenBucketLimiter[str](rate=100, burst=100),
        audit=lambda event: None,
        wall_ms=lambda: 0,
    )


def parse(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_collector_reads_statistics_at_scrape_time() -> None:
    store = FakeStore()
    guard = real_guard()
    guard.refused = 4
    auth = FakeAuth()
    auth.book.issued, auth.book.verified, auth.book.failed = 3, 2, 1
    node = FakeNode(
        store=store,
        rpc=rpc_source(),
        endpoint=endpoint_source(),
        guard=guard,
        auth=auth,
        delivery=Fixed(DeliveryStatistics(parked_fetches=2, wakeups=7)),
        audit=Fixed(AuditStatistics(buffered=1, written=40, dropped=3)),
    )
    m = NodeMetrics(node, process=False)
    await m.refresh()
    got = parse(m)
    assert got[("qpc_node_ready", ())] == 1
    assert got[("qpc_rpc_streams_total", ())] == 11
    assert got[("qpc_rpc_responses_total", (("status", "UNAUTHENTICATED"),))] == 2
    assert got[("qpc_rate_limit_hits_total", ())] == 4
    assert got[("qpc_auth_handshakes_total", (("result", "failed"),))] == 1
    assert got[("qpc_auth_handshakes_total", (("result", "ok"),))] == 2
    assert got[("qpc_auth_challenges_total", ())] == 3
    assert got[("qpc_fetch_waiters", ())] == 2 and got[("qpc_fetch_wakeups_total", ())] == 7
    assert got[("qpc_audit_written_total", ())] == 40
    assert got[("qpc_audit_dropped_total", ())] == 3
    assert got[("qpc_audit_buffered", ())] == 1
    e = node.endpoint.statistics() if node.endpoint else None
    assert e is not None
    assert got[("qpc_quic_rx_datagrams_total", ())] == e.rx_datagrams
    assert got[("qpc_quic_dropped_datagrams_total", (("reason", "unknown_cid"),))] == (
        e.dropped_unknown_cid
    )
    assert got[("qpc_quic_handshakes_total", (("result", "failed"), ("role", "client")))] == (
        e.handshakes_failed_client
    )
    assert got[("qpc_store_expired_messages_total", ())] == 4
    assert got[("qpc_mailbox_messages", ())] == 5 and got[("qpc_mailbox_bytes", ())] == 900
    # Cumulative buckets from the store's per-bucket counts.
    assert got[("qpc_store_op_seconds_bucket", (("le", "0.001"),))] == 3
    assert got[("qpc_store_op_seconds_bucket", (("le", "0.01"),))] == 8
    assert got[("qpc_store_op_seconds_bucket", (("le", "+Inf"),))] == 9
    assert got[("qpc_store_op_seconds_count", ())] == 9
    # Pulled, not copied: a later change shows in the next scrape.
    guard.refused = 10
    assert parse(m)[("qpc_rate_limit_hits_total", ())] == 10


async def test_every_field_read_is_exported_with_its_value() -> None:
    """Distinct numbers in, each one found in a sample: nothing is read as a default zero."""
    endpoint = endpoint_source()
    node = FakeNode(
        endpoint=endpoint,
        delivery=Fixed(DeliveryStatistics(parked_fetches=101, wakeups=102)),
        audit=Fixed(AuditStatistics(buffered=103, written=104, dropped=105)),
    )
    values = set(parse(NodeMetrics(node, process=False)).values())
    read = [n for n in vars(EndpointStats) if not n.startswith("_") and n != "refusals"]
    assert len(read) == 21
    for name in read:
        assert getattr(endpoint.stats, name) in values, name
    reasons = [n for n in vars(RefusalStats) if not n.startswith("_")]
    assert len(reasons) == 6
    for name in reasons:
        assert getattr(endpoint.stats.refusals, name) in values, name
    assert {101, 102, 103, 104, 105} <= values


async def test_absent_sources_are_not_exported_as_zeros() -> None:
    m = NodeMetrics(FakeNode(), process=False)
    await m.refresh()
    names = {name for name, _ in parse(m)}
    assert names == {"qpc_node_ready"}  # nothing of endpoint, store, rpc, mailboxes
    assert not m.ready()  # no store: not ready


async def test_observer_counts_calls_and_latency_per_method() -> None:
    m = NodeMetrics(FakeNode(), process=False)
    for seconds in (0.002, 0.004, 0.2):
        m.observe_call("qpc.v1.Delivery/Enqueue", "OK", seconds)
    m.observe_call("qpc.v1.Delivery/Enqueue", "RESOURCE_EXHAUSTED", 0.001)
    got = parse(m)
    enq = ("method", "qpc.v1.Delivery/Enqueue")
    assert got[("qpc_rpc_calls_total", (enq, ("status", "OK")))] == 3
    assert got[("qpc_rpc_calls_total", (enq, ("status", "RESOURCE_EXHAUSTED")))] == 1
    assert got[("qpc_rpc_call_seconds_count", (enq,))] == 4
    assert got[("qpc_rpc_call_seconds_bucket", (("le", "0.005"), enq))] == 3
    assert got[("qpc_rpc_call_seconds_sum", (enq,))] == pytest.approx(0.207)


async def test_two_nodes_in_one_process_do_not_collide() -> None:
    a = NodeMetrics(FakeNode(), process=True)
    b = NodeMetrics(FakeNode(), process=True)
    a.observe_call("m", "OK", 0.01)
    assert ("qpc_rpc_calls_total", (("method", "m"), ("status", "OK"))) in parse(a)
    assert not any(name == "qpc_rpc_calls_total" for name, _ in parse(b))


async def test_ready_follows_serving_and_store() -> None:
    store = FakeStore()
    node = FakeNode(store=store)
    m = NodeMetrics(node, process=False)
    assert m.ready()
    node.is_serving = False  # draining
    assert not m.ready()
    node.is_serving = True
    store.open = False
    assert not m.ready()


async def test_mailbox_refresh_is_rate_limited_and_survives_a_closed_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeStore()
    m = NodeMetrics(FakeNode(store=store), process=False)
    await m.refresh()
    await m.refresh()
    assert store.queries == 1  # scrapes in the same second share one query
    await trio.sleep(1.5)
    store.fail = True
    await m.refresh()
    assert store.queries == 2
    assert m.mailbox_totals is not None and m.mailbox_totals.messages == 5  # last totals stand


async def test_registration_seam_for_later_layers() -> None:
    class GossipCollector:
        def collect(self) -> Any:
            yield GaugeMetricFamily("qpc_discovery_peers", "peers", value=3)

    m = NodeMetrics(FakeNode(), process=False)
    c = GossipCollector()
    m.register(c)
    assert parse(m)[("qpc_discovery_peers", ())] == 3
    m.unregister(c)
    assert ("qpc_discovery_peers", ()) not in parse(m)


async def test_snapshot_and_format_stats() -> None:
    m = NodeMetrics(FakeNode(store=FakeStore(), rpc=rpc_source()), process=False)
    m.observe_call("qpc.v1.Delivery/Fetch", "OK", 0.010)
    m.observe_call("qpc.v1.Delivery/Fetch", "OK", 0.030)
    samples = await m.snapshot()
    assert not any(s.name.endswith(("_bucket", "_created")) for s in samples)
    assert any(s.name.endswith("_bucket") for s in await m.snapshot(buckets=True))
    text = format_stats(samples)
    assert re.search(
        r"^rpc_call_seconds\{method=qpc.v1.Delivery/Fetch\} +n=2 mean=20.00ms$", text, re.M
    )
    assert "mailbox_messages" in text and "rpc_streams_total" in text
    assert "_sum" not in text  # folded into the mean
    assert format_stats([]) == "(no statistics)"
    assert format_stats([Sample("x", (), 0.5)]).endswith("0.5")


def test_histogram_family_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="counts"):
        histogram_family("h", "doc", (1.0,), (1,), 0.0)


# -- HTTP -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics", 400),
        (b"GET  /metrics HTTP/1.1", 400),
        (b"GET http://x/metrics HTTP/1.1", 400),
        (b"G(T /metrics HTTP/1.1", 400),
        (b"GET /metrics HTTP/2.0", 505),
        (b"GET /metrics HTTX/1.1", 400),
        (b"GET /metrics HTTP/1.1\r\nno-colon", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: x", 400),
        (b"GET /m\xff HTTP/1.1", 400),
        (b"GET /metrics HTTP/1.1\r\nX: a\x00b", 400),
    ],
)
def test_parser_refuses_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as ei:
        parse_request_head(head)
    assert ei.value.status == status


def test_parser_accepts_a_normal_request() -> None:
    r = parse_request_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9201\r\nAccept: */*")
    assert (r.method, r.path) == ("GET", "/metrics")


async def exchange(server: HttpServer, data: bytes, *, eof: bool = True) -> bytes:
    """Run one connection of ``server`` over an in-memory stream pair."""
    client, srv = trio.testing.memory_stream_pair()
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, srv)
        await client.send_all(data)
        if eof:
            await client.send_eof()
        for _ in range(1000):  # bounded: the server closes after its answer
            chunk = await client.receive_some(65536)
            if not chunk:
                break
            got += chunk
    return bytes(got)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_routes_and_readiness_over_a_stream() -> None:
    store = FakeStore()
    node = FakeNode(store=store, rpc=rpc_source())
    m = NodeMetrics(node, process=False)
    server = HttpServer(metrics_routes(m))
    ok = await exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(ok) == 200 and b"qpc_rpc_streams_total 11.0" in ok
    assert b"Connection: close" in ok
    assert status_of(await exchange(server, b"GET /healthz HTTP/1.0\r\n\r\n")) == 200
    assert status_of(await exchange(server, b"GET /readyz HTTP/1.1\r\n\r\n")) == 200
    node.is_serving = False
    assert status_of(await exchange(server, b"GET /readyz HTTP/1.1\r\n\r\n")) == 503
    assert status_of(await exchange(server, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200
    assert status_of(await exchange(server, b"GET /nope HTTP/1.1\r\n\r\n")) == 404
    post = await exchange(server, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert status_of(post) == 405 and b"Allow: GET, HEAD" in post
    head = await exchange(server, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    assert status_of(head) == 200 and head.endswith(b"\r\n\r\n")  # no body


async def test_bad_bytes_oversize_and_slow_clients(autojump_clock: trio.testing.MockClock) -> None:
    async def ok() -> Response:
        return Response(200, b"ok\n")

    server = HttpServer({"/": ok}, max_request_bytes=1024, timeout=5.0)
    assert status_of(await exchange(server, b"\x16\x03\x01garbage\r\n\r\n")) == 400
    assert status_of(await exchange(server, b"GET / HTTP/1.1\r\n")) == 400  # EOF mid-head
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 4096 + b"\r\n\r\n"
    assert status_of(await exchange(server, big)) == 431
    slow = await exchange(server, b"GET / HTTP/1.1\r\n", eof=False)  # never finishes
    assert status_of(slow) == 408
    assert status_of(await exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 200
    s = server.statistics()
    assert (s.bad_requests, s.timeouts, s.responses) == (3, 1, 5)


async def test_connections_beyond_the_cap_get_503() -> None:
    gate = trio.Event()

    async def slow() -> Response:
        await gate.wait()
        return Response(200)

    server = HttpServer({"/": slow}, max_connections=1)
    async with trio.open_nursery() as nursery:
        client, srv = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle, srv)
        await client.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        assert status_of(await exchange(server, b"GET / HTTP/1.1\r\n\r\n")) == 503
        gate.set()
        assert status_of(bytes(await client.receive_some(65536))) == 200
    assert server.statistics().refused_busy == 1


async def test_client_that_vanishes_does_not_escape() -> None:
    async def ok() -> Response:
        return Response(200, b"x" * 100_000)

    server = HttpServer({"/": ok})
    client, srv = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, srv)
        await client.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await client.aclose()  # gone before the answer
    assert server.statistics().client_gone == 1


# -- the RPC observer hook and the Stats method ---------------------------------------


async def test_rpc_observer_and_stats_method(nursery: trio.Nursery) -> None:
    async def echo(req: BytesValue, ctx: CallContext) -> BytesValue:
        return req

    async def denied(req: BytesValue, ctx: CallContext) -> BytesValue:
        raise QpcError("no", code=StatusCode.PERMISSION_DENIED)

    seen: list[tuple[str, str]] = []
    node = FakeNode(store=FakeStore())
    metrics = NodeMetrics(node, process=False)

    def observe(method: str, status: str, seconds: float) -> None:
        assert seconds >= 0
        seen.append((method, status))
        metrics.observe_call(method, status, seconds)

    guard = real_guard()
    table = MethodTable()
    table.register("t.echo", BytesValue, BytesValue, echo)
    table.register("t.denied", BytesValue, BytesValue, denied)
    StatsService(metrics.snapshot, guard).register(table)
    server = RpcServer(table, observer=observe)
    node.rpc = server
    conn = MemoryConnection(server, nursery)
    client = RpcClient(conn.open_stream, retry_policy=None)

    await client.call("t.echo", BytesValue(value=b"x"), BytesValue)
    with pytest.raises(RpcError):
        await client.call("t.denied", BytesValue(), BytesValue)
    with pytest.raises(RpcError):
        await client.call("t.nonexistent", BytesValue(), BytesValue)  # not a label value
    with pytest.raises(RpcError) as ei:
        await client.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
    assert ei.value.code == StatusCode.UNAUTHENTICATED
    assert seen == [
        ("t.echo", "OK"),
        ("t.denied", "PERMISSION_DENIED"),
        (STATS_METHOD, "UNAUTHENTICATED"),
    ]

    user = bytes(range(32))
    conn.state.session.user = user
    resp = await client.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
    samples = {(s.name, s.labels): s.value for s in samples_from_proto(resp)}
    assert samples[("qpc_rpc_calls_total", (("method", "t.echo"), ("status", "OK")))] == 1
    assert samples[("qpc_rpc_responses_total", (("status", "UNIMPLEMENTED"),))] == 1
    assert samples[("qpc_mailbox_messages", ())] == 5
    assert not any(name.endswith("_bucket") for name, _ in samples)
    wire = resp.SerializeToString()
    assert (
        user not in wire and user.hex().encode() not in wire and user[:4].hex().encode() not in wire
    )


def mesh_source() -> Fixed[MeshStatistics]:
    """Every number distinct (from 200 up), so each sample shows which field it read."""
    routing = RoutingStatistics(
        **{f: 200 + i for i, f in enumerate(RoutingStatistics.__struct_fields__)}
    )
    peers = PeerTableStatistics(
        peers=20, up=5, connecting=4, backoff=3, dials=1, dial_failures=7, links_up=8,
        links_down=9, liveness_timeouts=6, forgotten=2,
    )  # fmt: skip
    return Fixed(
        MeshStatistics(
            peers=peers,
            routing=routing,
            updates_received=301,
            updates_rejected=302,
            announce_failures=303,
            bindings_saved=304,
            binding_save_failures=305,
            handovers_pending=306,
        )
    )


def federation_source(neighbours: int) -> Fixed[FederationStatistics]:
    rows = tuple(
        NeighbourStatistics(
            node_id=bytes([i]) * 32,
            link_up=i % 2 == 0,
            rtt=0.01,
            calls=100,
            limited_calls=i,  # neighbour 0 never hit its limit: no series of its own
            bytes_in=1000,
            relay_in=MappingProxyType({"RELAY_QUEUED": 2, "RELAY_DUPLICATE": 1}),
            relayed_out=3,
            refused_out=MappingProxyType({"RELAY_STRANGER_LIMIT": 1}),
            deferred_out=MappingProxyType({"RELAY_NO_ROUTE": i}),
            queued_toward=10 * i,
        )
        for i in range(neighbours)
    )
    return Fixed(
        FederationStatistics(
            node_id=b"\xee" * 32,
            links=401,
            neighbours=rows,
            queued=sum(r.queued_toward for r in rows),
            expired_in_custody=402,
            send_failures=403,
            events_dropped=404,
            trust_refusals=405,
            link_ups=406,
            link_downs=407,
            restarts=409,
            handed_over=408,
            storefwd=StoreFwdStatistics(
                *range(501, 501 + len(StoreFwdStatistics.__struct_fields__))
            ),
        )
    )


async def test_mesh_and_relay_counters_are_exported_with_bounded_labels() -> None:
    mesh, fed = mesh_source(), federation_source(12)
    got = parse(NodeMetrics(FakeNode(mesh=mesh, federation=fed), process=False))
    r = mesh.stats.routing
    assert got[("qpc_mesh_peers", (("state", "up"),))] == 5
    assert got[("qpc_mesh_peers", (("state", "discovered"),))] == 20 - 5 - 4 - 3
    assert got[("qpc_mesh_routes", ())] == r.destinations
    assert got[("qpc_mesh_bindings", ())] == r.bindings
    assert got[("qpc_mesh_updates_sent_total", ())] == r.updates_sent
    assert got[("qpc_mesh_updates_received_total", (("result", "rejected"),))] == 302
    forged = (("outcome", "forged"),)
    assert got[("qpc_mesh_route_announcements_total", forged)] == r.routes_forged
    assert got[("qpc_mesh_binding_announcements_total", forged)] == r.bindings_forged
    replayed = (("outcome", "replayed"),)
    assert got[("qpc_mesh_route_announcements_total", replayed)] == r.routes_replayed
    assert got[("qpc_mesh_binding_announcements_total", replayed)] == r.bindings_replayed
    expired = (("outcome", "expired"),)
    assert got[("qpc_mesh_route_announcements_total", expired)] == r.routes_expired
    assert got[("qpc_mesh_handovers_pending", ())] == 306
    assert got[("qpc_mesh_links_up", ())] == 401
    assert got[("qpc_mesh_link_events_total", (("event", "down"),))] == 407
    assert got[("qpc_mesh_neighbour_restarts_total", ())] == 409
    assert got[("qpc_relay_envelopes_in_total", (("status", "RELAY_QUEUED"),))] == 2 * 12
    assert got[("qpc_relay_envelopes_out_total", ())] == 3 * 12
    assert got[("qpc_relay_refused_out_total", (("status", "RELAY_STRANGER_LIMIT"),))] == 12
    assert got[("qpc_relay_deferred_out_total", (("status", "RELAY_NO_ROUTE"),))] == sum(range(12))
    assert got[("qpc_relay_custody_queued", ())] == 10 * sum(range(12))
    assert got[("qpc_relay_handed_over_total", ())] == 408
    sf = fed.stats.storefwd
    assert got[("qpc_storefwd_held", ())] == sf.held_now
    assert got[("qpc_storefwd_evicted_total", (("reason", "most_hops"),))] == sf.evicted_hops
    assert got[("qpc_storefwd_released_total", ())] == sf.released
    assert got[("qpc_storefwd_expired_total", ())] == sf.expired_held
    assert got[("qpc_storefwd_receipts_total", (("outcome", "forged"),))] == sf.receipts_forged
    assert got[("qpc_storefwd_receipts_total", (("outcome", "applied"),))] == sf.receipts_applied
    assert got[("qpc_storefwd_sprayed_total", ())] == sf.sprayed
    assert got[("qpc_storefwd_rerouted_total", (("to", "held"),))] == sf.rerouted_held
    # Per neighbour: the NEIGHBOUR_LABELS largest, the rest summed as "other".
    by_hop = {
        dict(labels)["neighbour"]: v
        for (name, labels), v in got.items()
        if name == "qpc_relay_custody_queued_by_hop"
    }
    assert len(by_hop) == NEIGHBOUR_LABELS + 1
    assert by_hop[(bytes([11]) * 32).hex()[:16]] == 110
    assert by_hop["other"] == 10 * sum(range(1, 12 - NEIGHBOUR_LABELS))
    hits = {
        dict(labels)["neighbour"]: v
        for (name, labels), v in got.items()
        if name == "qpc_federation_limit_hits_total"
    }
    assert sum(hits.values()) == sum(range(12)) and len(hits) == NEIGHBOUR_LABELS + 1
    # Every number the mesh statistics hold that the collector reads is in a sample.
    values = set(got.values())
    for name in ("updates_received", "announce_failures"):
        assert getattr(mesh.stats, name) in values, name
    for name in ("bindings_evicted", "bindings_restored", "routes_refused", "routes_retracted"):
        assert getattr(r, name) in values, name


async def test_mesh_sources_absent_on_an_island_node() -> None:
    got = parse(NodeMetrics(FakeNode(), process=False))
    assert not [k for k in got if k[0].startswith(("qpc_mesh_", "qpc_relay_"))]


async def test_channel_counters_are_exported_by_outcome_and_reason() -> None:
    fields = list(ChannelStoreStatistics.__struct_fields__)
    stats = ChannelStoreStatistics(**{f: 200 + i for i, f in enumerate(fields)})
    got = parse(NodeMetrics(FakeNode(channels=Fixed(stats)), process=False))
    assert got[("qpc_channel_messages_total", (("outcome", "stored"),))] == stats.stored
    assert got[("qpc_channel_messages_total", (("outcome", "duplicate"),))] == stats.duplicates
    assert got[("qpc_channel_evicted_total", (("reason", "caps"),))] == stats.evicted_caps
    assert got[("qpc_channel_evicted_total", (("reason", "retention"),))] == (
        stats.evicted_retention
    )
    for reason in ("malformed", "too_large", "expired", "expiry_too_far", "hop_limit"):
        want = getattr(stats, f"refused_{reason}")
        assert got[("qpc_channel_refused_total", (("reason", reason),))] == want, reason


def gossip_source() -> Fixed[GossipStatistics]:
    """Every counter a distinct value (driver 1.., core 101.., seen 201..)."""
    seen = SeenStatistics(*range(201, 201 + len(SeenStatistics.__struct_fields__)))
    core_fields = [f for f in PlumtreeStatistics.__struct_fields__ if f != "seen"]
    core = PlumtreeStatistics(**{f: 101 + i for i, f in enumerate(core_fields)}, seen=seen)
    fields = [f for f in GossipStatistics.__struct_fields__ if f != "core"]
    return Fixed(GossipStatistics(**{f: 1 + i for i, f in enumerate(fields)}, core=core))


async def test_gossip_counters_are_exported_by_reason_and_direction() -> None:
    src = gossip_source()
    got = parse(NodeMetrics(FakeNode(gossip=src), process=False))
    g, p = src.stats, src.stats.core
    assert got[("qpc_gossip_peers", (("edge", "eager"),))] == p.eager_peers
    assert got[("qpc_gossip_peers", (("edge", "lazy"),))] == p.peers - p.eager_peers
    assert got[("qpc_gossip_frames_total", (("direction", "in"),))] == g.frames_in
    assert got[("qpc_gossip_frames_total", (("direction", "out"),))] == g.frames_out
    calls = {
        dict(k[1])["direction"] + "/" + dict(k[1])["result"]: v
        for k, v in got.items()
        if k[0] == "qpc_gossip_calls_total"
    }
    assert calls["in/malformed"] == g.malformed_calls and calls["out/failed"] == g.call_failures
    assert calls["in/ok"] + calls["in/malformed"] == g.calls_in
    assert calls["out/ok"] + calls["out/failed"] == g.calls_out
    for reason, want in (
        ("invalid", g.pushes_invalid),
        ("id_mismatch", g.pushes_id_mismatch),
        ("over_hops", g.pushes_over_hops),
        ("rate_limited", g.pushes_rate_limited),
    ):
        assert got[("qpc_gossip_pushes_dropped_total", (("reason", reason),))] == want, reason
    for reason in ("bad_id", "bad_hops", "too_many_ids", "too_large", "empty"):
        want = getattr(g, f"frames_dropped_{reason}")
        assert got[("qpc_gossip_frames_dropped_total", (("reason", reason),))] == want, reason
    assert got[("qpc_gossip_frames_dropped_total", (("reason", "malformed"),))] == p.bad_frames
    assert got[("qpc_gossip_messages_total", (("outcome", "delivered"),))] == g.delivered
    assert got[("qpc_gossip_messages_total", (("outcome", "published"),))] == g.published
    dups = {dict(k[1])["cause"]: v for k, v in got.items() if k[0] == "qpc_gossip_duplicates_total"}
    assert dups["retransmission"] == p.retransmission_duplicates
    assert sum(dups.values()) == p.duplicates
    assert got[("qpc_gossip_pushes_sent_total", (("kind", "retransmit"),))] == p.retransmits
    for frame, sent, received in (
        ("ihave", p.ihave_entries_sent, p.ihave_entries_received),
        ("graft", p.grafts_sent, p.grafts_received),
        ("prune", p.prunes_sent, p.prunes_received),
        ("ack", p.acks_sent, p.acks_received),
    ):
        assert got[("qpc_gossip_control_total", (("direction", "sent"), ("frame", frame)))] == sent
        assert got[("qpc_gossip_control_total", (("direction", "received"), ("frame", frame)))] == (
            received
        )
    assert got[("qpc_gossip_unacked", ())] == p.unacked
    assert got[("qpc_gossip_cache_bytes", ())] == p.cache_bytes
    assert got[("qpc_gossip_seen_ids", ())] == p.seen.ids
    assert got[("qpc_gossip_seen_bytes", ())] == p.seen.memory_bytes
    # Every number the collector reads is in a sample (none read as a default zero).
    values = set(got.values())
    for name in [n for n in vars(GossipStats) if not n.startswith("_") and n != "core"]:
        assert getattr(g, name) in values or name in ("calls_in", "calls_out"), name
    skip = {"seen", "peers", "duplicates"}  # exported as differences, checked above
    for name in [n for n in vars(PlumtreeStats) if not n.startswith("_") and n not in skip]:
        assert getattr(p, name) in values, name
    for name in [n for n in vars(SeenStats) if not n.startswith("_")]:
        assert getattr(p.seen, name) in values, name


def sync_source(**refusals: int) -> Fixed[SyncStatistics]:
    fields = [
        f
        for f in SyncStatistics.__struct_fields__
        if f not in ("refusals_sent", "refusals_received", "last_session_s")
    ]
    return Fixed(
        SyncStatistics(
            **{f: 301 + i for i, f in enumerate(fields)},
            refusals_sent=MappingProxyType({"rate_limited": 7, "too_large": 8}),
            refusals_received=MappingProxyType(dict(refusals)),
            last_session_s=0.25,
        )
    )


async def test_sync_counters_are_exported_by_role_and_reason() -> None:
    # a peer's reason numbers outside the enum are summed as "other" (bounded labels)
    src = sync_source(busy=2, reason_4242=3, reason_99=4)
    got = parse(NodeMetrics(FakeNode(syncer=src), process=False))
    s = src.stats
    for role, outcome, want in (
        ("initiator", "started", s.sessions_initiated),
        ("initiator", "completed", s.sessions_completed),
        ("initiator", "capped", s.sessions_capped),
        ("initiator", "failed", s.sessions_failed),
        ("responder", "served", s.sessions_served),
    ):
        key = ("qpc_sync_sessions_total", (("outcome", outcome), ("role", role)))
        assert got[key] == want, (role, outcome)
    assert got[("qpc_sync_sessions_open", ())] == s.sessions_open
    assert got[("qpc_sync_rounds_total", ())] == s.rounds
    assert got[("qpc_sync_bytes_total", (("direction", "sent"),))] == s.bytes_sent
    assert got[("qpc_sync_bytes_total", (("direction", "received"),))] == s.bytes_received
    assert got[("qpc_sync_ids_total", (("side", "have"),))] == s.ids_have
    assert got[("qpc_sync_ids_total", (("side", "need"),))] == s.ids_need
    assert got[("qpc_sync_items_total", (("direction", "pushed"),))] == s.items_pushed
    assert got[("qpc_sync_items_total", (("direction", "taken"),))] == s.items_taken
    assert got[("qpc_sync_bad_answers_total", ())] == s.bad_answers
    assert got[("qpc_sync_snapshots_total", (("result", "truncated"),))] == s.snapshot_truncated
    assert got[("qpc_sync_last_session_seconds", ())] == 0.25
    refusals = {
        (dict(k[1])["direction"], dict(k[1])["reason"]): v
        for k, v in got.items()
        if k[0] == "qpc_sync_refusals_total"
    }
    assert refusals == {
        ("sent", "rate_limited"): 7,
        ("sent", "too_large"): 8,
        ("received", "busy"): 2,
        ("received", "other"): 7,
    }
    # No session finished yet: no duration, not a zero.
    none = Fixed(replace(s, last_session_s=None))
    got = parse(NodeMetrics(FakeNode(syncer=none), process=False))
    assert not [k for k in got if k[0] == "qpc_sync_last_session_seconds"]


async def test_broadcast_sources_absent_on_an_island_node() -> None:
    got = parse(NodeMetrics(FakeNode(), process=False))
    assert not [k for k in got if k[0].startswith(("qpc_gossip_", "qpc_sync_"))]


async def test_collectors_registered_before_the_registry_exists_are_exported() -> None:
    """The registry is built on first use (a node with metrics off never imports
    prometheus_client); a layer that registers or unregisters before that is not lost."""
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector

    class One(Collector):
        def __init__(self, name: str) -> None:
            self.name = name

        def collect(self) -> Iterator[CounterMetricFamily]:
            yield CounterMetricFamily(self.name, "one", value=1)

    m = NodeMetrics(FakeNode(), process=False)
    kept, dropped = One("qpc_kept"), One("qpc_dropped")
    m.register(kept)
    m.register(dropped)
    m.unregister(dropped)
    m.observe_call("m", "OK", 0.01)
    names = {name for name, _ in parse(m)}
    assert {"qpc_kept_total", "qpc_rpc_calls_total"} <= names
    assert "qpc_dropped_total" not in names
    m.unregister(kept)  # after the registry exists: from the registry itself
    assert "qpc_kept_total" not in {name for name, _ in parse(m)}
