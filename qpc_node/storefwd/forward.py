"""Store-and-forward in the running node: hold, release, re-route, receipts, spray.

The Trio driver of :mod:`qpc_node.storefwd.held` (decisions) over
:mod:`qpc_node.store.held` (SQLite). One :class:`StoreForward` per node, owned by
the federation's :class:`~qpc_node.federation.custody.Custody`:

- **hold**: custody hands it the envelopes it has no route for; they are held
  durably (quotas, eviction, audit) and answered RELAY_HELD.
- **release**: :meth:`routes_changed` (the routing core changed, a link came up)
  wakes a pass over the recipients something is held for; those with a route now
  move into the custody queue toward the next hop in one transaction, in arrival
  order (or into the local mailbox). A pass also runs every
  :data:`RELEASE_INTERVAL` while anything is held (a route change nobody signalled).
- **re-route**: custody rows bound to a next hop whose link has been down longer
  than ``reroute_after_s`` are resolved again: to another next hop, or held.
- **receipts**: the home node signs DELIVERED when it stores a relayed envelope in
  a local mailbox and sends it to the node it came from; every node that gets a
  valid one purges its replicas, keeps a tombstone and passes it on along the
  trail (:mod:`qpc_node.storefwd.receipts`). Receipts are sent best effort: kept in
  memory per peer (bounded) until the link is up, retried a few times. A lost one
  leaves replicas to expire; the home's mailbox de-duplicates on msg_id, so
  delivery stays exactly once.
- **spray**: after ``spray_delay_s``, held envelopes with 2+ tokens give half to
  each carrier neighbour (Ping ``carrier``) that is linked: binary spray-and-wait.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from qpc_node.errors import QpcError
from qpc_node.federation.links import Link, Links
from qpc_node.federation.routes import Local, NextHop, Resolver, Route
from qpc_node.ops.clock import WallClock
from qpc_node.ops.log import get_logger
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.fairness import SenderKey
from qpc_node.store.held import (
    HeldRow,
    HoldItem,
    HoldResult,
    apply_receipts,
    custody_toward,
    held_count,
    held_drop,
    held_expire,
    held_for,
    held_recipients,
    hold_many,
    release,
    remember_receipt,
    reroute,
    spray_candidates,
    spray_done,
)
from qpc_node.store.records import FINGERPRINT_LEN, RowRef
from qpc_node.store.store import EnqueueBatch, EnqueueOutcome
from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.held import EvictReason, HoldPolicy, should_reroute, spray_split
from qpc_node.storefwd.stats import StoreFwdStatistics
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2

log = get_logger("qpc.storefwd")

M_RECEIPT = "qpc.v1.Federation/Receipt"
M_RELAY = "qpc.v1.Federation/RelayEnqueue"
RELEASE_INTERVAL = 2.0
"""Seconds between release passes while anything is held (besides route wakes)."""
RECEIPT_QUEUE = 4096
"""Receipts waiting per peer (oldest dropped beyond, counted)."""
RECEIPT_TRIES = 5
SPRAY_BATCH = 64
UNKNOWN_ORIGIN = bytes(FINGERPRINT_LEN)

_TAKEN = frozenset(
    {
        federation_pb2.RELAY_STORED_LOCAL,
        federation_pb2.RELAY_QUEUED,
        federation_pb2.RELAY_DUPLICATE,
        federation_pb2.RELAY_HELD,
    }
)


class CustodyHooks(Protocol):
    """What the store-and-forward driver needs of custody (federation/custody.py)."""

    def queued_more(self, hop: bytes, n: int) -> None: ...
    def queued_less(self, hop: bytes, n: int) -> None: ...
    def down_since(self, hop: bytes) -> float | None: ...
    def hops_with_custody(self) -> list[bytes]: ...
    async def store_local(self, batches: list[EnqueueBatch]) -> list[EnqueueOutcome]: ...


class StoreForward:
    """See the module docstring."""

    def __init__(
        self,
        node_id: bytes,
        store: AsyncStore,
        resolve: Resolver,
        links: Links,
        policy: HoldPolicy,
        *,
        wall_ms: WallClock,
        sign: Callable[[bytes], bytes] | None,
        public_key: bytes | None,
        home_of: Callable[[bytes], bytes | None] | None,
        custody: CustodyHooks,
        max_per_hop: Callable[[], int],
        call_timeout: Callable[[], float],
    ) -> None:
        self.node_id = node_id
        self._store = store
        self._resolve = resolve
        self._links = links
        self.policy = policy
        self._wall_ms = wall_ms
        self._sign = sign
        self._public_key = public_key
        self._home_of = home_of
        self._custody = custody
        self._max_per_hop = max_per_hop
        self._call_timeout = call_timeout
        self._recipients: set[bytes] = set()
        self._release_wake = trio.Event()
        self._spray_wake = trio.Event()
        self._outbox: dict[bytes, deque[rc.Receipt]] = {}
        self._outbox_wake: dict[bytes, trio.Event] = {}
        self._senders: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self.held_now = 0
        self.c_held = self.c_hold_refused = 0
        self.c_evicted: dict[EvictReason, int] = dict.fromkeys(EvictReason, 0)
        self.c_released = self.c_expired = self.c_rerouted = self.c_rerouted_held = 0
        self.c_too_far = 0
        self.c_r_sent = self.c_r_in = self.c_r_applied = self.c_r_repeated = 0
        self.c_r_unknown_msg = self.c_r_lost = self.c_purged = self.c_sprayed = 0
        self.c_r_remembered = 0
        self.c_verdict: dict[rc.Verdict, int] = dict.fromkeys(rc.Verdict, 0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, nursery: trio.Nursery) -> None:
        self._recipients = await self._store.run(held_recipients)
        self.held_now = await self._count_held()
        self._nursery = nursery
        nursery.start_soon(self._release_loop)
        nursery.start_soon(self._reroute_loop)
        nursery.start_soon(self._spray_loop)

    def stop(self) -> None:
        self._nursery = None

    async def _count_held(self) -> int:
        return await self._store.run(held_count)

    def routes_changed(self) -> None:
        """A route may have appeared (routing core update, link up): release pass."""
        self._release_wake.set()

    def carrier_up(self, peer: bytes) -> None:
        """A carrier neighbour is linked (or said so): a spray pass."""
        del peer
        self._spray_wake.set()

    def carrier(self, peer: bytes) -> bool:
        """Is ``peer`` linked and a carrier (its Ping said so)?"""
        link = self._links.get(peer)
        return link is not None and link.carrier

    def route(self, recipient: bytes) -> Route:
        """The routing core's answer for ``recipient`` now."""
        return self._resolve(recipient)

    def link_up(self, peer: bytes) -> None:
        self._release_wake.set()
        self._spray_wake.set()
        ev = self._outbox_wake.get(peer)
        if ev is not None:
            ev.set()

    # ------------------------------------------------------------------ hold
    async def hold(self, items: Sequence[HoldItem], now_ms: int) -> HoldResult:
        got = await self._store.run(lambda s: hold_many(s, items, now_ms, self.policy))
        for item, out in zip(items, got.outcomes, strict=True):
            if out == "held":
                self.c_held += 1
                self.held_now += 1
                self._recipients.add(item.envelope.recipient)
            elif out == "full":
                self.c_hold_refused += 1
        for ev in got.evicted:
            self.c_evicted[ev.reason] += 1
            self.held_now -= 1
        if got.evicted:
            log.warning(
                "storefwd: held envelopes evicted",
                extra={
                    "n": len(got.evicted),
                    "reasons": sorted({e.reason.value for e in got.evicted}),
                },
            )
        self._release_wake.set()  # a route may have come between resolve and commit
        return got

    # ------------------------------------------------------------------ release
    async def _release_loop(self) -> None:
        while True:
            with trio.move_on_after(RELEASE_INTERVAL if self._recipients else 60.0):
                await self._release_wake.wait()
            self._release_wake = trio.Event()
            try:
                await self.release_pass()
            except QpcError as exc:
                log.warning("storefwd: release pass failed", extra={"err": str(exc)})

    async def release_pass(self) -> int:
        """Release what has a route now; returns how many envelopes moved."""
        now = self._wall_ms()
        moved = 0
        for recipient in list(self._recipients):
            route = self._resolve(recipient)
            if isinstance(route, Local) or (
                isinstance(route, NextHop) and route.node_id == self.node_id
            ):
                moved += await self._release_local(recipient, now)
            elif isinstance(route, NextHop):
                hop = route.node_id
                while True:
                    got = await self._store.run(
                        functools.partial(
                            release,
                            recipient=recipient,
                            next_hop=hop,
                            now_ms=now,
                            max_per_hop=self._max_per_hop(),
                        )
                    )
                    gone = got.moved + got.hop_limit
                    self.held_now -= gone
                    if got.moved:
                        moved += got.moved
                        self.c_released += got.moved
                        self._custody.queued_more(hop, got.moved)
                    if got.left == 0 or gone == 0:
                        break
        if moved:
            log.info("storefwd: held envelopes released", extra={"n": moved})
        self._recipients = await self._store.run(held_recipients)
        return moved

    async def _release_local(self, recipient: bytes, now: int) -> int:
        rows = await self._store.run(lambda s: held_for(s, recipient, now))
        if not rows:
            return 0
        batches = [
            EnqueueBatch(
                (h.envelope,),
                now,
                SenderKey.local(h.origin)
                if h.from_node == self.node_id and h.origin is not None
                else SenderKey.relayed(h.from_node, h.origin or UNKNOWN_ORIGIN),
            )
            for h in rows
        ]
        outs = await self._custody.store_local(batches)
        done: list[RowRef] = []
        for h, out in zip(rows, outs, strict=True):
            if isinstance(out, QpcError):
                continue  # quota: stays held, tried again on the next pass
            done.append((h.id, h.envelope.msg_id))
            if h.from_node != self.node_id:
                self.emit_receipt(h.envelope.msg_id, h.envelope.recipient, h.from_node)
        if done:
            n = await self._store.run(lambda s: held_drop(s, done))
            self.held_now -= n
            self.c_released += n
        return len(done)

    async def expire(self, now_ms: int) -> int:
        """Drop what expired while held (custody's sweep calls this)."""
        n = await self._store.run(lambda s: held_expire(s, now_ms))
        if n:
            self.c_expired += n
            log.warning("storefwd: held envelopes expired", extra={"n": n})
        self.held_now = await self._count_held()  # (the gauge kept exact once a sweep)
        return n

    # ------------------------------------------------------------------ re-route
    async def _reroute_loop(self) -> None:
        period = max(0.05, min(self.policy.reroute_after_s / 4, 5.0))
        while True:
            await trio.sleep(period)
            try:
                await self.reroute_pass()
            except QpcError as exc:
                log.warning("storefwd: re-route pass failed", extra={"err": str(exc)})

    async def reroute_pass(self) -> None:
        now = trio.current_time()
        for hop in self._custody.hops_with_custody():
            if not should_reroute(self._custody.down_since(hop), now, self.policy):
                continue
            rows = await self._store.run(functools.partial(custody_toward, hop=hop))
            moves: list[tuple[RowRef, bytes]] = []
            to_held: list[RowRef] = []
            for r in rows:
                route = self._resolve(r.recipient)
                if isinstance(route, NextHop) and route.node_id not in (hop, self.node_id):
                    moves.append(((r.id, r.msg_id), route.node_id))
                elif not isinstance(route, NextHop | Local):
                    to_held.append((r.id, r.msg_id))
            if not moves and not to_held:
                continue
            moved, held = await self._store.run(
                functools.partial(
                    reroute,
                    moves=moves,
                    to_held=to_held,
                    now_ms=self._wall_ms(),
                    tokens=self.policy.spray_tokens,
                )
            )
            self.c_rerouted += moved
            self.c_rerouted_held += held
            self.held_now += held
            self._custody.queued_less(hop, moved + held)
            counts: dict[bytes, int] = {}
            for _, to in moves:
                counts[to] = counts.get(to, 0) + 1
            for to, n in counts.items():
                self._custody.queued_more(to, n)
            if held:
                self._recipients = await self._store.run(held_recipients)
            log.info(
                "storefwd: custody re-routed",
                extra={"from": hop.hex()[:16], "moved": moved, "held": held},
            )

    # ------------------------------------------------------------------ receipts
    def emit_receipt(self, msg_id: bytes, recipient: bytes, to: bytes) -> None:
        """This node is ``recipient``'s home and stored ``msg_id`` relayed by ``to``."""
        if self._sign is None or self._public_key is None:
            return
        r = rc.make_receipt(self._sign, self._public_key, msg_id, recipient, self._wall_ms())
        self._queue_receipt(to, r)

    def _queue_receipt(self, peer: bytes, r: rc.Receipt) -> None:
        q = self._outbox.setdefault(peer, deque())
        if len(q) >= RECEIPT_QUEUE:
            q.popleft()
            self.c_r_lost += 1
        q.append(r)
        ev = self._outbox_wake.setdefault(peer, trio.Event())
        ev.set()
        if peer not in self._senders and self._nursery is not None:
            self._senders.add(peer)
            self._nursery.start_soon(self._receipt_sender, peer)

    async def _receipt_sender(self, peer: bytes) -> None:
        tries = 0
        try:
            while True:
                q = self._outbox.get(peer)
                if not q:
                    ev = self._outbox_wake[peer] = trio.Event()
                    await ev.wait()
                    continue
                link = self._links.get(peer)
                if link is None:
                    ev = self._outbox_wake[peer] = trio.Event()
                    await ev.wait()  # link_up() wakes it
                    continue
                batch = [q[i] for i in range(min(len(q), rc.MAX_RECEIPTS))]
                try:
                    await link.rpc.call(
                        M_RECEIPT,
                        federation_pb2.ReceiptRequest(receipts=[r.to_proto() for r in batch]),
                        federation_pb2.ReceiptResponse,
                        timeout=self._call_timeout(),
                    )
                except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    tries += 1
                    if tries >= RECEIPT_TRIES:
                        for _ in batch:
                            q.popleft()
                        self.c_r_lost += len(batch)
                        tries = 0
                        log.info(
                            "storefwd: receipts dropped",
                            extra={"node": peer.hex()[:16], "err": str(exc), "n": len(batch)},
                        )
                    else:
                        await trio.sleep(0.2 * 2**tries)
                    continue
                tries = 0
                for _ in batch:
                    q.popleft()
                self.c_r_sent += len(batch)
        finally:
            self._senders.discard(peer)

    async def on_receipts(
        self,
        from_peer: bytes,
        parsed: Sequence[rc.Receipt | QpcError],
        *,
        expiries: Sequence[int] | None = None,
    ) -> int:
        """A neighbour's receipts: each judged, then the valid ones applied in one
        store transaction (one commit per call, not per receipt: flash writes) and
        passed on; returns how many were taken (applied now, or known as delivered
        already).

        ``expiries`` (the inventory sync's, one per receipt, capped by policy): a
        verified receipt for a msg_id never handled here is kept as a tombstone
        with that expiry instead of dropped -- the sync offers receipts to whoever
        lacks them, and a copy that reaches this node later is then a duplicate."""
        if expiries is not None and len(expiries) != len(parsed):
            raise ValueError("one expiry per receipt")
        valid: list[tuple[int, rc.Receipt, bytes]] = []
        for k, r in enumerate(parsed):
            self.c_r_in += 1
            if not isinstance(r, rc.Receipt):
                self.c_verdict[rc.Verdict.MALFORMED] += 1
                continue
            verdict = rc.judge(r, self._home_of or (lambda _u: None))
            if verdict is not rc.Verdict.OK:
                self.c_verdict[verdict] += 1
                log.info(
                    "storefwd: receipt refused",
                    extra={"node": from_peer.hex()[:16], "verdict": verdict.value},
                )
                continue
            valid.append((k, r, r.to_proto().SerializeToString(deterministic=True)))
        if not valid:
            return 0
        applied = await self._store.run(
            functools.partial(
                apply_receipts, receipts=[(r.msg_id, from_peer, blob) for _, r, blob in valid]
            )
        )
        taken = 0
        for (k, r, blob), got in zip(valid, applied, strict=True):
            if not got.known:
                # (never a tombstone of our own receipt: this node is the home, and a
                # re-homed user's mailbox handover must not meet it as a duplicate)
                if expiries is not None and r.home_node != self.node_id:
                    exp = expiries[k]
                    if await self._store.run(
                        functools.partial(
                            remember_receipt, msg_id=r.msg_id, expiry_ms=exp, receipt=blob
                        )
                    ):
                        self.c_r_remembered += 1
                        taken += 1
                        continue
                self.c_r_unknown_msg += 1
                continue
            taken += 1
            if got.already:
                self.c_r_repeated += 1
                continue
            self.c_r_applied += 1
            self.c_purged += got.purged_held + sum(got.purged_queued.values())
            self.held_now -= got.purged_held
            for hop, n in got.purged_queued.items():
                self._custody.queued_less(hop, n)
            for peer in got.peers:
                if peer != self.node_id:
                    self._queue_receipt(peer, r)
        return taken

    # ------------------------------------------------------------------ spray
    async def _spray_loop(self) -> None:
        period = max(0.05, min(self.policy.spray_delay_s / 2, 5.0))
        while True:
            with trio.move_on_after(period):
                await self._spray_wake.wait()
            self._spray_wake = trio.Event()
            if not self._recipients:
                continue
            try:
                await self.spray_pass()
            except QpcError as exc:
                log.warning("storefwd: spray pass failed", extra={"err": str(exc)})

    async def spray_pass(self) -> int:
        """Copies to every linked carrier neighbour, of what is due; returns copies."""
        sent = 0
        delay_ms = int(self.policy.spray_delay_s * 1000)
        for nid in self._links.node_ids():
            link = self._links.get(nid)
            if link is None or not link.carrier:
                continue
            now = self._wall_ms()
            rows = await self._store.run(
                functools.partial(
                    spray_candidates, carrier=nid, now_ms=now, delay_ms=delay_ms, limit=SPRAY_BATCH
                )
            )
            if not rows:
                continue
            sent += await self._spray_to(link, rows)
        return sent

    async def _spray_to(self, link: Link, rows: list[HeldRow]) -> int:
        splits = [(h, spray_split(h.tokens)) for h in rows]
        go = [(h, s) for h, s in splits if s is not None]
        req = federation_pb2.RelayEnqueueRequest(
            envelopes=[
                envelope_pb2.Envelope(
                    msg_id=h.envelope.msg_id,
                    recipient=h.envelope.recipient,
                    expiry_ms=h.envelope.expiry_ms,
                    hop_limit=h.envelope.hop_limit - 1,
                    ciphertext=h.envelope.ciphertext,
                )
                for h, _ in go
            ],
            origins=[h.origin or b"" for h, _ in go],
            origin_nodes=[h.origin_node for h, _ in go],
            spray_tokens=[s[1] for _, s in go if s is not None],
        )
        try:
            resp = await link.rpc.call(
                M_RELAY, req, federation_pb2.RelayEnqueueResponse, timeout=self._call_timeout()
            )
        except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info(
                "storefwd: spray not taken",
                extra={"node": link.node_id.hex()[:16], "err": str(exc)},
            )
            return 0
        if len(resp.results) != len(go):
            return 0
        done = [
            (h, s[0])
            for (h, s), res in zip(go, resp.results, strict=True)
            if s is not None and res.status in _TAKEN
        ]
        if done:
            await self._store.run(lambda st: spray_done(st, link.node_id, done))
            self.c_sprayed += len(done)
            log.info(
                "storefwd: copies sprayed to a carrier",
                extra={"node": link.node_id.hex()[:16], "n": len(done)},
            )
        return len(done)

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> StoreFwdStatistics:
        v = self.c_verdict
        return StoreFwdStatistics(
            held_now=max(0, self.held_now),
            held=self.c_held,
            hold_refused=self.c_hold_refused,
            evicted_expired=self.c_evicted[EvictReason.EXPIRED],
            evicted_delivered=self.c_evicted[EvictReason.DELIVERED],
            evicted_hops=self.c_evicted[EvictReason.HOPS],
            released=self.c_released,
            expired_held=self.c_expired,
            rerouted=self.c_rerouted,
            rerouted_held=self.c_rerouted_held,
            expiry_too_far=self.c_too_far,
            receipts_sent=self.c_r_sent,
            receipts_in=self.c_r_in,
            receipts_applied=self.c_r_applied,
            receipts_repeated=self.c_r_repeated,
            receipts_unknown_msg=self.c_r_unknown_msg,
            receipts_forged=v[rc.Verdict.FORGED],
            receipts_wrong_home=v[rc.Verdict.WRONG_HOME],
            receipts_unknown_home=v[rc.Verdict.UNKNOWN_HOME],
            receipts_malformed=v[rc.Verdict.MALFORMED],
            receipts_lost=self.c_r_lost,
            purged=self.c_purged,
            sprayed=self.c_sprayed,
            receipts_remembered=self.c_r_remembered,
        )
