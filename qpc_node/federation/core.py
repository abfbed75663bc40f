"""Federation: links to neighbour nodes, the qpc-fed/1 RPCs, and hop-by-hop custody.

One :class:`Federation` per node. It rides on the node's one QUIC endpoint:
the node routes streams of ``qpc-fed/1`` connections to :meth:`handle_stream`
(``qpc/1`` clients never reach the federation methods, which live in their own
method table), and links are dialled from the same socket.

The work is split by job, with :class:`Federation` as the facade the node, the
mesh service and the tests use:

- :mod:`.links`: one connection per neighbour, admission through the trust
  policy, the preferred-link rule for simultaneous dials, ping monitor and
  up/down events (:class:`~.links.Links`);
- :mod:`.custody`: intake into the mailbox or the SQLite custody queue, one
  drainer per next hop, the expiry sweep, refusals (:class:`~.custody.Custody`);
- this module: the federation RPC handlers (per-neighbour call and byte budgets
  charged first), the client side of KeyPackage proxying and announcements,
  statistics, and :func:`build_federation`.

Names that used to live here (``LinkTimers``, ``LinkEvent``, ``status_name``,
``M_RELAY``, ...) are re-exported, so ``from qpc_node.federation.core import``
keeps working.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import Message

from qpc_node.errors import ConfigError, QpcError, RemoteProtocolError, StatusCode
from qpc_node.federation.custody import (
    M_RELAY,
    UNKNOWN_ORIGIN,
    Custody,
    RelayRefusal,
    status_name,
)
from qpc_node.federation.limits import FederationLimits
from qpc_node.federation.links import (
    CLOSE_DEAD,
    CLOSE_DUPLICATE,
    CLOSE_REFUSED,
    LINK_KEY,
    M_PING,
    NODE_KEY,
    Link,
    LinkEvent,
    LinkInfo,
    Links,
    LinkTimers,
)
from qpc_node.federation.routes import Local, NextHop, Resolver
from qpc_node.federation.stats import (
    CounterTable,
    FederationStatistics,
    NeighbourStatistics,
)
from qpc_node.federation.trust import (
    FederationServerTLS,
    ManagedTrust,
    MeshTrust,
    TrustPolicy,
)
from qpc_node.mesh.nodeid import node_id_of_credentials, short
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.quic import Connection, Endpoint, QuicStream
from qpc_node.quic.tls import NodeCredentials
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.rpc.server import RpcServer, ServerConfig
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.federation import load_trust, save_trust
from qpc_node.storefwd import receipts
from qpc_node.storefwd.forward import M_RECEIPT
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2

if TYPE_CHECKING:  # storefwd/gossip.py imports this module
    from qpc_node.storefwd.gossip import GossipLimits

__all__ = [
    "CLOSE_DEAD",
    "CLOSE_DUPLICATE",
    "CLOSE_REFUSED",
    "MAX_ANNOUNCE",
    "MAX_BATCH",
    "M_ANNOUNCE",
    "M_KEYPACKAGE",
    "M_PING",
    "M_RELAY",
    "UNKNOWN_ORIGIN",
    "AnnounceSink",
    "Federation",
    "FederationLimits",
    "FederationSetup",
    "FederationStatistics",
    "LinkEvent",
    "LinkInfo",
    "LinkTimers",
    "NeighbourStatistics",
    "RelayRefusal",
    "StaticPeer",
    "build_federation",
    "open_mesh_trust",
    "status_name",
]

log = get_logger("qpc.federation")

M_KEYPACKAGE = "qpc.v1.Federation/ProxyKeyPackageFetch"
M_ANNOUNCE = "qpc.v1.Federation/Announce"

MAX_BATCH = 256
MAX_ANNOUNCE = 64 * 1024
_NODE_KEY = NODE_KEY

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

AnnounceSink = Callable[[bytes, bytes], bool]
"""``sink(from_node, payload) -> accepted``: the routing core's intake (sans-IO, sync)."""


class Federation:
    """Links, federation RPCs and custody of one node (see the module docstring)."""

    def __init__(
        self,
        credentials: NodeCredentials,
        store: AsyncStore,
        policy: TrustPolicy,
        resolve: Resolver,
        *,
        on_local: Callable[[bytes], None] | None = None,
        announce_sink: AnnounceSink | None = None,
        limits: FederationLimits | None = None,
        timers: LinkTimers | None = None,
        wall_ms: WallClock = system_wall_ms,
        event_buffer: int = 1024,
        home_of: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        self.node_id = node_id_of_credentials(credentials)
        self.credentials = credentials
        self.policy = policy
        self.server_tls = FederationServerTLS(credentials, policy)
        self._store = store
        self._resolve = resolve
        self._announce_sink = announce_sink
        self.limits = limits or FederationLimits()
        self._timers = timers or LinkTimers()
        self._wall_ms = wall_ms
        table = self._table = MethodTable()
        self._register(table)
        self.rpc_server = RpcServer(
            table,
            ServerConfig(
                max_frame_size=self.limits.max_frame_size,
                max_concurrent_calls=self.limits.max_concurrent_calls,
            ),
        )
        lim = self.limits
        self._call_budget = TokenBucketLimiter[bytes](
            rate=lim.calls_per_second, burst=lim.call_burst
        )
        self._byte_budget = TokenBucketLimiter[bytes](
            rate=lim.bytes_per_second, burst=lim.byte_burst
        )
        self._kp_forwarding: set[bytes] = set()
        self._link_listeners: list[Callable[[LinkEvent], None]] = []
        self._count = CounterTable()
        self._links = Links(
            self.node_id,
            credentials,
            policy,
            store,
            self.rpc_server,
            self.timers,
            wall_ms=wall_ms,
            on_up=self._on_link_up,
            on_event=self._on_link_event,
            event_buffer=event_buffer,
        )
        self.events = self._links.events
        self._links.carrier = self.limits.storefwd.carrier
        key = credentials.private_key()
        sign: Callable[[bytes], bytes] | None = None
        public: bytes | None = None
        if isinstance(key, ed25519.Ed25519PrivateKey):  # receipts need an Ed25519 node key
            sign = key.sign
            public = key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        self.custody = Custody(
            self.node_id,
            store,
            # Read at each call: the resolver may be swapped after construction.
            lambda recipient: self._resolve(recipient),
            self._links,
            self._count,
            limits=self.limits,
            timers=self.timers,
            wall_ms=wall_ms,
            on_local=on_local,
            sign=sign,
            public_key=public,
            home_of=home_of,
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(
        self, endpoint: Endpoint, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve links and drain custody until cancelled (the node's nursery)."""
        self._links.endpoint = endpoint
        try:
            async with trio.open_nursery() as nursery:
                self._links.nursery = nursery
                await self.custody.start(nursery)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._links.nursery = None
            self.custody.stop()
            self._links.close_all("federation stopping")

    @property
    def timers(self) -> LinkTimers:
        return self._timers

    @timers.setter
    def timers(self, timers: LinkTimers) -> None:
        """New timers for links and custody alike (tests tighten them after building)."""
        self._timers = self._links.timers = self.custody.timers = timers

    @property
    def endpoint(self) -> Endpoint | None:
        """The node's QUIC endpoint while running (links are dialled from it)."""
        return self._links.endpoint

    def _on_link_up(self, nid: bytes) -> None:
        self.custody.kick(nid)
        self.custody.storefwd.link_up(nid)

    def routes_changed(self) -> None:
        """The routing core's table changed: held envelopes may have a route now."""
        self.custody.storefwd.routes_changed()

    # ------------------------------------------------------------------ extensions
    # Hooks for services that ride on the links without being part of the federation
    # (the gossip driver, storefwd/gossip.py): a method of their own on the federation
    # table, calls to one neighbour, and the link events as they happen.
    def add_link_listener(self, listener: Callable[[LinkEvent], None]) -> None:
        """``listener(event)`` on every link up/down, synchronously; it must not raise."""
        self._link_listeners.append(listener)

    def _on_link_event(self, event: LinkEvent) -> None:
        for listener in self._link_listeners:
            listener(event)

    def register_method(
        self,
        name: str,
        request_type: type[RequestT],
        response_type: type[ResponseT],
        handler: Callable[[RequestT, bytes], Awaitable[ResponseT]],
    ) -> None:
        """Serve ``name`` to neighbours: ``handler(request, calling_node_id)``, after the
        caller's federation call and byte budgets are charged (as for every method)."""

        async def serve(req: RequestT, ctx: CallContext) -> ResponseT:
            return await handler(req, self._caller(ctx, req.ByteSize()))

        self._table.register(name, request_type, response_type, serve)

    async def call_neighbour(
        self,
        nid: bytes,
        method: str,
        request: Message,
        response_type: type[ResponseT],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- the RPC client's own deadline
    ) -> ResponseT:
        """One call of ``method`` on neighbour ``nid``'s federation table (UNAVAILABLE
        without a link); ``timeout`` defaults to the link timers' call timeout."""
        return await self._link(nid).rpc.call(
            method, request, response_type, timeout=timeout or self.timers.call_timeout
        )

    # ------------------------------------------------------------------ links
    async def connect(self, host: str, port: int, *, expected: bytes | None = None) -> bytes:
        """Dial a neighbour once; returns its node id once the link is up.

        Raises HandshakeError (refused by either side's policy, unreachable) or
        CertificateRejected (refused after the handshake: a changed key).
        """
        return await self._links.connect(host, port, expected=expected)

    async def maintain(
        self,
        host: str,
        port: int,
        *,
        expected: bytes | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a link to a static peer: dial, wait while it is up, redial with backoff."""
        await self._links.maintain(host, port, expected=expected, task_status=task_status)

    def links(self) -> list[LinkInfo]:
        return self._links.infos()

    def link_up(self, nid: bytes) -> bool:
        return self._links.up(nid)

    async def wait_link(self, nid: bytes) -> None:
        """Until a link to ``nid`` is up (tests, the demo)."""
        await self._links.wait(nid)

    async def handle_stream(self, conn: Connection, stream: QuicStream) -> None:
        """A peer-initiated stream on a ``qpc-fed/1`` connection (the node routes it here)."""
        await self._links.handle_stream(conn, stream)

    async def ping(self, nid: bytes) -> float:
        """One health round trip to neighbour ``nid``: its RTT in seconds."""
        return await self._links.ping(nid)

    def _link(self, nid: bytes) -> Link:
        return self._links.require(nid)

    # ------------------------------------------------------------------ trust
    async def trust(self, nid: bytes) -> None:
        """Accept ``nid`` after a refused key change (``qpc trust`` / ``/mesh trust``)."""
        trust = getattr(self.policy, "trust", None)
        if trust is None:
            raise QpcError(
                f"{self.policy.mode} mode trusts the community CA, not node ids",
                code=StatusCode.FAILED_PRECONDITION,
            )
        now = self._wall_ms()
        changes = trust(nid, now)
        await self._store.run(lambda s: save_trust(s, changes, now))

    # ------------------------------------------------------------------ custody
    async def submit(
        self, envelopes: Sequence[envelope_pb2.Envelope], *, origin: bytes
    ) -> list[federation_pb2.RelayResult]:
        """Route envelopes that start here (see :meth:`.custody.Custody.submit`)."""
        return await self.custody.submit(envelopes, origin=origin)

    async def take_custody(
        self,
        envelopes: Sequence[envelope_pb2.Envelope],
        *,
        from_node: bytes,
        origins: Sequence[bytes] = (),
        origin_nodes: Sequence[bytes] = (),
        spray_tokens: Sequence[int] = (),
        handover: Sequence[bool] = (),
    ) -> list[federation_pb2.RelayResult]:
        """A neighbour's envelopes (see :meth:`.custody.Custody.take_custody`)."""
        return await self.custody.take_custody(
            envelopes,
            from_node=from_node,
            origins=origins,
            origin_nodes=origin_nodes,
            spray_tokens=spray_tokens,
            handover=handover,
        )

    def refusals(self) -> list[RelayRefusal]:
        """Recent envelopes a next hop refused for good (newest last, bounded)."""
        return self.custody.refusals()

    # ------------------------------------------------------------------ RPC: client side
    async def fetch_key_package(self, identity: bytes) -> tuple[bytes, bool]:
        """A KeyPackage of a user homed on a neighbour (proxied over its link)."""
        route = self._resolve(identity)
        if not isinstance(route, NextHop):
            raise QpcError(
                f"user {short(identity)} is not homed on a neighbour", code=StatusCode.NOT_FOUND
            )
        resp = await self._link(route.node_id).rpc.call(
            M_KEYPACKAGE,
            federation_pb2.ProxyKeyPackageFetchRequest(identity=identity),
            federation_pb2.ProxyKeyPackageFetchResponse,
            timeout=self.timers.call_timeout,
        )
        return resp.key_package, resp.last_resort

    async def announce(self, nid: bytes, payload: bytes) -> bool:
        """Hand an opaque routing payload to neighbour ``nid``; True if it accepted it."""
        resp = await self._link(nid).rpc.call(
            M_ANNOUNCE,
            federation_pb2.AnnounceRequest(payload=payload),
            federation_pb2.AnnounceResponse,
            timeout=self.timers.call_timeout,
        )
        return resp.accepted

    # ------------------------------------------------------------------ RPC: server side
    def _register(self, table: MethodTable) -> None:
        table.register(
            M_RELAY,
            federation_pb2.RelayEnqueueRequest,
            federation_pb2.RelayEnqueueResponse,
            self._h_relay,
        )
        table.register(
            M_KEYPACKAGE,
            federation_pb2.ProxyKeyPackageFetchRequest,
            federation_pb2.ProxyKeyPackageFetchResponse,
            self._h_keypackage,
        )
        table.register(
            M_ANNOUNCE,
            federation_pb2.AnnounceRequest,
            federation_pb2.AnnounceResponse,
            self._h_announce,
        )
        table.register(
            M_PING, federation_pb2.PingRequest, federation_pb2.PingResponse, self._h_ping
        )
        table.register(
            M_RECEIPT,
            federation_pb2.ReceiptRequest,
            federation_pb2.ReceiptResponse,
            self._h_receipt,
        )

    def _caller(self, ctx: CallContext, nbytes: int) -> bytes:
        """The calling neighbour's node id, after charging its call and byte budgets."""
        nid = ctx.session.data.get(_NODE_KEY)
        if not isinstance(nid, bytes):  # cannot happen: only admitted links get here
            raise QpcError("not a federation peer", code=StatusCode.UNAUTHENTICATED)
        c = self._count(nid)
        c.calls += 1
        c.bytes_in += nbytes
        now = trio.current_time()
        # Cost within (0, burst]: an empty message still costs a byte, and a frame
        # larger than the burst drains the bucket instead of being unpayable.
        cost = min(max(1.0, float(nbytes)), self.limits.byte_burst)
        if not self._call_budget.allow(nid, now) or not self._byte_budget.allow(
            nid, now, cost=cost
        ):
            c.limited_calls += 1
            raise QpcError(
                f"node {short(nid)} is over its federation budget",
                code=StatusCode.RESOURCE_EXHAUSTED,
            )
        return nid

    async def _h_relay(
        self, req: federation_pb2.RelayEnqueueRequest, ctx: CallContext
    ) -> federation_pb2.RelayEnqueueResponse:
        src = self._caller(ctx, req.ByteSize())
        if not 0 < len(req.envelopes) <= MAX_BATCH:
            raise RemoteProtocolError(f"a relay batch holds 1..{MAX_BATCH} envelopes")
        results = await self.take_custody(
            list(req.envelopes),
            from_node=src,
            origins=list(req.origins),
            origin_nodes=list(req.origin_nodes),
            spray_tokens=list(req.spray_tokens),
            handover=list(req.handover),
        )
        c = self._count(src)
        for r in results:
            c.relay_in[status_name(r.status)] += 1
        return federation_pb2.RelayEnqueueResponse(results=results)

    async def _h_receipt(
        self, req: federation_pb2.ReceiptRequest, ctx: CallContext
    ) -> federation_pb2.ReceiptResponse:
        src = self._caller(ctx, req.ByteSize())
        parsed = receipts.parse_receipts(req.receipts)  # over MAX_RECEIPTS: refused whole
        taken = await self.custody.storefwd.on_receipts(src, list(parsed))
        return federation_pb2.ReceiptResponse(taken=taken)

    async def _h_keypackage(
        self, req: federation_pb2.ProxyKeyPackageFetchRequest, ctx: CallContext
    ) -> federation_pb2.ProxyKeyPackageFetchResponse:
        self._caller(ctx, req.ByteSize())
        if len(req.identity) != 32:
            raise RemoteProtocolError("identity must be a 32-byte fingerprint")
        route = self._resolve(req.identity)
        if isinstance(route, NextHop) and route.node_id != self.node_id:
            return await self._forward_keypackage(req.identity)
        if not isinstance(route, Local):
            raise QpcError(
                f"user {short(req.identity)} is not homed here", code=StatusCode.NOT_FOUND
            )
        rec = await self._store.fetch_keypackage(req.identity, self._wall_ms())
        if rec is None:
            raise QpcError(
                f"no KeyPackage available for {short(req.identity)}", code=StatusCode.NOT_FOUND
            )
        return federation_pb2.ProxyKeyPackageFetchResponse(
            key_package=rec.data, last_resort=rec.last_resort
        )

    async def _forward_keypackage(
        self, identity: bytes
    ) -> federation_pb2.ProxyKeyPackageFetchResponse:
        """A fetch for a user homed further away goes on via our next hop.

        Routes are loop-free once converged; while they are not, a request could
        come back here: one forwarded fetch per identity at a time, a second one
        (the loop, or a concurrent inviter) is refused retriably.
        """
        if identity in self._kp_forwarding:
            raise QpcError(
                f"a fetch for {short(identity)} is already on its way", code=StatusCode.UNAVAILABLE
            )
        self._kp_forwarding.add(identity)
        try:
            kp, last_resort = await self.fetch_key_package(identity)
        finally:
            self._kp_forwarding.discard(identity)
        return federation_pb2.ProxyKeyPackageFetchResponse(key_package=kp, last_resort=last_resort)

    async def _h_announce(
        self, req: federation_pb2.AnnounceRequest, ctx: CallContext
    ) -> federation_pb2.AnnounceResponse:
        src = self._caller(ctx, req.ByteSize())
        if len(req.payload) > MAX_ANNOUNCE:
            raise RemoteProtocolError(f"announce payload over {MAX_ANNOUNCE} bytes")
        sink = self._announce_sink
        return federation_pb2.AnnounceResponse(accepted=sink is not None and sink(src, req.payload))

    async def _h_ping(
        self, req: federation_pb2.PingRequest, ctx: CallContext
    ) -> federation_pb2.PingResponse:
        src = self._caller(ctx, req.ByteSize())
        link = ctx.session.data.get(LINK_KEY)
        if isinstance(link, Link):
            if req.boot_id:
                self._links.note_boot(link, req.boot_id)
            was, link.carrier = link.carrier, req.carrier
            if link.carrier and not was:
                self.custody.storefwd.carrier_up(src)
        return federation_pb2.PingResponse(
            nonce=req.nonce,
            node_id=self.node_id,
            relay_queue=self.custody.queued_toward(src),
            boot_id=self._links.boot_id,
            carrier=self._links.carrier,
        )

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> FederationStatistics:
        queued = self.custody.queued
        nodes = (
            self._count.nodes() | set(self._links.node_ids()) | {h for h, n in queued.items() if n}
        )
        neigh = []
        for nid in sorted(nodes):
            c = self._count(nid)
            link = self._links.get(nid)
            neigh.append(
                NeighbourStatistics(
                    node_id=nid,
                    link_up=link is not None,
                    rtt=link.rtt if link is not None else None,
                    calls=c.calls,
                    limited_calls=c.limited_calls,
                    bytes_in=c.bytes_in,
                    relay_in=MappingProxyType(dict(c.relay_in)),
                    relayed_out=c.relayed_out,
                    refused_out=MappingProxyType(dict(c.refused_out)),
                    deferred_out=MappingProxyType(dict(c.deferred_out)),
                    queued_toward=self.custody.queued_toward(nid),
                )
            )
        return FederationStatistics(
            node_id=self.node_id,
            links=len(self._links),
            neighbours=tuple(neigh),
            queued=sum(max(0, n) for n in queued.values()),
            expired_in_custody=self.custody.expired,
            send_failures=self.custody.send_failures,
            events_dropped=self._links.events_dropped,
            trust_refusals=int(getattr(self.policy, "refusals", 0)),
            link_ups=self._links.ups,
            link_downs=self._links.downs,
            restarts=self._links.restarts,
            handed_over=self.custody.handed_over,
            storefwd=self.custody.storefwd.statistics(),
        )


async def open_mesh_trust(store: AsyncStore) -> MeshTrust:
    """The mesh-mode policy with the pins this node saved before."""
    return MeshTrust(await store.run(load_trust))


class StaticPeer(msgspec.Struct, frozen=True):
    """A neighbour to keep a link to: ``host:port`` and, if known, its node id (pinned)."""

    host: str
    port: int
    node_id: bytes | None = None


class FederationSetup(msgspec.Struct, frozen=True):
    """Opt-in federation for a :class:`~qpc_node.node.Node`.

    Programmatic until the mesh round wires ``mesh.*``/``federation.*`` config
    (which stays refused until then). ``resolve`` is the routing decision
    (:class:`~qpc_node.federation.routes.StaticRoutes` or the routing core).
    """

    resolve: Resolver
    mode: Literal["mesh", "managed"] = "mesh"
    ca_pem: bytes | None = None
    static_peers: tuple[StaticPeer, ...] = ()
    limits: FederationLimits | None = None
    timers: LinkTimers | None = None
    announce_sink: AnnounceSink | None = None
    home_of: Callable[[bytes], bytes | None] | None = None
    """A user's home node id in the routing bindings (receipts are verified against
    it); None: the resolver's ``home_of`` if it has one (StaticRoutes), else unknown."""
    gossip_limits: GossipLimits | None = None
    """Per-neighbour limits of the broadcast driver (storefwd/gossip.py); None: its defaults."""


async def build_federation(
    setup: FederationSetup,
    credentials: NodeCredentials,
    store: AsyncStore,
    *,
    on_local: Callable[[bytes], None] | None = None,
    wall_ms: WallClock = system_wall_ms,
) -> Federation:
    """The node's Federation for ``setup`` (mesh pins loaded from the store)."""
    policy: TrustPolicy
    if setup.mode == "managed":
        if setup.ca_pem is None:
            raise ConfigError("managed federation needs the community CA certificate")
        policy = ManagedTrust(setup.ca_pem)
    else:
        policy = await open_mesh_trust(store)
    return Federation(
        credentials,
        store,
        policy,
        setup.resolve,
        on_local=on_local,
        announce_sink=setup.announce_sink,
        limits=setup.limits,
        timers=setup.timers,
        wall_ms=wall_ms,
        home_of=setup.home_of or getattr(setup.resolve, "home_of", None),
    )
