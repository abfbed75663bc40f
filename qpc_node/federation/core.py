"""Federation: links to neighbour nodes, the qpc-fed/1 RPCs, and hop-by-hop custody.

One :class:`Federation` per node. It rides on the node's one QUIC endpoint:
the node routes streams of ``qpc-fed/1`` connections to :meth:`handle_stream`
(``qpc/1`` clients never reach the federation methods, which live in their own
method table), and links are dialled from the same socket.

Links. One long-lived connection per neighbour node id. When both ends dial
at once the connection dialled by the *lower* node id wins on both sides (a
rule both apply without talking), the other is closed. A monitor per link
sends ``Ping`` every ``ping_interval`` (RTT) and declares the link down when
no ping succeeded for ``dead_after`` -- or at once when QUIC closes the
connection -- so a silent peer is down within ``dead_after + ping_interval``
(15 s with the defaults). Up/down events go to :attr:`Federation.events`.

Custody. ``RelayEnqueue`` answers per envelope; a hop answers QUEUED or
STORED_LOCAL only after the SQLite transaction that holds the envelope has
committed (custody queue toward its next hop, or the recipient's mailbox).
A drainer per next hop sends what it holds while the link is up, deletes a
row only when the next hop took custody (or refused it for good: counted and
logged, never silently), and backs off on retriable refusals and errors.
Every hop is idempotent on msg_id (the mailbox's unique index and the
relay seen-set), so retries after a lost answer never store twice.

Fairness. Each relayed envelope carries its declared origin (the sending
user's fingerprint, proven to the node where it entered the federation) hop
by hop, in the custody queue and on the wire. The recipient's home node
stores it as from ``SenderKey.relayed(calling node, origin)``, so relayed
mail faces the same mailbox fairness as local mail (store/fairness.py): a
stranger gets its share of the stranger pool, keyed by (neighbour, origin),
and the recipient's contacts keep the rest. A stranger-limit refusal is
final for the sending hop (RELAY_STRANGER_LIMIT: retrying would let a flood
occupy the custody queue toward this node, the same exhaustion one hop up);
a full mailbox is retried with backoff until expiry (RELAY_MAILBOX_FULL).
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, cast

import trio

from qpc_node.errors import (
    ConfigError,
    LocalProtocolError,
    QpcError,
    RemoteProtocolError,
    StatusCode,
)
from qpc_node.federation.routes import Local, NextHop, Resolver
from qpc_node.federation.trust import (
    FederationClientTLS,
    FederationServerTLS,
    KeyChanged,
    ManagedTrust,
    MeshTrust,
    TrustPolicy,
)
from qpc_node.mesh.nodeid import node_id_of_credentials, short
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.quic import Connection, Endpoint, QuicStream
from qpc_node.quic.address import format_address
from qpc_node.quic.tls import CertificateRejected, NodeCredentials
from qpc_node.rpc.client import NO_RETRY, RpcClient
from qpc_node.rpc.context import CallContext, PeerInfo
from qpc_node.rpc.methods import MethodTable
from qpc_node.rpc.server import RpcServer, ServerConfig, ServerConnection
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.errors import QuotaExceeded
from qpc_node.store.fairness import Reason, SenderKey
from qpc_node.store.federation import (
    QueuedRelay,
    RelayItem,
    RelayQueueLimits,
    load_trust,
    relay_accept,
    relay_done,
    relay_due,
    relay_expire,
    relay_hops,
    relay_next_attempt,
    relay_retry_later,
    save_trust,
)
from qpc_node.store.records import FINGERPRINT_LEN, Envelope
from qpc_node.store.store import EnqueueBatch
from qpc_node.wire.envelope import Envelope as WireEnvelope
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2

log = get_logger("qpc.federation")

M_RELAY = "qpc.v1.Federation/RelayEnqueue"
M_KEYPACKAGE = "qpc.v1.Federation/ProxyKeyPackageFetch"
M_ANNOUNCE = "qpc.v1.Federation/Announce"
M_PING = "qpc.v1.Federation/Ping"

MAX_BATCH = 256
MAX_ANNOUNCE = 64 * 1024
_NODE_KEY = "fed.node"
CLOSE_DUPLICATE = 0x101  # application close codes on qpc-fed/1
CLOSE_REFUSED = 0x102
CLOSE_DEAD = 0x103

# Custody passed: the hop holds it (or already did).
_TAKEN = frozenset(
    {federation_pb2.RELAY_STORED_LOCAL, federation_pb2.RELAY_QUEUED, federation_pb2.RELAY_DUPLICATE}
)
# May succeed later: keep it and retry with backoff (until it expires).
_RETRY = frozenset({federation_pb2.RELAY_NO_ROUTE, federation_pb2.RELAY_QUEUE_FULL})
# The recipient's mailbox is full: retry too, but on the slower full-mailbox backoff.
_RETRY_FULL = frozenset({federation_pb2.RELAY_MAILBOX_FULL})

UNKNOWN_ORIGIN = bytes(FINGERPRINT_LEN)
"""The origin fairness uses for an envelope whose previous hop declared none (a peer
predating ``RelayEnqueueRequest.origins``): with the relaying node it makes one sender
key per neighbour, so all such mail from one neighbour shares one stranger share. No
user has this fingerprint (it would be a SHA-256 preimage of zero)."""

_STRANGER_REASONS = frozenset({Reason.STRANGER_SHARE_USED.value, Reason.STRANGER_POOL_FULL.value})

AnnounceSink = Callable[[bytes, bytes], bool]
"""``sink(from_node, payload) -> accepted``: the routing core's intake (sans-IO, sync)."""


def status_name(status: int) -> str:
    """The enum name; a value this build does not know (a newer peer's) stays a number
    instead of raising in the drainer."""
    try:
        return federation_pb2.RelayStatus.Name(cast(federation_pb2.RelayStatus, status))
    except ValueError:
        return f"RELAY_STATUS_{status:d}"


@dataclass(frozen=True, slots=True)
class FederationLimits:
    """Per-neighbour limits: one abusive neighbour exhausts its own budget, not others'."""

    calls_per_second: float = 200.0
    call_burst: float = 400.0
    bytes_per_second: float = 8 * 1024 * 1024
    byte_burst: float = 16 * 1024 * 1024
    max_concurrent_calls: int = 32
    queue: RelayQueueLimits = field(default_factory=RelayQueueLimits)
    relay_batch: int = 64
    max_frame_size: int = 6 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LinkTimers:
    """Liveness and retry timing (defaults: a silent peer is down within 15 s)."""

    ping_interval: float = 2.5
    ping_timeout: float = 2.5
    dead_after: float = 9.0
    redial_initial: float = 0.5
    redial_max: float = 30.0
    retry_initial: float = 0.2
    retry_max: float = 30.0
    full_retry_max: float = 300.0
    """Longest wait between tries of an envelope whose recipient's mailbox is full
    (RELAY_MAILBOX_FULL): the recipient must come back and fetch first, so retrying
    often only costs both nodes work."""
    call_timeout: float = 10.0
    sweep_interval: float = 60.0
    race_window: float = 5.0
    """Two links to one node made this close together are a simultaneous dial."""

    def __post_init__(self) -> None:
        if min(self.ping_interval, self.ping_timeout, self.dead_after) <= 0:
            raise ConfigError("link timers must be > 0")

    @property
    def detection_bound(self) -> float:
        """Worst case from a peer's last answer to "down": the last ping that could
        still succeed ends just before ``dead_after``; one more interval and one
        more timed-out ping later the monitor declares it."""
        return self.dead_after + self.ping_interval + self.ping_timeout


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A neighbour came up or went down (feeds the mesh peer table)."""

    kind: Literal["up", "down"]
    node_id: bytes
    address: str
    rtt: float | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LinkInfo:
    node_id: bytes
    address: str
    dialled_by_us: bool
    rtt: float | None
    up_since: float


@dataclass(frozen=True, slots=True)
class RelayRefusal:
    """A next hop refused an envelope for good: custody ended here, with this status."""

    msg_id: bytes
    next_hop: bytes
    status: int
    detail: str

    @property
    def status_name(self) -> str:
        return status_name(self.status)


@dataclass(frozen=True, slots=True)
class NeighbourStatistics:
    node_id: bytes
    link_up: bool
    rtt: float | None
    calls: int
    limited_calls: int  # refused by the per-neighbour call or byte budget
    bytes_in: int
    relay_in: Mapping[str, int]  # envelopes it handed us, by our answer (read-only)
    relayed_out: int  # envelopes it took custody of from us
    refused_out: Mapping[str, int]  # envelopes it refused for good, by status (read-only)
    deferred_out: Mapping[str, int]  # answers "not yet" (kept, retried), by status (read-only)
    queued_toward: int  # envelopes we hold for it right now


@dataclass(frozen=True, slots=True)
class FederationStatistics:
    node_id: bytes
    links: int
    neighbours: tuple[NeighbourStatistics, ...]
    queued: int
    expired_in_custody: int
    send_failures: int
    events_dropped: int
    trust_refusals: int


@dataclass(slots=True)
class _Counters:
    calls: int = 0
    limited_calls: int = 0
    bytes_in: int = 0
    relay_in: Counter[str] = field(default_factory=Counter)
    relayed_out: int = 0
    refused_out: Counter[str] = field(default_factory=Counter)
    deferred_out: Counter[str] = field(default_factory=Counter)


class _Link:
    """One live federation connection to a neighbour."""

    def __init__(
        self, nid: bytes, conn: Connection, dialler: bytes, state: ServerConnection
    ) -> None:
        self.node_id = nid
        self.conn = conn
        self.dialler = dialler
        self.state = state
        self.address = format_address(conn.remote_address)
        self.rpc = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
        self.rtt: float | None = None
        self.up_since = trio.current_time()
        self.last_ok = self.up_since
        self.down = trio.Event()


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
    ) -> None:
        self.node_id = node_id_of_credentials(credentials)
        self.credentials = credentials
        self.policy = policy
        self.server_tls = FederationServerTLS(credentials, policy)
        self._store = store
        self._resolve = resolve
        self._on_local = on_local
        self._announce_sink = announce_sink
        self.limits = limits or FederationLimits()
        self.timers = timers or LinkTimers()
        self._wall_ms = wall_ms
        table = MethodTable()
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
        self._links: dict[bytes, _Link] = {}
        self._kp_forwarding: set[bytes] = set()
        self._by_conn: dict[Connection, _Link] = {}
        self._admitting: dict[Connection, trio.Event] = {}
        self._wake: dict[bytes, trio.Event] = {}  # per next hop: its drainer's wakeup
        self._link_waiters: dict[bytes, trio.Event] = {}
        self._drainers: set[bytes] = set()
        self._queued: Counter[bytes] = Counter()
        self._counters: dict[bytes, _Counters] = {}
        self._refusals: deque[RelayRefusal] = deque(maxlen=1024)
        self._expired = 0
        self._send_failures = 0
        self._events_dropped = 0
        self._events_tx, self.events = trio.open_memory_channel[LinkEvent](event_buffer)
        self._endpoint: Endpoint | None = None
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ lifecycle
    async def run(
        self, endpoint: Endpoint, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve links and drain custody until cancelled (the node's nursery)."""
        self._endpoint = endpoint
        held = await self._store.run(relay_hops)
        self._queued = Counter(held)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for hop in held:
                    self._ensure_drainer(hop)
                nursery.start_soon(self._sweep)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for link in list(self._links.values()):
                link.conn.close_now(0, "federation stopping")

    # ------------------------------------------------------------------ links
    async def connect(self, host: str, port: int, *, expected: bytes | None = None) -> bytes:
        """Dial a neighbour once; returns its node id once the link is up.

        Raises HandshakeError (refused by either side's policy, unreachable) or
        CertificateRejected (refused after the handshake: a changed key).
        """
        ep = self._require_endpoint()
        tls = FederationClientTLS(self.credentials, self.policy, expected=expected)
        conn = await ep.connect(host, port, tls)
        gate = self._admitting[conn] = trio.Event()
        try:
            nid = await self._admit(conn, expected)
            link = self._install(conn, nid, dialler=self.node_id)
        finally:
            del self._admitting[conn]
            gate.set()
        await self._ping(link)  # first RTT; also how the peer learns of the link
        return link.node_id

    async def maintain(
        self,
        host: str,
        port: int,
        *,
        expected: bytes | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a link to a static peer: dial, wait while it is up, redial with backoff.

        Does not dial while a link to ``expected`` exists (the peer dialled us).
        """
        task_status.started()
        backoff = self.timers.redial_initial
        while True:
            link = self._links.get(expected) if expected is not None else None
            if link is None:
                try:
                    nid = await self.connect(host, port, expected=expected)
                    link = self._links.get(nid)
                    backoff = self.timers.redial_initial
                except (QpcError, OSError, trio.BrokenResourceError) as exc:
                    log.info(
                        "federation: dial failed",
                        extra={"addr": f"{host}:{port}", "err": str(exc)},
                    )
            if link is not None:
                await link.down.wait()
                continue
            await trio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self.timers.redial_max)

    def links(self) -> list[LinkInfo]:
        return [
            LinkInfo(k.node_id, k.address, k.dialler == self.node_id, k.rtt, k.up_since)
            for k in sorted(self._links.values(), key=lambda k: k.node_id)
        ]

    def link_up(self, nid: bytes) -> bool:
        return nid in self._links

    async def wait_link(self, nid: bytes) -> None:
        """Until a link to ``nid`` is up (tests, the demo)."""
        while nid not in self._links:
            ev = self._link_waiters.get(nid)
            if ev is None or ev.is_set():
                ev = self._link_waiters[nid] = trio.Event()
            await ev.wait()

    async def handle_stream(self, conn: Connection, stream: QuicStream) -> None:
        """A peer-initiated stream on a ``qpc-fed/1`` connection (the node routes it here)."""
        link = self._by_conn.get(conn)
        if link is None:
            link = await self._accept(conn)
            if link is None:
                await stream.aclose()
                return
        await self.rpc_server.handle_stream(link.state, stream)

    async def _accept(self, conn: Connection) -> _Link | None:
        gate = self._admitting.get(conn)
        if gate is not None:  # admission (ours or a concurrent stream's) in progress
            await gate.wait()
            return self._by_conn.get(conn)
        if conn.is_client or conn.close_error is not None:
            return None  # our own dial that was refused, or gone
        gate = self._admitting[conn] = trio.Event()
        try:
            nid = await self._admit(conn, None)
            return self._install(conn, nid, dialler=nid)
        except CertificateRejected:
            return None
        finally:
            del self._admitting[conn]
            gate.set()

    async def _admit(self, conn: Connection, expected: bytes | None) -> bytes:
        address = format_address(conn.remote_address)
        now = self._wall_ms()
        try:
            admitted = self.policy.admit(
                conn.peer_certificate_chain, address=address, expected=expected, now_ms=now
            )
        except CertificateRejected as exc:
            if isinstance(exc, KeyChanged) and exc.persist:
                persist = exc.persist
                await self._store.run(lambda s: save_trust(s, persist, now))
            conn.close_now(CLOSE_REFUSED, "federation trust refused")
            raise
        if admitted.changes:
            changes = admitted.changes
            await self._store.run(lambda s: save_trust(s, changes, now))
        return admitted.node_id

    def _install(self, conn: Connection, nid: bytes, *, dialler: bytes) -> _Link:
        if nid == self.node_id:
            conn.close_now(CLOSE_REFUSED, "connected to ourselves")
            raise CertificateRejected("the peer is this node")
        peer = PeerInfo(
            connection_id=f"fed:{short(nid)}",
            remote_address=tuple(conn.remote_address),
            identity=nid,
            alpn=conn.alpn,
        )
        state = self.rpc_server.open_connection(peer)
        state.session.data[_NODE_KEY] = nid
        new = _Link(nid, conn, dialler, state)
        self._by_conn[conn] = new
        old = self._links.get(nid)
        if old is not None and old.conn is not conn:
            keep = self._preferred(old, new)
            lose = new if keep is old else old
            lose.conn.close_now(CLOSE_DUPLICATE, "duplicate federation link")
            if keep is old:
                self._spawn(self._watch_loser, lose)
                return old
            self._links[nid] = new
            self._spawn(self._monitor, new)
            old.down.set()  # its maintainer re-checks; the node stays up through `new`
            return new
        self._links[nid] = new
        self._spawn(self._monitor, new)
        self._emit(LinkEvent("up", nid, new.address, None))
        log.info("federation: link up", extra={"node": nid.hex(), "addr": new.address})
        self._kick(nid)
        waiter = self._link_waiters.pop(nid, None)
        if waiter is not None:
            waiter.set()
        return new

    def _preferred(self, old: _Link, new: _Link) -> _Link:
        """Which of two connections to one neighbour to keep.

        Within ``race_window`` of the old link coming up, this is two nodes
        dialling each other at once: both keep the one dialled by the lower node
        id (of two such, the newer), a rule each side applies alone. Later, a new
        connection means the peer lost the old one (it restarted, maybe after a
        kill -9 that sent no close): the new one wins at once instead of after
        the old one is found dead."""
        if trio.current_time() - old.up_since > self.timers.race_window:
            return new
        low = min(self.node_id, new.node_id)
        if (old.dialler == low) == (new.dialler == low):
            return new
        return old if old.dialler == low else new

    async def _watch_loser(self, link: _Link) -> None:
        with contextlib.suppress(Exception):
            await link.conn.closed.wait()
        self._by_conn.pop(link.conn, None)

    async def _monitor(self, link: _Link) -> None:
        reason = "closed"
        try:
            while True:
                with trio.move_on_after(self.timers.ping_interval):
                    await link.conn.closed.wait()
                if link.conn.closed.is_set():
                    err = link.conn.close_error
                    reason = f"connection closed: {err}" if err else "connection closed"
                    break
                if self._links.get(link.node_id) is not link:
                    return  # replaced by a preferred connection
                await self._ping(link)
                if trio.current_time() - link.last_ok >= self.timers.dead_after:
                    reason = f"no answer for {self.timers.dead_after:g}s"
                    link.conn.close_now(CLOSE_DEAD, "peer silent")
                    break
        finally:
            self._by_conn.pop(link.conn, None)
            if self._links.get(link.node_id) is link:
                del self._links[link.node_id]
                self._emit(LinkEvent("down", link.node_id, link.address, link.rtt, reason))
                log.warning(
                    "federation: link down",
                    extra={"node": link.node_id.hex(), "addr": link.address, "reason": reason},
                )
            link.down.set()

    async def _ping(self, link: _Link) -> bool:
        nonce = random.getrandbits(63)
        t0 = trio.current_time()
        try:
            resp = await link.rpc.call(
                M_PING,
                federation_pb2.PingRequest(nonce=nonce),
                federation_pb2.PingResponse,
                timeout=self.timers.ping_timeout,
            )
        except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if resp.nonce != nonce or resp.node_id != link.node_id:
            return False
        link.rtt = trio.current_time() - t0
        link.last_ok = trio.current_time()
        return True

    async def ping(self, nid: bytes) -> float:
        """One health round trip to neighbour ``nid``: its RTT in seconds."""
        link = self._link(nid)
        if not await self._ping(link):
            raise QpcError(f"node {short(nid)} did not answer", code=StatusCode.UNAVAILABLE)
        assert link.rtt is not None
        return link.rtt

    def _link(self, nid: bytes) -> _Link:
        link = self._links.get(nid)
        if link is None:
            raise QpcError(f"no link to node {short(nid)}", code=StatusCode.UNAVAILABLE)
        return link

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
        """Route envelopes that start here (the node's Delivery/Enqueue, later).

        ``origin`` is the fingerprint the sending user proved on its session: it goes
        with each envelope to every hop (mailbox fairness at the recipient's home node
        judges it), and the user accepts mail from each recipient from now on, as a
        local send does. A recipient homed here is stored as a local send.
        """
        if len(origin) != FINGERPRINT_LEN:
            raise LocalProtocolError(f"origin must be a {FINGERPRINT_LEN}-byte fingerprint")
        return await self._custody(
            envelopes, from_node=self.node_id, origins=[origin] * len(envelopes), proven=True
        )

    async def take_custody(
        self,
        envelopes: Sequence[envelope_pb2.Envelope],
        *,
        from_node: bytes,
        origins: Sequence[bytes] = (),
    ) -> list[federation_pb2.RelayResult]:
        """Store each envelope a neighbour hands us durably here (mailbox or custody
        queue) or refuse it typed.

        ``origins`` as on the wire (``RelayEnqueueRequest.origins``): none, or one per
        envelope, each empty (unknown) or a fingerprint; a wrong count is refused
        whole (RemoteProtocolError), a malformed entry refuses its envelope alone.
        One result per envelope, in order. What is reported STORED_LOCAL or QUEUED is
        committed when this returns.
        """
        if len(origins) not in (0, len(envelopes)):
            raise RemoteProtocolError(
                f"{len(origins)} origins for {len(envelopes)} envelopes (0 or one each)"
            )
        declared: list[bytes | None] = [o or None for o in origins] or [None] * len(envelopes)
        return await self._custody(envelopes, from_node=from_node, origins=declared, proven=False)

    def _sender(self, from_node: bytes, origin: bytes | None, *, proven: bool) -> SenderKey:
        """Whom mailbox fairness judges for an envelope stored here."""
        if proven:
            assert origin is not None
            return SenderKey.local(origin)
        return SenderKey.relayed(from_node, origin if origin is not None else UNKNOWN_ORIGIN)

    async def _custody(
        self,
        envelopes: Sequence[envelope_pb2.Envelope],
        *,
        from_node: bytes,
        origins: Sequence[bytes | None],
        proven: bool,
    ) -> list[federation_pb2.RelayResult]:
        now = self._wall_ms()
        results: list[federation_pb2.RelayResult | None] = [None] * len(envelopes)
        local: list[tuple[int, Envelope, SenderKey]] = []
        relay: list[tuple[int, RelayItem]] = []

        def refuse(i: int, status: int, detail: str) -> None:
            results[i] = federation_pb2.RelayResult(
                msg_id=envelopes[i].msg_id,
                status=cast(federation_pb2.RelayStatus, status),
                detail=detail,
            )

        for i, (pb, origin) in enumerate(zip(envelopes, origins, strict=True)):
            if origin is not None and len(origin) != FINGERPRINT_LEN:
                refuse(i, federation_pb2.RELAY_INVALID, f"origin of {len(origin)} bytes")
                continue
            try:
                env = WireEnvelope.from_proto(pb)
            except QpcError as exc:
                refuse(i, federation_pb2.RELAY_INVALID, exc.message)
                continue
            rec = Envelope(env.msg_id, env.recipient, env.expiry_ms, env.hop_limit, env.ciphertext)
            if env.expired(now):
                refuse(i, federation_pb2.RELAY_EXPIRED, "expired")
                continue
            route = self._resolve(env.recipient)
            if isinstance(route, Local) or (
                isinstance(route, NextHop) and route.node_id == self.node_id
            ):
                local.append((i, rec, self._sender(from_node, origin, proven=proven)))
            elif isinstance(route, NextHop):
                if route.node_id == from_node:
                    refuse(i, federation_pb2.RELAY_LOOP, "the next hop is the sender")
                elif env.hop_limit == 0:
                    refuse(i, federation_pb2.RELAY_HOP_LIMIT_EXCEEDED, "hop_limit 0")
                else:
                    fwd = Envelope(
                        rec.msg_id, rec.recipient, rec.expiry_ms, rec.hop_limit - 1, rec.ciphertext
                    )
                    relay.append((i, RelayItem(route.node_id, from_node, fwd, origin)))
            else:
                refuse(i, federation_pb2.RELAY_NO_ROUTE, "no route to the recipient yet")
        if local:
            # Each envelope its own savepoint, with its own sender, in one commit.
            batches = [EnqueueBatch((rec,), now, sender) for _, rec, sender in local]
            stored = await self._store.run(lambda s: s.enqueue_many(batches))
            for (i, rec, _), got in zip(local, stored, strict=True):
                if isinstance(got, QuotaExceeded):
                    status = (
                        federation_pb2.RELAY_STRANGER_LIMIT
                        if got.reason in _STRANGER_REASONS
                        else federation_pb2.RELAY_MAILBOX_FULL
                    )
                    refuse(i, status, f"{got.reason}: {got.message}")
                    continue
                if isinstance(got, QpcError):
                    refuse(i, federation_pb2.RELAY_REFUSED, got.message)
                    continue
                (res,) = got
                refuse(
                    i,
                    federation_pb2.RELAY_DUPLICATE
                    if res.duplicate
                    else federation_pb2.RELAY_STORED_LOCAL,
                    "",
                )
                if not res.duplicate and self._on_local is not None:
                    self._on_local(rec.recipient)
        if relay:
            items = [it for _, it in relay]
            qlim = self.limits.queue
            outs = await self._store.run(lambda s: relay_accept(s, items, now, qlim, proven=proven))
            for (i, item), out in zip(relay, outs, strict=True):
                if out == "queued":
                    refuse(i, federation_pb2.RELAY_QUEUED, "")
                    self._queued[item.next_hop] += 1
                    self._ensure_drainer(item.next_hop)
                    self._kick(item.next_hop)
                elif out == "duplicate":
                    refuse(i, federation_pb2.RELAY_DUPLICATE, "")
                else:
                    refuse(i, federation_pb2.RELAY_QUEUE_FULL, out.replace("_", " "))
        return [r for r in results if r is not None]

    def refusals(self) -> list[RelayRefusal]:
        """Recent envelopes a next hop refused for good (newest last, bounded)."""
        return list(self._refusals)

    def _ensure_drainer(self, hop: bytes) -> None:
        if hop in self._drainers or self._nursery is None:
            return
        self._drainers.add(hop)
        self._nursery.start_soon(self._drain, hop)

    async def _drain(self, hop: bytes) -> None:
        backoff = self.timers.retry_initial
        try:
            while True:
                wake = self._wake[hop] = trio.Event()  # before reading: no lost wakeup
                link = self._links.get(hop)
                if link is None:
                    await wake.wait()
                    continue
                now = self._wall_ms()
                batch = await self._store.run(
                    functools.partial(
                        relay_due, next_hop=hop, now_ms=now, limit=self.limits.relay_batch
                    )
                )
                if not batch:
                    nxt = await self._store.run(
                        functools.partial(relay_next_attempt, next_hop=hop, now_ms=now)
                    )
                    wait = math.inf if nxt is None else max(0.0, (nxt - now) / 1000)
                    with trio.move_on_after(wait):
                        await wake.wait()
                    continue
                if await self._send_batch(link, batch):
                    backoff = self.timers.retry_initial
                else:
                    self._send_failures += 1
                    with trio.move_on_after(backoff * (0.5 + random.random() / 2)):
                        await link.down.wait()
                    backoff = min(backoff * 2, self.timers.retry_max)
        finally:
            self._drainers.discard(hop)

    async def _send_batch(self, link: _Link, batch: list[QueuedRelay]) -> bool:
        req = federation_pb2.RelayEnqueueRequest(
            envelopes=[
                envelope_pb2.Envelope(
                    msg_id=q.envelope.msg_id,
                    recipient=q.envelope.recipient,
                    expiry_ms=q.envelope.expiry_ms,
                    hop_limit=q.envelope.hop_limit,
                    ciphertext=q.envelope.ciphertext,
                )
                for q in batch
            ],
            origins=[q.origin or b"" for q in batch],  # forwarded as declared to us
        )
        try:
            resp = await link.rpc.call(
                M_RELAY, req, federation_pb2.RelayEnqueueResponse, timeout=self.timers.call_timeout
            )
        except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(
                "federation: relay batch not taken",
                extra={"node": link.node_id.hex(), "err": str(exc)},
            )
            return False
        if len(resp.results) != len(batch):
            log.warning(
                "federation: relay answer of the wrong length", extra={"node": link.node_id.hex()}
            )
            return False
        counters = self._count(link.node_id)
        done: list[int] = []
        later: list[tuple[int, int]] = []
        refused: Counter[str] = Counter()
        details: dict[str, str] = {}  # first detail per status, for the log
        now = self._wall_ms()
        t = self.timers
        for q, res in zip(batch, resp.results, strict=True):
            if res.status in _TAKEN:
                done.append(q.id)
                counters.relayed_out += 1
            elif res.status in _RETRY or res.status in _RETRY_FULL:
                counters.deferred_out[status_name(res.status)] += 1
                delay = t.retry_initial * 2 ** min(q.attempts, 8)
                if res.status in _RETRY_FULL:
                    delay = min(t.retry_initial * 2 ** min(q.attempts, 30), t.full_retry_max)
                later.append((q.id, now + int(1000 * delay)))
            else:
                done.append(q.id)
                name = status_name(res.status)
                counters.refused_out[name] += 1
                refused[name] += 1
                self._refusals.append(
                    RelayRefusal(q.envelope.msg_id, link.node_id, res.status, res.detail)
                )
                details.setdefault(name, res.detail)
        if refused:  # one line per batch: a relayed flood must not flood the log too
            log.warning(
                "federation: next hop refused envelopes",
                extra={"node": link.node_id.hex(), "refused": dict(refused), "detail": details},
            )
        if done:
            n = await self._store.run(lambda s: relay_done(s, done))
            self._queued[link.node_id] -= n
        if later:
            await self._store.run(lambda s: relay_retry_later(s, later))
        return True

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(self.timers.sweep_interval)
            now = self._wall_ms()
            q, _ = await self._store.run(functools.partial(relay_expire, now_ms=now))
            if q:
                self._expired += q
                log.warning("federation: envelopes expired in custody", extra={"n": q})
                self._queued = Counter(await self._store.run(relay_hops))

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
            list(req.envelopes), from_node=src, origins=list(req.origins)
        )
        c = self._count(src)
        for r in results:
            c.relay_in[status_name(r.status)] += 1
        return federation_pb2.RelayEnqueueResponse(results=results)

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
        return federation_pb2.PingResponse(
            nonce=req.nonce, node_id=self.node_id, relay_queue=max(0, self._queued[src])
        )

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> FederationStatistics:
        nodes = set(self._counters) | set(self._links) | {h for h, n in self._queued.items() if n}
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
                    queued_toward=max(0, self._queued[nid]),
                )
            )
        return FederationStatistics(
            node_id=self.node_id,
            links=len(self._links),
            neighbours=tuple(neigh),
            queued=sum(max(0, n) for n in self._queued.values()),
            expired_in_custody=self._expired,
            send_failures=self._send_failures,
            events_dropped=self._events_dropped,
            trust_refusals=int(getattr(self.policy, "refusals", 0)),
        )

    # ------------------------------------------------------------------ plumbing
    def _count(self, nid: bytes) -> _Counters:
        c = self._counters.get(nid)
        if c is None:
            c = self._counters[nid] = _Counters()
        return c

    def _kick(self, hop: bytes) -> None:
        """Wake the drainer of ``hop`` (new custody, or its link came up)."""
        ev = self._wake.get(hop)
        if ev is not None:
            ev.set()

    def _emit(self, event: LinkEvent) -> None:
        try:
            self._events_tx.send_nowait(event)
        except trio.WouldBlock:
            self._events_dropped += 1  # nobody reads: the table rebuilds from links()

    def _spawn(self, fn: Callable[[_Link], Awaitable[None]], link: _Link) -> None:
        if self._nursery is None:
            raise QpcError("federation is not running", code=StatusCode.UNAVAILABLE)
        self._nursery.start_soon(fn, link)

    def _require_endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise QpcError("federation is not running", code=StatusCode.UNAVAILABLE)
        return self._endpoint


async def open_mesh_trust(store: AsyncStore) -> MeshTrust:
    """The mesh-mode policy with the pins this node saved before."""
    return MeshTrust(await store.run(load_trust))


@dataclass(frozen=True, slots=True)
class StaticPeer:
    """A neighbour to keep a link to: ``host:port`` and, if known, its node id (pinned)."""

    host: str
    port: int
    node_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class FederationSetup:
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
    )
