"""The mesh in a running node: discovery -> peer table -> federation links -> routing.

:class:`MeshService` is the Trio driver of the sans-IO cores. It owns:

- the **peer table** (:mod:`qpc_node.mesh.peers`), fed by static peers (config),
  mDNS discovery events (:mod:`qpc_node.mesh.discovery`, when on) and the
  federation's link events; its ``Dial`` outputs become federation dials;
- the **routing core** (:mod:`qpc_node.mesh.routing`), fed by link up/down, the
  ``RouteUpdate`` payloads neighbours send over the federation ``Announce`` RPC,
  and the home bindings clients sign when they authenticate here; its ``Send``
  outputs go out over ``Announce`` and its ``PersistSeq`` to the store's meta
  table (before anything polled after it is sent, as the core requires);
- the answers the node needs: :meth:`resolve` (the federation's resolver: here,
  a next hop, or no route yet) and :meth:`remote_key_package` (the directory's
  fallback for a user homed elsewhere).

Time: the routing core wants unix wall milliseconds (signed expiries), the peer
table monotonic seconds (``trio.current_time``); both are passed in, never read
by the cores.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Sequence

import msgspec
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qpc_node import crypto
from qpc_node.errors import (
    ConfigError,
    LocalProtocolError,
    QpcError,
    RemoteProtocolError,
    StatusCode,
)
from qpc_node.federation import routes as fed_routes
from qpc_node.federation.core import (
    CLOSE_DUPLICATE,
    Federation,
    FederationLimits,
    FederationSetup,
    LinkEvent,
    LinkTimers,
    status_name,
)
from qpc_node.mesh import peers as pt
from qpc_node.mesh import routing as rt
from qpc_node.mesh.discovery import DiscoveryConfig, MdnsDiscovery
from qpc_node.mesh.discovery_core import PeerGone as MdnsGone
from qpc_node.mesh.discovery_core import PeerSeen, PeerUpdated
from qpc_node.mesh.nodeid import short
from qpc_node.mesh.static_peers import StaticPeer, parse_static_peers
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.quic.tls import NodeCredentials
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.federation import RelayQueueLimits
from qpc_node.store.homes import StoredBinding, load_bindings, save_bindings
from qpc_node.store.records import EnqueueResult
from qpc_node.storefwd.held import HoldPolicy
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2

log = get_logger("qpc.mesh")

PEER_TICK_MIN = 0.05
"""Floor of the peer loop's sleep: a deadline already due never makes it spin."""
ANNOUNCE_ATTEMPTS = 4
ANNOUNCE_RETRY = 0.25
"""Seconds before the first retry of a failed announce (then 2x, 3x)."""
DUPLICATE_GRACE = 2.0
"""Seconds a link closed as a duplicate (simultaneous dial) may take to be replaced."""
_DUPLICATE = f"code={CLOSE_DUPLICATE:#x}"

SEQ_META_KEY = "mesh.seq_floor"
"""Store meta key of the routing core's reserved seq (PersistSeq), decimal ASCII."""
BINDING_FLUSH_DELAY = 0.2
"""Seconds newly accepted bindings wait to be saved together (a neighbour's full dump
arrives in several updates; one transaction for them all spares the flash)."""
HANDOVER_RETRY = 1.0
"""Seconds between tries to hand a re-homed user's mail over while there is no route
to its new home yet, or the custody queue toward it is full."""


def verify_node(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """A node key's raw Ed25519 signature (route announcements)."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_user(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """A user identity's signature (home bindings): the MLS core's domain-separated one."""
    try:
        crypto.verify(public_key, message, signature)
    except crypto.MlsError:
        return False
    return True


class MeshSettings(msgspec.Struct, frozen=True):
    """What the node's config says about the mesh (``mesh.*``)."""

    static_peers: tuple[StaticPeer, ...] = ()
    mdns: bool = False
    interfaces: tuple[str, ...] = ()
    """mDNS interfaces; empty: every non-loopback interface that is up."""
    routing: rt.RoutingPolicy | None = None
    peers: pt.PeerPolicy | None = None
    timers: LinkTimers | None = None
    limits: FederationLimits | None = None


class MeshStatistics(msgspec.Struct, frozen=True):
    peers: pt.PeerTableStatistics
    routing: rt.RoutingStatistics
    updates_received: int
    """RouteUpdates neighbours sent over Announce and we applied."""
    updates_rejected: int
    """RouteUpdates refused whole: undecodable, or from a node with no link."""
    announce_failures: int
    bindings_saved: int
    binding_save_failures: int
    handovers_pending: int
    """Re-homed users whose mail here waits for a route to their new home (or more)."""


def settings_from_config(
    static_peers: Sequence[str],
    mdns: bool,
    interfaces: Sequence[str],
    *,
    relay_custody_per_user: int | None = None,
    storefwd: HoldPolicy | None = None,
) -> MeshSettings:
    """``mesh.*`` of the node's config (already checked by the config loader),
    ``limits.relay_custody_per_user`` (the federation's per-origin custody share)
    and ``storefwd.*`` with ``mesh.carrier`` (holding, receipts, spray)."""
    limits = None
    if relay_custody_per_user is not None or storefwd is not None:
        base = FederationLimits()
        limits = FederationLimits(
            queue=base.queue
            if relay_custody_per_user is None
            else RelayQueueLimits(max_per_origin=relay_custody_per_user),
            storefwd=storefwd or base.storefwd,
        )
    return MeshSettings(
        static_peers=parse_static_peers(static_peers),
        mdns=mdns,
        interfaces=tuple(interfaces),
        limits=limits,
    )


class MeshService:
    """Composition of peers, links and routes for one node (see the module docstring)."""

    def __init__(
        self,
        credentials: NodeCredentials,
        store: AsyncStore,
        settings: MeshSettings,
        *,
        is_local: Callable[[bytes], bool],
        seq_floor: int = 0,
        restored: Sequence[bytes] = (),
        wall_ms: WallClock = system_wall_ms,
    ) -> None:
        """``restored``: encoded bindings saved by a previous run (oldest first)."""
        key = credentials.private_key()
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError("the mesh needs an Ed25519 node key")
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._store = store
        self.settings = settings
        self._is_local = is_local
        self._wall_ms = wall_ms
        self.router = rt.Router(
            public,
            key.sign,
            verify_node,
            verify_user=verify_user,
            policy=settings.routing,
            rand=random.random,
            seq_floor=seq_floor,
            now_ms=wall_ms(),
        )
        self.node_id = self.router.node_id
        self._rehomed: set[bytes] = set()
        """Users whose newest binding names another node: their mail here goes there."""
        self._handover_wake = trio.Event()
        self._restore(restored)
        self._dirty: dict[bytes, rt.HomeBinding] = {}
        self._persist_wake = trio.Event()
        self.bindings_saved = 0
        self.binding_save_failures = 0
        self.peers = pt.PeerTable(settings.peers or pt.PeerPolicy(), random.random)
        self.federation: Federation | None = None
        self._linked: set[bytes] = set()
        self._wake = trio.Event()
        self._send_locks: dict[bytes, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.announce_failures = 0
        self.updates_received = 0
        self.updates_rejected = 0
        self.discovery: MdnsDiscovery | None = None

    @classmethod
    async def open(
        cls,
        credentials: NodeCredentials,
        store: AsyncStore,
        settings: MeshSettings,
        *,
        is_local: Callable[[bytes], bool],
        wall_ms: WallClock = system_wall_ms,
    ) -> MeshService:
        """A service whose routing seq continues from what this node stored before."""
        raw = await store.meta_get(SEQ_META_KEY)
        floor = int(raw.decode()) if raw else 0
        cap = (settings.routing or rt.RoutingPolicy()).max_bindings
        now = wall_ms()
        saved = await store.run(lambda s: load_bindings(s, now, cap=cap))
        return cls(
            credentials,
            store,
            settings,
            is_local=is_local,
            seq_floor=floor,
            restored=[b.binding for b in saved],
            wall_ms=wall_ms,
        )

    def _restore(self, encoded: Sequence[bytes]) -> None:
        now = self._wall_ms()
        refused = 0
        for data in encoded:
            try:
                b = rt.HomeBinding.decode(data)
            except RemoteProtocolError:
                refused += 1
                continue
            if self.router.restore(b, now) is not rt.Outcome.ACCEPTED:
                refused += 1
            else:
                self._note_home(b)
        if encoded:
            log.info(
                "mesh: home bindings restored",
                extra={"restored": len(encoded) - refused, "refused": refused},
            )

    def wall_ms(self) -> int:
        return self._wall_ms()

    def federation_setup(self) -> FederationSetup:
        """Mesh mode (trust on first use); resolve and announce intake come from here."""
        return FederationSetup(
            resolve=self.resolve,
            announce_sink=self.receive,
            timers=self.settings.timers,
            limits=self.settings.limits,
            home_of=self.home_of,
        )

    def attach(self, federation: Federation) -> None:
        if federation.node_id != self.node_id:
            raise ConfigError("federation and mesh disagree on the node id")
        self.federation = federation

    # ------------------------------------------------------------------ answers
    def resolve(self, recipient: bytes) -> fed_routes.Route:
        """The federation's resolver: the routing core, and users that proved their key
        here but whose binding the core does not hold (a client that predates bindings,
        or bindings lost with a restart until the client re-authenticates)."""
        r = self.router.resolve(recipient, self._wall_ms())
        if isinstance(r, rt.Local):
            return fed_routes.Local()
        if isinstance(r, rt.NextHop):
            return fed_routes.NextHop(r.node, r.hops)
        if r.reason == "unknown user" and self._is_local(recipient):
            return fed_routes.Local()
        return fed_routes.NoRoute()

    def homed_elsewhere(self, user: bytes) -> bool:
        """The user's newest binding names another node (it re-homed, or never was here)."""
        b = self.router.binding(user)
        return b is not None and b.node != self.node_id and b.expiry_ms > self._wall_ms()

    def check(self, recipient: bytes) -> QpcError | None:
        """Delivery's pre-check for all-or-nothing batches. No route is no refusal
        any more: custody holds such envelopes until a route appears (storefwd)."""
        del recipient
        return None

    def home_of(self, user: bytes) -> bytes | None:
        """The user's home node id in the newest binding (receipts are checked
        against it); None: no binding known."""
        b = self.router.binding(user)
        return None if b is None else b.node

    def hops(self, recipient: bytes) -> int:
        """Delivery's report to the sender: hops to the recipient's home (0: here/unknown)."""
        r = self.router.resolve(recipient, self._wall_ms())
        return r.hops if isinstance(r, rt.NextHop) else 0

    async def submit(
        self, envelopes: Sequence[envelope_pb2.Envelope], *, origin: bytes
    ) -> list[EnqueueResult | QpcError]:
        """Delivery's relay: each envelope into durable custody (or refused, typed).

        OK means "accepted for relay": committed to this node's custody queue
        toward the next hop (or the recipient's mailbox here), not delivered.
        """
        fed = self.federation
        if fed is None:
            err = QpcError("the mesh is not running", code=StatusCode.UNAVAILABLE)
            return [err for _ in envelopes]
        results = await fed.submit(envelopes, origin=origin)
        return [_enqueue_result(r) for r in results]

    async def remote_key_package(self, identity: bytes) -> tuple[bytes, bool] | None:
        """A KeyPackage of a user homed elsewhere, fetched via the next hop (None: not
        a remote user we know a route to)."""
        fed = self.federation
        route = self.resolve(identity)
        if fed is None or isinstance(route, fed_routes.Local):
            return None
        if isinstance(route, fed_routes.NoRoute):
            if self.router.binding(identity) is None:
                return None  # nobody we know of: the directory's NOT_FOUND
            raise NoRouteYet(f"no route yet to the home of {short(identity)}")
        return await fed.fetch_key_package(identity)

    # ------------------------------------------------------------------ inputs
    def home(self, binding: rt.HomeBinding) -> rt.Outcome:
        """A client that authenticated here signed ``binding``; the core spreads it."""
        outcome = self.router.home(binding, self._wall_ms())
        if outcome is rt.Outcome.ACCEPTED:
            self._accepted(binding)
            if self.federation is not None:
                self.federation.routes_changed()  # mail held for this user is local now
        self._wake.set()
        return outcome

    def _accepted(self, binding: rt.HomeBinding) -> None:
        """The core took ``binding`` as the newest for its user: save it."""
        self._dirty[binding.user] = binding
        self._persist_wake.set()
        self._note_home(binding)

    def _note_home(self, binding: rt.HomeBinding) -> None:
        """A user homed elsewhere may have left mail here (this was its old home)."""
        if binding.node != self.node_id:
            self._rehomed.add(binding.user)
            self._handover_wake.set()
        else:
            self._rehomed.discard(binding.user)

    def rehomed(self, user: bytes) -> None:
        """Delivery stored mail here for ``user`` just as its binding moved elsewhere
        (checked before the store call): hand that over too."""
        if self.homed_elsewhere(user):
            self._rehomed.add(user)
            self._handover_wake.set()

    def receive(self, neighbour: bytes, payload: bytes) -> bool:
        """The federation's announce sink: a neighbour's RouteUpdate."""
        try:
            update = rt.RouteUpdate.decode(payload)
        except RemoteProtocolError as exc:
            self.updates_rejected += 1
            log.info("mesh: bad route update", extra={"node": short(neighbour), "err": str(exc)})
            return False
        now = self._wall_ms()
        if neighbour not in self._linked:
            # The update overtook the link's "up" event (a separate channel).
            fed = self.federation
            if fed is None or not fed.link_up(neighbour):
                self.updates_rejected += 1
                return False
            self._linked.add(neighbour)
            self.router.link_up(neighbour, now)
        report = self.router.receive(neighbour, update, now)
        self.updates_received += 1
        for b, outcome in zip(update.bindings, report.bindings, strict=True):
            if outcome is rt.Outcome.ACCEPTED:
                self._accepted(b)
        self._wake.set()
        if self._rehomed and update.routes:  # a route to a new home may have come
            self._handover_wake.set()
        if (update.routes or update.bindings) and self.federation is not None:
            # A route, or a binding naming a home we have a route to: held envelopes
            # may have a way now (storefwd releases them).
            self.federation.routes_changed()
        return True

    # ------------------------------------------------------------------ driver
    async def run(
        self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Until cancelled, in the node's nursery (after the federation runs); ``port``:
        the node's bound UDP port (what mDNS announces)."""
        fed = self.federation
        if fed is None:
            raise ConfigError("attach a federation before running the mesh")
        now = trio.current_time()
        for sp in self.settings.static_peers:
            addrs = await _static_addresses(sp)
            if addrs:
                self.peers.discovered(sp.node_id, addrs, pt.Source.STATIC, now)
            else:
                log.warning("mesh: static peer has no usable address", extra={"peer": str(sp)})
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._link_events, fed)
            nursery.start_soon(self._routing_loop, fed)
            nursery.start_soon(self._peer_loop, fed)
            nursery.start_soon(self._persist_loop)
            nursery.start_soon(self._handover_loop, fed)
            if self.settings.mdns:
                disc = self.discovery = MdnsDiscovery(
                    DiscoveryConfig(
                        node_id=self.node_id,
                        port=port,
                        interfaces=self.settings.interfaces or None,
                    )
                )
                await nursery.start(disc.run)
                nursery.start_soon(self._discovery_events, disc)
            task_status.started()

    async def _link_events(self, fed: Federation) -> None:
        async for ev in fed.events:
            if ev.kind == "down" and _DUPLICATE in ev.reason and self._nursery is not None:
                # Both ends dialled at once and the peer closed the connection it did
                # not keep: ours may close before the one it kept reaches us. Give the
                # replacement a moment instead of withdrawing every route through the
                # neighbour (and re-learning them a second later).
                self._nursery.start_soon(self._down_unless_replaced, fed, ev)
                continue
            self._on_link(ev)

    async def _down_unless_replaced(self, fed: Federation, ev: LinkEvent) -> None:
        with trio.move_on_after(DUPLICATE_GRACE):
            await fed.wait_link(ev.node_id)
        if not fed.link_up(ev.node_id):
            self._on_link(ev)

    def _on_link(self, ev: LinkEvent) -> None:
        now_ms, now = self._wall_ms(), trio.current_time()
        try:
            if ev.kind == "up":
                self.peers.link_up(ev.node_id, now, rtt=ev.rtt, address=_peer_address(ev.address))
                if ev.node_id not in self._linked or ev.replaced:
                    # (replaced: a new incarnation of the neighbour; link_up replaces:
                    # routes learnt from the old one go, the new one gets a full dump)
                    self._linked.add(ev.node_id)
                    self.router.link_up(ev.node_id, now_ms)
            elif not (self.federation is not None and self.federation.link_up(ev.node_id)):
                # (a "down" of a connection already replaced by another is no news)
                if ev.node_id in self.peers_known():
                    self.peers.link_down(ev.node_id, now, ev.reason or "link closed")
                if ev.node_id in self._linked:
                    self._linked.discard(ev.node_id)
                    self.router.link_down(ev.node_id, now_ms)
        except LocalProtocolError as exc:  # a state the table has no row for: log, go on
            log.warning("mesh: link event not applied", extra={"event": ev.kind, "err": str(exc)})
        log.info(
            f"mesh: link {ev.kind}" + (" (new incarnation)" if ev.replaced else ""),
            extra={"node": short(ev.node_id), "addr": ev.address, "reason": ev.reason},
        )
        self._wake.set()
        if self.federation is not None:
            self.federation.routes_changed()

    def statistics(self) -> MeshStatistics:
        return MeshStatistics(
            peers=self.peers.statistics(),
            routing=self.router.statistics(),
            updates_received=self.updates_received,
            updates_rejected=self.updates_rejected,
            announce_failures=self.announce_failures,
            bindings_saved=self.bindings_saved,
            binding_save_failures=self.binding_save_failures,
            handovers_pending=len(self._rehomed),
        )

    def peers_known(self) -> set[bytes]:
        return {p.node for p in self.peers.peers()}

    async def _routing_loop(self, fed: Federation) -> None:
        while True:
            self._wake = trio.Event()
            now = self._wall_ms()
            for out in self.router.poll(now):
                if isinstance(out, rt.PersistSeq):
                    # Stored before anything polled after it goes out (the core's rule).
                    await self._store.meta_put(SEQ_META_KEY, str(out.seq).encode())
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._send, fed, out.neighbour, out.update.encode())
            wait = max(0.0, (self.router.next_deadline() - self._wall_ms()) / 1000)
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _handover_loop(self, fed: Federation) -> None:
        """The old home forwards what it still holds: each re-homed user's unacked mail
        moves from the mailbox here into custody toward its new home (as soon as a
        route to it exists), in batches, each batch one transaction."""
        while True:
            if self._rehomed:
                with trio.move_on_after(HANDOVER_RETRY):
                    await self._handover_wake.wait()
            else:
                await self._handover_wake.wait()
            self._handover_wake = trio.Event()
            candidates = set(self._rehomed)
            try:
                # Most bindings naming other nodes are users who never lived here: one
                # query for the mailboxes holding anything, not one per user.
                with_mail = await fed.custody.mailbox_users()
            except QpcError as exc:
                log.warning("mesh: hand-over check failed", extra={"err": str(exc)})
                continue
            self._rehomed -= candidates - with_mail  # (added meanwhile: next pass)
            for user in list(self._rehomed):
                try:
                    done = await self._hand_over(fed, user)
                except QpcError as exc:
                    log.warning(
                        "mesh: hand-over failed", extra={"user": short(user), "err": str(exc)}
                    )
                    continue
                if done:
                    self._rehomed.discard(user)

    async def _hand_over(self, fed: Federation, user: bytes) -> bool:
        """One batch of ``user``'s mail toward its new home; True when none is left."""
        if not self.homed_elsewhere(user) or not await fed.custody.holds_mail(user):
            return True
        route = self.resolve(user)
        if not isinstance(route, fed_routes.NextHop):
            return False  # no path to the new home yet: the next route update wakes us
        while True:
            got = await fed.custody.hand_over(user, route.node_id)
            if got.left == 0:
                return True
            if not got.moved and not got.already:
                return False  # the queue toward the hop is full: try again later

    async def _persist_loop(self) -> None:
        """Save accepted bindings, coalesced; what is pending at shutdown is saved too."""
        try:
            while True:
                await self._persist_wake.wait()
                await trio.sleep(BINDING_FLUSH_DELAY)
                self._persist_wake = trio.Event()
                await self.flush_bindings()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush_bindings()

    async def flush_bindings(self) -> None:
        """Write the bindings accepted since the last flush (one transaction)."""
        if not self._dirty:
            return
        batch, self._dirty = self._dirty, {}
        rows = [StoredBinding(b.user, b.node, b.expiry_ms, b.encode()) for b in batch.values()]
        cap = (self.settings.routing or rt.RoutingPolicy()).max_bindings
        now = self._wall_ms()
        try:
            await self._store.run(lambda s: save_bindings(s, rows, now, cap=cap))
        except QpcError as exc:  # the store is closing: the next start re-learns them
            self.binding_save_failures += len(rows)
            log.warning("mesh: home bindings not saved", extra={"n": len(rows), "err": str(exc)})
            return
        self.bindings_saved += len(rows)

    async def _send(self, fed: Federation, neighbour: bytes, payload: bytes) -> None:
        lock = self._send_locks.setdefault(neighbour, trio.Lock())
        async with lock:  # FIFO per neighbour: updates arrive in the order polled
            for attempt in range(ANNOUNCE_ATTEMPTS):
                try:
                    await fed.announce(neighbour, payload)
                    return
                except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.announce_failures += 1
                    log.info(
                        "mesh: announce failed",
                        extra={"node": short(neighbour), "err": str(exc), "attempt": attempt},
                    )
                # Sent on a connection that was just replaced (simultaneous dials), or
                # the peer was busy: the core counts this update as sent, and only the
                # periodic full dump (update_interval) would repeat it. Same content
                # again is harmless (the receiver refreshes), so retry while linked.
                await trio.sleep(ANNOUNCE_RETRY * (attempt + 1))
                if not fed.link_up(neighbour):
                    return  # link down: the core withdraws and re-dumps on the next link

    async def _peer_loop(self, fed: Federation) -> None:
        interval = fed.timers.ping_interval
        while True:
            now = trio.current_time()
            for info in fed.links():  # the link's own pings keep it alive; RTT from them
                self.peers.link_activity(info.node_id, now, rtt=info.rtt)
            for ev in self.peers.poll(now):
                if isinstance(ev, pt.Dial):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._dial, fed, ev)
                elif isinstance(ev, pt.CloseLink):
                    log.info(
                        "mesh: peer silent", extra={"node": short(ev.node), "reason": ev.reason}
                    )
                elif isinstance(ev, pt.PeerDown):
                    log.info("mesh: peer down", extra={"node": short(ev.node), "why": ev.reason})
            deadline = self.peers.next_deadline()
            wait = interval if deadline is None else min(interval, deadline - now)
            await trio.sleep(max(PEER_TICK_MIN, wait))

    async def _dial(self, fed: Federation, dial: pt.Dial) -> None:
        a = dial.address
        host = f"{a.host}%{a.scope_id}" if a.scope_id else a.host
        try:
            with trio.fail_after(self.peers_policy.dial_timeout):
                await fed.connect(host, a.port, expected=dial.node)
        except (QpcError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            info = self.peers.get(dial.node)
            if info is not None and info.state is pt.PeerState.CONNECTING:
                self.peers.dial_failed(dial.node, trio.current_time(), str(exc) or "dial failed")
            log.info("mesh: dial failed", extra={"node": short(dial.node), "err": str(exc)})

    def redial(self, nid: bytes, address: str) -> None:
        """Dial ``nid`` at ``address`` now (after ``qpc trust``: where it was refused),
        instead of waiting for either side's backoff."""
        addr = _peer_address(address)
        if addr is None or self._nursery is None or self.federation is None:
            return
        self._nursery.start_soon(self._dial, self.federation, pt.Dial(nid, addr))

    @property
    def peers_policy(self) -> pt.PeerPolicy:
        return self.settings.peers or pt.PeerPolicy()

    async def _discovery_events(self, disc: MdnsDiscovery) -> None:
        async for ev in disc.events:
            now = trio.current_time()
            try:
                if isinstance(ev, PeerSeen | PeerUpdated):
                    addrs = [pt.PeerAddress(a.host, a.port, a.scope_id) for a in ev.addresses]
                    if addrs:
                        self.peers.discovered(ev.node_id, addrs, pt.Source.MDNS, now)
                elif isinstance(ev, MdnsGone):
                    self.peers.lost(ev.node_id, pt.Source.MDNS, now)
            except LocalProtocolError as exc:
                log.info("mesh: discovery event not applied", extra={"err": str(exc)})


class NoRouteYet(QpcError):
    """No home binding or no path to the home yet: retriable (the client's outbox
    keeps the envelope and retries; bindings and routes arrive over time)."""

    code = StatusCode.UNAVAILABLE


_RELAY_CODES: dict[int, StatusCode] = {
    federation_pb2.RELAY_HOP_LIMIT_EXCEEDED: StatusCode.FAILED_PRECONDITION,
    federation_pb2.RELAY_EXPIRED: StatusCode.INVALID_ARGUMENT,
    federation_pb2.RELAY_EXPIRY_TOO_FAR: StatusCode.INVALID_ARGUMENT,
    federation_pb2.RELAY_QUEUE_FULL: StatusCode.RESOURCE_EXHAUSTED,
    federation_pb2.RELAY_INVALID: StatusCode.INVALID_ARGUMENT,
    federation_pb2.RELAY_LOOP: StatusCode.UNAVAILABLE,
    federation_pb2.RELAY_REFUSED: StatusCode.RESOURCE_EXHAUSTED,
    federation_pb2.RELAY_STRANGER_LIMIT: StatusCode.RESOURCE_EXHAUSTED,
    federation_pb2.RELAY_MAILBOX_FULL: StatusCode.RESOURCE_EXHAUSTED,
}


def _enqueue_result(r: federation_pb2.RelayResult) -> EnqueueResult | QpcError:
    """A relay answer as Delivery/Enqueue's per-envelope result."""
    if r.status in (federation_pb2.RELAY_QUEUED, federation_pb2.RELAY_STORED_LOCAL):
        return EnqueueResult(msg_id=r.msg_id, seq=0, duplicate=False)
    if r.status == federation_pb2.RELAY_DUPLICATE:
        return EnqueueResult(msg_id=r.msg_id, seq=0, duplicate=True)
    if r.status == federation_pb2.RELAY_HELD:
        return EnqueueResult(msg_id=r.msg_id, seq=0, duplicate=False, held=True)
    if r.status == federation_pb2.RELAY_NO_ROUTE:
        return NoRouteYet(f"no route yet: {r.detail}" if r.detail else "no route yet")
    code = _RELAY_CODES.get(r.status, StatusCode.INTERNAL)
    return QpcError(f"{status_name(r.status)}: {r.detail}".rstrip(": "), code=code)


def _peer_address(text: str) -> pt.PeerAddress | None:
    """A link's remote address (``format_address``: ``host:port`` or ``[v6%scope]:port``)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    scope = 0
    if "%" in host:
        host, _, s = host.partition("%")
        scope = int(s) if s.isdigit() else 0
    try:
        return pt.PeerAddress(host, int(port), scope)
    except (LocalProtocolError, ValueError):
        return None


async def _static_addresses(sp: StaticPeer) -> Sequence[pt.PeerAddress]:
    """A static peer's addresses: its literal, or what its name resolves to now."""
    if sp.is_literal:
        scope = 0
        if sp.scope:
            try:
                scope = int(sp.scope) if sp.scope.isdigit() else socket.if_nametoindex(sp.scope)
            except OSError:
                return ()
        try:
            return (pt.PeerAddress(sp.host, sp.port, scope),)
        except LocalProtocolError:
            return ()
    try:
        infos = await trio.socket.getaddrinfo(sp.host, sp.port, type=socket.SOCK_DGRAM)
    except OSError:
        return ()
    out: list[pt.PeerAddress] = []
    for fam, _t, _p, _c, sa in infos:
        if fam in (socket.AF_INET, socket.AF_INET6):
            # an IPv6 answer carries its interface index (a link-local one from
            # nss-mdns, say): keep it, or the address names no interface at all
            scope = int(sa[3]) if len(sa) == 4 else 0
            try:
                out.append(pt.PeerAddress(str(sa[0]).partition("%")[0], sp.port, scope))
            except LocalProtocolError:
                continue
    return tuple(dict.fromkeys(out))
