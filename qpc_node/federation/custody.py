"""Hop-by-hop custody: what this node acknowledged to a previous hop and still owes.

``RelayEnqueue`` (and Delivery's relay, :meth:`Custody.submit`) answers per
envelope; a hop answers QUEUED or STORED_LOCAL only after the SQLite transaction
that holds the envelope has committed (custody queue toward its next hop, or the
recipient's mailbox). A drainer per next hop sends what it holds while the link
is up, deletes a row only when the next hop took custody (or refused it for
good: counted and logged, never silently), and backs off on retriable refusals
and errors. Every hop is idempotent on msg_id (the mailbox's unique index and
the relay seen-set), so retries after a lost answer never store twice. A sweep
drops what expired in custody (counted).

Throughput. A drainer keeps up to ``FederationLimits.relay_window`` batches in
flight toward its hop (:class:`_HopDrain`; envelopes toward one hop may arrive
reordered), and custody's store calls of one kind that arrive while the store is
busy share one commit (:class:`_Grouped`): stop-and-wait batches and one fsync per
small call made a relay hop carry far less than one node takes in
(bench/README.md, the mesh).

Fairness. Each relayed envelope carries its declared origin (the sending user's
fingerprint, proven to the node where it entered the federation) hop by hop, in
the custody queue and on the wire. The recipient's home node stores it as from
``SenderKey.relayed(calling node, origin)``, so relayed mail faces the same
mailbox fairness as local mail (store/fairness.py): a stranger gets its share of
the stranger pool, keyed by (neighbour, origin), and the recipient's contacts
keep the rest. A stranger-limit refusal is final for the sending hop
(RELAY_STRANGER_LIMIT: retrying would let a flood occupy the custody queue
toward this node, the same exhaustion one hop up); a full mailbox is retried
with backoff until expiry (RELAY_MAILBOX_FULL).
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

import msgspec
import trio

from qpc_node.errors import LocalProtocolError, QpcError, RemoteProtocolError
from qpc_node.federation.limits import FederationLimits
from qpc_node.federation.links import Link, Links, LinkTimers
from qpc_node.federation.routes import Local, NextHop, Resolver, Route
from qpc_node.federation.stats import CounterTable
from qpc_node.ops.clock import WallClock
from qpc_node.ops.log import get_logger
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.errors import QuotaExceeded
from qpc_node.store.fairness import Reason, SenderKey
from qpc_node.store.federation import (
    AcceptCall,
    AcceptOutcome,
    Handover,
    QueuedRelay,
    RelayItem,
    RelayQueueLimits,
    mailbox_has_mail,
    mailboxes_with_mail,
    relay_accept_many,
    relay_done_many,
    relay_due,
    relay_expire,
    relay_handover,
    relay_hops,
    relay_next_attempt,
    relay_retry_later,
)
from qpc_node.store.held import HoldItem
from qpc_node.store.records import FINGERPRINT_LEN, Envelope, RowRef
from qpc_node.store.store import EnqueueBatch, EnqueueOutcome, Store
from qpc_node.storefwd.forward import StoreForward
from qpc_node.storefwd.held import ExpiryVerdict, check_expiry
from qpc_node.wire.envelope import Envelope as WireEnvelope
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2

log = get_logger("qpc.federation")

A = TypeVar("A")
R = TypeVar("R")

M_RELAY = "qpc.v1.Federation/RelayEnqueue"

# Custody passed: the hop holds it (or already did).
_TAKEN = frozenset(
    {
        federation_pb2.RELAY_STORED_LOCAL,
        federation_pb2.RELAY_QUEUED,
        federation_pb2.RELAY_DUPLICATE,
        federation_pb2.RELAY_HELD,
    }
)
# May succeed later: keep it and retry with backoff (until it expires).
_RETRY = frozenset({federation_pb2.RELAY_NO_ROUTE, federation_pb2.RELAY_QUEUE_FULL})
# The recipient's mailbox is full: retry too, but on the slower full-mailbox backoff.
_RETRY_FULL = frozenset({federation_pb2.RELAY_MAILBOX_FULL})
# Mail handed over by the user's old home is the user's own backlog, not a stranger's
# flood: a fairness refusal at the new home is "not yet" (the user fetches there and
# frees its stranger pool), retried on the full-mailbox backoff until it expires.
_RETRY_HANDOVER = frozenset({federation_pb2.RELAY_STRANGER_LIMIT})

UNKNOWN_ORIGIN = bytes(FINGERPRINT_LEN)
"""The origin fairness uses for an envelope whose previous hop declared none (a peer
predating ``RelayEnqueueRequest.origins``): with the relaying node it makes one sender
key per neighbour, so all such mail from one neighbour shares one stranger share. No
user has this fingerprint (it would be a SHA-256 preimage of zero)."""

_STRANGER_REASONS = frozenset({Reason.STRANGER_SHARE_USED.value, Reason.STRANGER_POOL_FULL.value})


def status_name(status: int) -> str:
    """The enum name; a value this build does not know (a newer peer's) stays a number
    instead of raising in the drainer."""
    try:
        return federation_pb2.RelayStatus.Name(cast(federation_pb2.RelayStatus, status))
    except ValueError:
        return f"RELAY_STATUS_{status:d}"


class RelayRefusal(msgspec.Struct, frozen=True):
    """A next hop refused an envelope for good: custody ended here, with this status."""

    msg_id: bytes
    next_hop: bytes
    status: int
    detail: str

    @property
    def status_name(self) -> str:
        return status_name(self.status)


class _Grouped(Generic[A, R]):
    """Store calls of one kind that arrive while the store runs an earlier group of
    them share the next job: one transaction, one commit (one fsync) for all.

    Why: relay traffic is many small commits from concurrent callers (clients'
    relayed sends, neighbours' batches -- several in flight per neighbour -- and the
    drainers' deletes); each commit waits for an fsync, and the store worker runs one
    job at a time. Nothing waits to fill a group: a lone call runs at once, and what
    arrives meanwhile goes together next. Each caller gets its own result, and is
    answered only after the commit, as before. A store error fails every call of
    its group (nothing of it was committed), raised in each caller as before.
    """

    def __init__(
        self, store: AsyncStore, run_many: Callable[[Store, list[A]], list[R]], name: str
    ) -> None:
        self._store = store
        self._run_many = run_many
        self.name = name
        self._pending: list[tuple[A, _Slot[R]]] = []
        self._wake = trio.Event()
        self._serving = False
        self.jobs = 0
        self.calls = 0

    async def call(self, arg: A) -> R:
        if not self._serving:  # no server task (not started, or stopped): alone
            self.jobs += 1
            self.calls += 1
            (got,) = await self._store.run(self._job([arg]))
            return got
        slot: _Slot[R] = _Slot()
        self._pending.append((arg, slot))
        self._wake.set()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return cast(R, slot.value)

    def _job(self, args: list[A]) -> Callable[[Store], list[R]]:
        return lambda store: self._run_many(store, args)

    async def serve(self) -> None:
        self._serving = True
        take: list[tuple[A, _Slot[R]]] = []
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    take, self._pending = self._pending, []
                    self.jobs += 1
                    self.calls += len(take)
                    try:
                        got = await self._store.run(self._job([a for a, _ in take]))
                    except Exception as exc:  # to each caller, as a store.run of its own would
                        for _, slot in take:
                            slot.finish(None, exc)
                    else:
                        for (_, slot), value in zip(take, got, strict=True):
                            slot.finish(value, None)
                    take = []
        finally:
            self._serving = False
            # Stopped (the node's nursery): callers still waiting are answered with an
            # error; what the interrupted job committed, if anything, is idempotent.
            gone = QpcError(f"custody stopped ({self.name})")
            for _, slot in take + self._pending:
                if not slot.done.is_set():
                    slot.finish(None, gone)
            self._pending = []


class _Slot(Generic[R]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: R | None = None
        self.error: Exception | None = None

    def finish(self, value: R | None, error: Exception | None) -> None:
        self.value, self.error = value, error
        self.done.set()


def _accept_many(
    store: Store, args: list[tuple[AcceptCall, RelayQueueLimits]]
) -> list[list[AcceptOutcome]]:
    # One limits object per node: the newest call's (a reload may have changed it).
    return relay_accept_many(store, [c for c, _ in args], args[-1][1])


def _enqueue_many(store: Store, args: list[list[EnqueueBatch]]) -> list[list[EnqueueOutcome]]:
    got = store.enqueue_many([b for batches in args for b in batches])
    out, start = [], 0
    for batches in args:
        out.append(got[start : start + len(batches)])
        start += len(batches)
    return out


def _done_many(store: Store, args: list[list[RowRef]]) -> list[int]:
    return relay_done_many(store, args)


class _HopDrain(msgspec.Struct):
    """The drainer of one next hop: batches in flight and their rows.

    Up to ``FederationLimits.relay_window`` batches toward a hop are in flight at
    once (the next hop commits each before answering; waiting for that commit batch
    by batch made one hop carry only ``relay_batch`` envelopes per round trip). A row
    is in at most one batch at a time: reads skip ``inflight``, and a row leaves it
    only once its fate is committed here (deleted, or rescheduled) or its batch
    failed, so nothing is sent twice at once. A lost answer still leads to a resend,
    which the next hop's seen-set or mailbox index answers as a duplicate.

    Ordering: batches toward one hop may be taken in another order than they were
    read (the next hop handles concurrent calls concurrently), and a retried row goes
    out after younger ones anyway, so envelopes toward one next hop may arrive
    reordered. The MLS client tolerates that: it holds messages of a future epoch
    until it has the commit, and decrypts out of order within an epoch.
    """

    backoff: float
    inflight: set[int] = msgspec.field(default_factory=set)
    outstanding: int = 0
    """Batches sent and not yet settled."""
    failed: bool = False
    """A batch was not taken since the drainer last backed off."""


class Custody:
    """The custody queue of one node: intake, drainers per next hop, expiry sweep."""

    def __init__(
        self,
        node_id: bytes,
        store: AsyncStore,
        resolve: Resolver,
        links: Links,
        counters: CounterTable,
        *,
        limits: FederationLimits,
        timers: LinkTimers,
        wall_ms: WallClock,
        on_local: Callable[[bytes], None] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        public_key: bytes | None = None,
        home_of: Callable[[bytes], bytes | None] | None = None,
    ) -> None:
        self.node_id = node_id
        self._store = store
        self._resolve = resolve
        self._links = links
        self._count = counters
        self.limits = limits
        self.timers = timers
        self._wall_ms = wall_ms
        self._on_local = on_local
        self._home_of = home_of
        self._wake: dict[bytes, trio.Event] = {}  # per next hop: its drainer's wakeup
        self._drainers: set[bytes] = set()
        self._drain_state: dict[bytes, _HopDrain] = {}
        self._accepts = _Grouped(store, _accept_many, "relay accept")
        self._locals = _Grouped(store, _enqueue_many, "local delivery")
        self._deletes = _Grouped(store, _done_many, "custody ended")
        self.queued: Counter[bytes] = Counter()
        self._refusals: deque[RelayRefusal] = deque(maxlen=1024)
        self.expired = 0
        self.send_failures = 0
        self.handed_over = 0
        """Messages moved from a re-homed user's mailbox here into custody."""
        self._nursery: trio.Nursery | None = None
        self._down_since: dict[bytes, float] = {}
        """Per next hop with custody: since when (monotonic) its drainer found no link."""
        self.storefwd = StoreForward(
            node_id,
            store,
            resolve,
            links,
            limits.storefwd,
            wall_ms=wall_ms,
            sign=sign,
            public_key=public_key,
            home_of=home_of,
            custody=self,
            max_per_hop=lambda: self.limits.queue.max_per_hop,
            call_timeout=lambda: self.timers.call_timeout,
        )

    async def start(self, nursery: trio.Nursery) -> None:
        """Drain what a previous run left in custody, and sweep expiries, in ``nursery``."""
        held = await self._store.run(relay_hops)
        self.queued = Counter(held)
        self._nursery = nursery
        for group in (self._accepts, self._locals, self._deletes):
            nursery.start_soon(group.serve)
        for hop in held:
            self._ensure_drainer(hop)
        nursery.start_soon(self._sweep)
        await self.storefwd.start(nursery)

    def stop(self) -> None:
        self._nursery = None
        self.storefwd.stop()

    # ------------------------------------------------------------------ storefwd hooks
    def queued_more(self, hop: bytes, n: int) -> None:
        """``n`` envelopes entered custody toward ``hop`` (released, re-routed)."""
        self.queued[hop] += n
        self._ensure_drainer(hop)
        self.kick(hop)

    def queued_less(self, hop: bytes, n: int) -> None:
        self.queued[hop] -= n

    def down_since(self, hop: bytes) -> float | None:
        return None if self._links.get(hop) is not None else self._down_since.get(hop)

    def hops_with_custody(self) -> list[bytes]:
        return [h for h, n in self.queued.items() if n > 0]

    async def store_local(self, batches: list[EnqueueBatch]) -> list[EnqueueOutcome]:
        return await self._locals.call(batches)

    def queued_toward(self, hop: bytes) -> int:
        return max(0, self.queued[hop])

    def batches_in_flight(self, hop: bytes) -> int:
        """Relay batches sent toward ``hop`` and not yet settled (at most
        ``limits.relay_window``)."""
        st = self._drain_state.get(hop)
        return 0 if st is None else st.outstanding

    # ------------------------------------------------------------------ intake
    async def submit(
        self, envelopes: Sequence[envelope_pb2.Envelope], *, origin: bytes
    ) -> list[federation_pb2.RelayResult]:
        """Route envelopes that start here (the node's Delivery/Enqueue).

        ``origin`` is the fingerprint the sending user proved on its session: it goes
        with each envelope to every hop (mailbox fairness at the recipient's home node
        judges it), and the user accepts mail from each recipient from now on, as a
        local send does. A recipient homed here is stored as a local send.
        """
        if len(origin) != FINGERPRINT_LEN:
            raise LocalProtocolError(f"origin must be a {FINGERPRINT_LEN}-byte fingerprint")
        n = len(envelopes)
        return await self._custody(
            envelopes,
            from_node=self.node_id,
            origins=[origin] * n,
            proven=True,
            origin_nodes=[self.node_id] * n,
            tokens=[0] * n,
            handovers=[False] * n,
        )

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
        """Store each envelope a neighbour hands us durably here (mailbox, custody
        queue, or held while no route exists) or refuse it typed.

        ``origins`` as on the wire (``RelayEnqueueRequest.origins``): none, or one per
        envelope, each empty (unknown) or a fingerprint; a wrong count is refused
        whole (RemoteProtocolError), a malformed entry refuses its envelope alone.
        One result per envelope, in order. What is reported STORED_LOCAL or QUEUED is
        committed when this returns.
        """
        for name, got in (
            ("origins", origins),
            ("origin_nodes", origin_nodes),
            ("spray_tokens", spray_tokens),
            ("handover", handover),
        ):
            if len(got) not in (0, len(envelopes)):
                raise RemoteProtocolError(
                    f"{len(got)} {name} for {len(envelopes)} envelopes (0 or one each)"
                )
        n = len(envelopes)
        declared: list[bytes | None] = [o or None for o in origins] or [None] * n
        nodes: list[bytes | None] = [o or None for o in origin_nodes] or [None] * n
        return await self._custody(
            envelopes,
            from_node=from_node,
            origins=declared,
            proven=False,
            origin_nodes=nodes,
            tokens=list(spray_tokens) or [0] * n,
            handovers=list(handover) or [False] * n,
        )

    def _home(self, recipient: bytes) -> bytes | None:
        """The recipient's home node in this node's bindings (None: unknown)."""
        return None if self._home_of is None else self._home_of(recipient)

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
        origin_nodes: Sequence[bytes | None],
        tokens: Sequence[int],
        handovers: Sequence[bool],
    ) -> list[federation_pb2.RelayResult]:
        now = self._wall_ms()
        results: list[federation_pb2.RelayResult | None] = [None] * len(envelopes)
        local: list[tuple[int, Envelope, SenderKey]] = []
        relay: list[tuple[int, RelayItem]] = []
        hold: list[tuple[int, HoldItem]] = []
        routes: dict[bytes, Route] = {}
        policy = self.limits.storefwd

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
            onode = origin_nodes[i]
            if onode is not None and len(onode) != FINGERPRINT_LEN:
                refuse(i, federation_pb2.RELAY_INVALID, f"origin node of {len(onode)} bytes")
                continue
            try:
                env = WireEnvelope.from_proto(pb)
            except QpcError as exc:
                refuse(i, federation_pb2.RELAY_INVALID, exc.message)
                continue
            rec = Envelope(env.msg_id, env.recipient, env.expiry_ms, env.hop_limit, env.ciphertext)
            verdict = check_expiry(env.expiry_ms, now, policy)
            if verdict is ExpiryVerdict.EXPIRED:
                refuse(i, federation_pb2.RELAY_EXPIRED, "expired")
                continue
            if verdict is ExpiryVerdict.TOO_FAR:
                self.storefwd.c_too_far += 1
                refuse(
                    i,
                    federation_pb2.RELAY_EXPIRY_TOO_FAR,
                    f"expiry more than {policy.max_expiry_ahead_s} s ahead",
                )
                continue
            route = routes.get(env.recipient)
            if route is None:  # once per recipient and call: a batch often has a few
                route = routes[env.recipient] = self._resolve(env.recipient)
            if isinstance(route, Local) or (
                isinstance(route, NextHop) and route.node_id == self.node_id
            ):
                local.append((i, rec, self._sender(from_node, origin, proven=proven)))
            elif isinstance(route, NextHop):
                if route.node_id == from_node:
                    refuse(i, federation_pb2.RELAY_LOOP, "the next hop is the sender")
                elif env.hop_limit == 0:
                    refuse(i, federation_pb2.RELAY_HOP_LIMIT_EXCEEDED, "hop_limit 0")
                elif proven and route.hops > env.hop_limit:
                    # An envelope that starts here and cannot reach the home on the
                    # path known now: refused here, where the sender gets the answer,
                    # instead of after custody at the hop where it runs out (whose
                    # refusal only reaches this node's refusal log).
                    refuse(
                        i,
                        federation_pb2.RELAY_HOP_LIMIT_EXCEEDED,
                        f"hop_limit {env.hop_limit} < {route.hops} hops to the recipient's home",
                    )
                else:
                    fwd = Envelope(
                        rec.msg_id, rec.recipient, rec.expiry_ms, rec.hop_limit - 1, rec.ciphertext
                    )
                    relay.append(
                        (
                            i,
                            RelayItem(
                                route.node_id,
                                from_node,
                                fwd,
                                origin,
                                onode or from_node,
                                handover=handovers[i],
                                home=self._home(rec.recipient) if handovers[i] else None,
                            ),
                        )
                    )
            elif env.hop_limit == 0:
                refuse(i, federation_pb2.RELAY_HOP_LIMIT_EXCEEDED, "hop_limit 0")
            else:
                # No route yet: held here until one appears (storefwd), hop_limit as it
                # arrived (holding costs no hop).
                hold.append(
                    (
                        i,
                        HoldItem(
                            rec,
                            origin,
                            onode or from_node,
                            from_node,
                            # (a neighbour cannot hand out more copies than we would)
                            min(tokens[i], policy.spray_tokens) or policy.spray_tokens,
                            trail=not proven,
                            handover=handovers[i],
                            home=self._home(rec.recipient) if handovers[i] else None,
                        ),
                    )
                )
        if local:
            # Each envelope its own savepoint, with its own sender, in one commit.
            stored = await self._locals.call(
                [EnqueueBatch((rec,), now, sender) for _, rec, sender in local]
            )
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
                if not proven:
                    # The home node: DELIVERED goes back the way it came (a late copy,
                    # a duplicate here, gets one too: its holder purges it).
                    self.storefwd.emit_receipt(rec.msg_id, rec.recipient, from_node)
        if relay:
            items = [it for _, it in relay]
            outs = await self._accepts.call((AcceptCall(items, now, proven), self.limits.queue))
            for (i, item), out in zip(relay, outs, strict=True):
                if out == "queued":
                    refuse(i, federation_pb2.RELAY_QUEUED, "")
                    self.queued[item.next_hop] += 1
                    self._ensure_drainer(item.next_hop)
                    self.kick(item.next_hop)
                elif out == "duplicate":
                    refuse(i, federation_pb2.RELAY_DUPLICATE, "")
                else:
                    refuse(i, federation_pb2.RELAY_QUEUE_FULL, out.replace("_", " "))
        if hold:
            got_h = await self.storefwd.hold([it for _, it in hold], now)
            for (i, _), hout in zip(hold, got_h.outcomes, strict=True):
                if hout == "held":
                    refuse(i, federation_pb2.RELAY_HELD, "held until a route appears")
                elif hout == "duplicate":
                    refuse(i, federation_pb2.RELAY_DUPLICATE, "")
                else:
                    refuse(i, federation_pb2.RELAY_QUEUE_FULL, "held quota full")
        return [r for r in results if r is not None]

    async def hand_over(self, user: bytes, next_hop: bytes) -> Handover:
        """Move ``user``'s unacked mail from its mailbox here into custody toward
        ``next_hop``: the user re-homed to a node reached through it. Moves up to a
        batch per call (see :func:`~qpc_node.store.federation.relay_handover`)."""
        now = self._wall_ms()
        qlim = self.limits.queue
        got = await self._store.run(
            lambda s: relay_handover(s, user, next_hop, self.node_id, now, qlim)
        )
        if got.moved:
            self.handed_over += got.moved
            self.queued[next_hop] += got.moved
            self._ensure_drainer(next_hop)
            self.kick(next_hop)
        if got.moved or got.already:
            log.info(
                "federation: re-homed user's mail handed over",
                extra={
                    "user": user.hex(),
                    "next_hop": next_hop.hex(),
                    "moved": got.moved,
                    "already_relayed": got.already,
                    "left": got.left,
                },
            )
        return got

    async def mailbox_users(self) -> set[bytes]:
        """Users with unacked mail in this node's mailbox (one store query)."""
        return await self._store.run(mailboxes_with_mail)

    async def holds_mail(self, user: bytes) -> bool:
        """Is there unacked mail for ``user`` in this node's mailbox?"""
        now = self._wall_ms()
        return await self._store.run(lambda s: mailbox_has_mail(s, user, now))

    def refusals(self) -> list[RelayRefusal]:
        """Recent envelopes a next hop refused for good (newest last, bounded)."""
        return list(self._refusals)

    # ------------------------------------------------------------------ draining
    def kick(self, hop: bytes) -> None:
        """Wake the drainer of ``hop`` (new custody, or its link came up)."""
        ev = self._wake.get(hop)
        if ev is not None:
            ev.set()

    def _ensure_drainer(self, hop: bytes) -> None:
        if hop in self._drainers or self._nursery is None:
            return
        self._drainers.add(hop)
        self._nursery.start_soon(self._drain, hop)

    async def _drain(self, hop: bytes) -> None:
        """Send what is due toward ``hop`` while its link is up, with up to
        ``limits.relay_window`` batches in flight (see :class:`_HopDrain`)."""
        st = self._drain_state[hop] = _HopDrain(backoff=self.timers.retry_initial)
        try:
            async with trio.open_nursery() as sends:
                while True:
                    wake = self._wake[hop] = trio.Event()  # before reading: no lost wakeup
                    link = self._links.get(hop)
                    if link is None:
                        # (since when: storefwd re-routes custody of a hop down too long)
                        self._down_since.setdefault(hop, trio.current_time())
                        await wake.wait()
                        continue
                    self._down_since.pop(hop, None)
                    if st.failed:
                        # A batch was not taken (error, link lost): wait before sending
                        # more; batches still in flight settle meanwhile.
                        st.failed = False
                        with trio.move_on_after(st.backoff * (0.5 + random.random() / 2)):
                            await link.down.wait()
                        st.backoff = min(st.backoff * 2, self.timers.retry_max)
                        continue
                    if st.outstanding >= max(1, self.limits.relay_window):
                        await wake.wait()  # a settling batch wakes us
                        continue
                    now = self._wall_ms()
                    batch = await self._store.run(
                        functools.partial(
                            relay_due,
                            next_hop=hop,
                            now_ms=now,
                            limit=self.limits.relay_batch,
                            skip=frozenset(st.inflight),
                        )
                    )
                    if not batch:
                        if st.outstanding:
                            await wake.wait()
                            continue
                        nxt = await self._store.run(
                            functools.partial(relay_next_attempt, next_hop=hop, now_ms=now)
                        )
                        wait = math.inf if nxt is None else max(0.0, (nxt - now) / 1000)
                        with trio.move_on_after(wait):
                            await wake.wait()
                        continue
                    st.inflight.update(q.id for q in batch)
                    st.outstanding += 1
                    sends.start_soon(self._send_tracked, hop, st, link, batch)
        finally:
            self._drainers.discard(hop)
            self._drain_state.pop(hop, None)

    async def _send_tracked(
        self, hop: bytes, st: _HopDrain, link: Link, batch: list[QueuedRelay]
    ) -> None:
        """One batch in flight: its rows stay in ``st.inflight`` until their fate is
        committed (deleted, or rescheduled), or until the batch failed and the rows
        are left for a later read; then the drainer is woken for the next batch."""
        try:
            if await self._send_batch(link, batch):
                st.backoff = self.timers.retry_initial
            else:
                self.send_failures += 1
                st.failed = True
        finally:
            st.inflight.difference_update(q.id for q in batch)
            st.outstanding -= 1
            self.kick(hop)

    async def _send_batch(self, link: Link, batch: list[QueuedRelay]) -> bool:
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
            origin_nodes=[q.origin_node or b"" for q in batch],
            # (none at all unless the batch carries a hand-over: the older wire)
            handover=[q.handover for q in batch] if any(q.handover for q in batch) else [],
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
        done: list[RowRef] = []
        later: list[tuple[int, bytes, int]] = []
        refused: Counter[str] = Counter()
        details: dict[str, str] = {}  # first detail per status, for the log
        now = self._wall_ms()
        t = self.timers
        for q, res in zip(batch, resp.results, strict=True):
            if res.status in _TAKEN:
                done.append((q.id, q.envelope.msg_id))
                counters.relayed_out += 1
            elif (
                res.status in _RETRY
                or res.status in _RETRY_FULL
                or (q.handover and res.status in _RETRY_HANDOVER)
            ):
                counters.deferred_out[status_name(res.status)] += 1
                delay = t.retry_initial * 2 ** min(q.attempts, 8)
                if res.status in _RETRY_FULL or res.status in _RETRY_HANDOVER:
                    delay = min(t.retry_initial * 2 ** min(q.attempts, 30), t.full_retry_max)
                later.append((q.id, q.envelope.msg_id, now + int(1000 * delay)))
            else:
                done.append((q.id, q.envelope.msg_id))
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
            await self._end_custody(link.node_id, done)
        if later:
            await self._store.run(lambda s: relay_retry_later(s, later))
        return True

    async def _end_custody(self, hop: bytes, rows: list[RowRef]) -> None:
        """Delete ``rows`` (the next hop took them, or refused them for good); returns
        once that is committed (with the deletes of other batches settling meanwhile).
        A row a receipt purged meanwhile is not counted (and its id, reused by a newer
        envelope, does not match: see :data:`~qpc_node.store.federation.RowRef`)."""
        n = await self._deletes.call(rows)  # awaited first: others settle meanwhile
        self.queued[hop] -= n

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(self.timers.sweep_interval)
            now = self._wall_ms()
            q, _ = await self._store.run(functools.partial(relay_expire, now_ms=now))
            await self.storefwd.expire(now)
            if q:
                self.expired += q
                log.warning("federation: envelopes expired in custody", extra={"n": q})
                self.queued = Counter(await self._store.run(relay_hops))
