"""Federation links: one long-lived ``qpc-fed/1`` connection per neighbour node id.

:class:`Links` dials and accepts connections, admits them through the trust
policy (pins saved in the store), keeps one per neighbour and watches it:

- **Preferred link.** When both ends dial at once the connection dialled by the
  *lower* node id wins on both sides (a rule both apply without talking), the
  other is closed. A new connection from a *restarted* neighbour wins at once:
  each process makes a random **boot id** when it starts and states it in every
  ``Ping`` (request: the caller's, response: the answerer's). A second connection
  to a known node is pinged before it is installed; a boot id other than the one
  the live link stated is a new incarnation, however soon after the first link
  it comes (timing cannot tell a restart from a simultaneous dial: a neighbour
  killed a second after its link came up is back within the race window). Only
  when a boot id is unknown (a peer built before boot ids, or the ping failed)
  does the timing rule decide: a new connection ``race_window`` after the old one
  means the peer lost the old one.
- **Restart.** A replacement by a new incarnation (or after the race window) is
  reported as an ``up`` event with ``replaced=True``: routing withdraws what it
  learnt over the old connection and sends the new incarnation its full table.
- **Liveness.** A monitor per link sends ``Ping`` every ``ping_interval`` (RTT)
  and declares the link down when no ping succeeded for ``dead_after`` -- or at
  once when QUIC closes the connection -- so a silent peer is down within
  ``dead_after + ping_interval`` (15 s with the defaults).
- **Events.** Up/down go to :attr:`Links.events` (the mesh peer table reads them);
  a link coming up calls ``on_up`` (custody wakes the drainer toward it).

The RPCs themselves (server side) and custody live in :mod:`.core` and
:mod:`.custody`; this module only moves connections.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Awaitable, Callable
from typing import Literal

import msgspec
import trio

from qpc_node.errors import ConfigError, QpcError, StatusCode
from qpc_node.federation.trust import FederationClientTLS, KeyChanged, TrustPolicy
from qpc_node.mesh.nodeid import short
from qpc_node.ops.clock import WallClock
from qpc_node.ops.log import get_logger
from qpc_node.quic import Connection, Endpoint, QuicStream
from qpc_node.quic.address import format_address
from qpc_node.quic.tls import CertificateRejected, NodeCredentials
from qpc_node.rpc.client import NO_RETRY, RpcClient
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.server import RpcServer, ServerConnection
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.federation import save_trust
from qpc_node.wire.gen.qpc.v1 import federation_pb2

log = get_logger("qpc.federation")

M_PING = "qpc.v1.Federation/Ping"
NODE_KEY = "fed.node"
"""Session data key of an admitted connection: the neighbour's node id."""
LINK_KEY = "fed.link"
"""Session data key of an admitted connection: its :class:`Link` (boot ids land there)."""
BOOT_ID_MIN, BOOT_ID_MAX = 8, 32
"""Accepted length of a peer's boot id; anything else counts as not stated."""
CLOSE_DUPLICATE = 0x101  # application close codes on qpc-fed/1
CLOSE_REFUSED = 0x102
CLOSE_DEAD = 0x103


class LinkTimers(msgspec.Struct, frozen=True):
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


class LinkEvent(msgspec.Struct, frozen=True):
    """A neighbour came up or went down (feeds the mesh peer table)."""

    kind: Literal["up", "down"]
    node_id: bytes
    address: str
    rtt: float | None
    reason: str = ""
    replaced: bool = False
    """An ``up`` whose connection replaced a live one to a new incarnation of the
    neighbour (another boot id, or one past the race window): whatever was learnt
    over the old connection is void."""


class LinkInfo(msgspec.Struct, frozen=True):
    node_id: bytes
    address: str
    dialled_by_us: bool
    rtt: float | None
    up_since: float


class Link:
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
        self.boot: bytes | None = None
        """The peer process's boot id, once a ping either way stated it."""
        self.carrier = False
        """The peer said it carries held copies between islands (Ping ``carrier``)."""


class Links:
    """The link table of one node (see the module docstring)."""

    def __init__(
        self,
        node_id: bytes,
        credentials: NodeCredentials,
        policy: TrustPolicy,
        store: AsyncStore,
        rpc_server: RpcServer,
        timers: LinkTimers,
        *,
        wall_ms: WallClock,
        on_up: Callable[[bytes], None],
        on_event: Callable[[LinkEvent], None] | None = None,
        event_buffer: int = 1024,
        boot_id: bytes | None = None,
    ) -> None:
        self.node_id = node_id
        self.boot_id = boot_id if boot_id is not None else os.urandom(16)
        """This process's boot id (random per start; tests may pass one)."""
        if not BOOT_ID_MIN <= len(self.boot_id) <= BOOT_ID_MAX:
            raise ConfigError(f"boot id must be {BOOT_ID_MIN}..{BOOT_ID_MAX} bytes")
        self.credentials = credentials
        self.policy = policy
        self._store = store
        self._rpc_server = rpc_server
        self.timers = timers
        self._wall_ms = wall_ms
        self._on_up = on_up
        self._on_event = on_event
        self._links: dict[bytes, Link] = {}
        self._by_conn: dict[Connection, Link] = {}
        self._admitting: dict[Connection, trio.Event] = {}
        self._link_waiters: dict[bytes, trio.Event] = {}
        self._boots: dict[bytes, bytes] = {}
        """Boot id of the incarnation routing is in step with, per live neighbour
        (dropped when its last link goes down: the next link is news anyway)."""
        self.carrier = False
        """This node carries held copies (``mesh.carrier``): stated in every Ping."""
        self.events_dropped = 0
        self.ups = 0
        """Links that came up (a replaced duplicate is not a new one)."""
        self.downs = 0
        self.restarts = 0
        """Links replaced by a new incarnation of their neighbour (see LinkEvent.replaced)."""
        self._events_tx, self.events = trio.open_memory_channel[LinkEvent](event_buffer)
        self.endpoint: Endpoint | None = None
        self.nursery: trio.Nursery | None = None

    def close_all(self, reason: str) -> None:
        for link in list(self._links.values()):
            link.conn.close_now(0, reason)

    # ------------------------------------------------------------------ dialling
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
            link = await self._install(conn, nid, dialler=self.node_id)
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

    # ------------------------------------------------------------------ queries
    def infos(self) -> list[LinkInfo]:
        return [
            LinkInfo(k.node_id, k.address, k.dialler == self.node_id, k.rtt, k.up_since)
            for k in sorted(self._links.values(), key=lambda k: k.node_id)
        ]

    def get(self, nid: bytes) -> Link | None:
        return self._links.get(nid)

    def require(self, nid: bytes) -> Link:
        link = self._links.get(nid)
        if link is None:
            raise QpcError(f"no link to node {short(nid)}", code=StatusCode.UNAVAILABLE)
        return link

    def up(self, nid: bytes) -> bool:
        return nid in self._links

    def __len__(self) -> int:
        return len(self._links)

    def node_ids(self) -> list[bytes]:
        return list(self._links)

    async def wait(self, nid: bytes) -> None:
        """Until a link to ``nid`` is up (tests, the demo)."""
        while nid not in self._links:
            ev = self._link_waiters.get(nid)
            if ev is None or ev.is_set():
                ev = self._link_waiters[nid] = trio.Event()
            await ev.wait()

    # ------------------------------------------------------------------ accepting
    async def handle_stream(self, conn: Connection, stream: QuicStream) -> None:
        """A peer-initiated stream on a ``qpc-fed/1`` connection (the node routes it here)."""
        link = self._by_conn.get(conn)
        if link is None:
            link = await self._accept(conn)
            if link is None:
                await stream.aclose()
                return
        await self._rpc_server.handle_stream(link.state, stream)

    async def _accept(self, conn: Connection) -> Link | None:
        gate = self._admitting.get(conn)
        if gate is not None:  # admission (ours or a concurrent stream's) in progress
            await gate.wait()
            return self._by_conn.get(conn)
        if conn.is_client or conn.close_error is not None:
            return None  # our own dial that was refused, or gone
        gate = self._admitting[conn] = trio.Event()
        try:
            nid = await self._admit(conn, None)
            return await self._install(conn, nid, dialler=nid)
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

    async def _install(self, conn: Connection, nid: bytes, *, dialler: bytes) -> Link:
        if nid == self.node_id:
            conn.close_now(CLOSE_REFUSED, "connected to ourselves")
            raise CertificateRejected("the peer is this node")
        peer = PeerInfo(
            connection_id=f"fed:{short(nid)}",
            remote_address=tuple(conn.remote_address),
            identity=nid,
            alpn=conn.alpn,
        )
        state = self._rpc_server.open_connection(peer)
        state.session.data[NODE_KEY] = nid
        new = Link(nid, conn, dialler, state)
        state.session.data[LINK_KEY] = new
        self._by_conn[conn] = new
        if nid in self._links:
            # A second connection to a live neighbour: which incarnation is it? (One
            # round trip, inside the admission gate: the peer serves it on a
            # connection it has installed already, dialler or not.)
            await self._ping(new)
        old = self._links.get(nid)
        if old is not None and old.conn is not conn:
            keep, restarted = self._preferred(old, new)
            lose = new if keep is old else old
            lose.conn.close_now(
                CLOSE_DUPLICATE, "peer restarted" if restarted else "duplicate federation link"
            )
            if keep is old:
                self._spawn(self._watch_loser, lose)
                return old
            self._links[nid] = new
            if not restarted and new.boot is not None:
                self._boots[nid] = new.boot  # (equal to the old one's, or it was unknown)
            self._spawn(self._monitor, new)
            old.down.set()  # its maintainer re-checks; the node stays up through `new`
            if restarted:
                self._resync(new, "federation: neighbour restarted or reconnected, link replaced")
            return new
        self._links[nid] = new
        self._spawn(self._monitor, new)
        self.ups += 1
        self._emit(LinkEvent("up", nid, new.address, None))
        log.info("federation: link up", extra={"node": nid.hex(), "addr": new.address})
        self._on_up(nid)
        waiter = self._link_waiters.pop(nid, None)
        if waiter is not None:
            waiter.set()
        return new

    def _preferred(self, old: Link, new: Link) -> tuple[Link, bool]:
        """Which of two connections to one neighbour to keep, and whether the kept
        one is a new incarnation of it (routing must start over with it).

        Both boot ids known: different means the peer restarted (the new one wins
        at once, whatever the timing); equal means one process dialled twice or both
        ends dialled at once. Then, and when a boot id is unknown, timing decides:
        within ``race_window`` of the old link coming up it is a simultaneous dial:
        both keep the one dialled by the lower node id (of two such, the newer), a
        rule each side applies alone. Later, a new connection means the peer lost
        the old one (it restarted, maybe after a kill -9 that sent no close, or its
        old connection died unseen): the new one wins at once instead of after the
        old one is found dead, and routing re-syncs over it."""
        if old.boot is not None and new.boot is not None and old.boot != new.boot:
            return new, True
        if trio.current_time() - old.up_since > self.timers.race_window:
            return new, True
        low = min(self.node_id, new.node_id)
        if (old.dialler == low) == (new.dialler == low):
            return new, False
        return (old if old.dialler == low else new), False

    def note_boot(self, link: Link, boot: bytes) -> None:
        """The peer stated its boot id on ``link`` (a ping either way).

        A connection belongs to one process: the first id stated on a link is its id.
        If the link is live and the id differs from what the node's earlier live link
        stated, the connection was installed without knowing (a ping that failed):
        the neighbour restarted all the same, so routing starts over with it.
        """
        if not BOOT_ID_MIN <= len(boot) <= BOOT_ID_MAX or link.boot is not None:
            return
        link.boot = boot
        if self._links.get(link.node_id) is not link:
            return
        prev = self._boots.get(link.node_id)
        self._boots[link.node_id] = boot
        if prev is not None and prev != boot:
            self._resync(link, "federation: neighbour restarted (boot id changed)")

    def _resync(self, link: Link, message: str) -> None:
        """``link`` is the live link to a new incarnation of its neighbour."""
        nid = link.node_id
        if link.boot is not None:
            self._boots[nid] = link.boot
        else:
            self._boots.pop(nid, None)
        self.restarts += 1
        self._emit(LinkEvent("up", nid, link.address, link.rtt, replaced=True))
        log.warning(message, extra={"node": nid.hex(), "addr": link.address})
        self._on_up(nid)

    async def _watch_loser(self, link: Link) -> None:
        with contextlib.suppress(Exception):
            await link.conn.closed.wait()
        self._by_conn.pop(link.conn, None)

    # ------------------------------------------------------------------ liveness
    async def _monitor(self, link: Link) -> None:
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
                self._boots.pop(link.node_id, None)  # the next link starts afresh
                self.downs += 1
                self._emit(LinkEvent("down", link.node_id, link.address, link.rtt, reason))
                log.warning(
                    "federation: link down",
                    extra={"node": link.node_id.hex(), "addr": link.address, "reason": reason},
                )
            link.down.set()

    async def _ping(self, link: Link) -> bool:
        nonce = random.getrandbits(63)
        t0 = trio.current_time()
        try:
            resp = await link.rpc.call(
                M_PING,
                federation_pb2.PingRequest(nonce=nonce, boot_id=self.boot_id, carrier=self.carrier),
                federation_pb2.PingResponse,
                timeout=self.timers.ping_timeout,
            )
        except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if resp.nonce != nonce or resp.node_id != link.node_id:
            return False
        self.note_boot(link, resp.boot_id)
        link.carrier = resp.carrier
        link.rtt = trio.current_time() - t0
        link.last_ok = trio.current_time()
        return True

    async def ping(self, nid: bytes) -> float:
        """One health round trip to neighbour ``nid``: its RTT in seconds."""
        link = self.require(nid)
        if not await self._ping(link):
            raise QpcError(f"node {short(nid)} did not answer", code=StatusCode.UNAVAILABLE)
        assert link.rtt is not None
        return link.rtt

    # ------------------------------------------------------------------ plumbing
    def _emit(self, event: LinkEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
        try:
            self._events_tx.send_nowait(event)
        except trio.WouldBlock:
            self.events_dropped += 1  # nobody reads: the table rebuilds from infos()

    def _spawn(self, fn: Callable[[Link], Awaitable[None]], link: Link) -> None:
        if self.nursery is None:
            raise QpcError("federation is not running", code=StatusCode.UNAVAILABLE)
        self.nursery.start_soon(fn, link)

    def _require_endpoint(self) -> Endpoint:
        if self.endpoint is None:
            raise QpcError("federation is not running", code=StatusCode.UNAVAILABLE)
        return self.endpoint
