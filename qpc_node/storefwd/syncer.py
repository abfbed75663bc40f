"""The Trio driver of the inventory sync (:mod:`.sync` decides, this moves bytes).

It serves ``qpc.v1.Federation/Sync``, ``/SyncFetch`` and ``/SyncPush`` on the
federation's method table and opens sessions itself:

- **on link-up**: with the neighbour whose link came up (or was replaced by a new
  incarnation of it). Both ends see the link come up; the end with the lower node
  id starts at once, the other after ``link_up_delay_s``: by then the first session
  has usually moved everything and the second costs one round (~350 bytes for equal
  sets), but if the first failed the second repairs it;
- **every** ``interval_s`` (jittered by ``jitter``, so neighbours do not fall into
  step) with one random neighbour whose link is up.

A session runs each registered scope in turn (held envelopes first: DMs wait on
them), one at a time per neighbour. Per scope: read the source's items, reconcile,
push what the peer lacks and our source ``offer``s it, fetch what we lack (the
peer's ``offer`` decides what it gives), hand it to our source's ``take``. A refusal
with a retry time (rate limit, busy) holds further sessions with that neighbour off
until then. Every failure (refusal, bad answer, timeout, lost link) ends that
scope's session, counted in :meth:`Syncer.statistics`; nothing is retried in a loop.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgspec
import trio

from qpc_node.errors import ConfigError, QpcError
from qpc_node.federation.core import Federation
from qpc_node.federation.links import LinkEvent
from qpc_node.mesh.nodeid import short
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.storefwd.sync import (
    SCOPE_HELD,
    NeedItems,
    SyncCore,
    SyncLimits,
    SyncRefused,
    SyncSource,
    SyncStatistics,
)
from qpc_node.wire.gen.qpc.v1 import sync_pb2

__all__ = ["M_SYNC", "M_SYNC_FETCH", "M_SYNC_PUSH", "Syncer", "SyncerConfig"]

log = get_logger("qpc.sync")

M_SYNC = "qpc.v1.Federation/Sync"
M_SYNC_FETCH = "qpc.v1.Federation/SyncFetch"
M_SYNC_PUSH = "qpc.v1.Federation/SyncPush"


class SyncerConfig(msgspec.Struct, frozen=True):
    interval_s: float = 60.0
    """Periodic session with one random neighbour every this long (``sync.interval_s``)."""
    jitter: float = 0.25
    """Each wait is ``interval_s`` times a uniform factor in [1 - jitter, 1 + jitter]."""
    link_up_delay_s: float = 2.0
    """The higher node id of a new link starts its session this much later."""
    limits: SyncLimits = msgspec.field(default_factory=SyncLimits)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ConfigError("sync.interval_s must be > 0")
        if not 0 <= self.jitter < 1:
            raise ConfigError("sync: jitter must be in [0, 1)")
        if self.link_up_delay_s < 0:
            raise ConfigError("sync: link_up_delay_s must be >= 0")


_CALL_ERRORS = (QpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Syncer:
    """Inventory sync of one node over its federation links (see the module docstring)."""

    def __init__(
        self,
        federation: Federation,
        config: SyncerConfig | None = None,
        *,
        sources: Sequence[SyncSource] = (),
        wall_ms: WallClock = system_wall_ms,
        rng: random.Random | None = None,
        trigger_buffer: int = 256,
    ) -> None:
        self.config = config or SyncerConfig()
        self._fed = federation
        self._wall_ms = wall_ms
        self._rng = rng or random.Random()
        self._sources: dict[int, SyncSource] = {}
        self.core = SyncCore(self.config.limits, scopes=())
        for s in sources:
            self.add_source(s)
        self._busy: set[bytes] = set()
        self._hold_off: dict[bytes, float] = {}
        self._scheduled: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self._trigger_tx, self._trigger_rx = trio.open_memory_channel[bytes](trigger_buffer)
        self.triggers_dropped = 0
        self._reconfigured = trio.Event()
        federation.register_method(
            M_SYNC, sync_pb2.SyncRequest, sync_pb2.SyncResponse, self._h_sync
        )
        federation.register_method(
            M_SYNC_FETCH, sync_pb2.SyncFetchRequest, sync_pb2.SyncFetchResponse, self._h_fetch
        )
        federation.register_method(
            M_SYNC_PUSH, sync_pb2.SyncPushRequest, sync_pb2.SyncPushResponse, self._h_push
        )
        federation.add_link_listener(self._link_event)

    def add_source(self, source: SyncSource, *, replace: bool = False) -> None:
        """Reconcile ``source``'s scope from now on (one source per scope; ``replace``
        swaps the one the node wiring registered, e.g. for a test's own)."""
        scope = int(source.scope)
        if scope in self._sources and not replace:
            raise ConfigError(f"sync: scope {scope} has a source already")
        self._sources[scope] = source
        self.core.scopes = frozenset(self._sources)

    def statistics(self) -> SyncStatistics:
        return self.core.statistics()

    # ------------------------------------------------------------------ running
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start sessions on link-up and periodically until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._periodic)
            nursery.start_soon(self._expirer)
            task_status.started()
            try:
                async for nid in self._trigger_rx:
                    if nid in self._scheduled:
                        continue  # a flapping link: one pending session is enough
                    self._scheduled.add(nid)
                    delay = 0.0 if self._fed.node_id < nid else self.config.link_up_delay_s
                    nursery.start_soon(self._sync_later, nid, delay)
            finally:
                self._nursery = None

    def _link_event(self, ev: LinkEvent) -> None:
        if ev.kind == "up":
            self._link_up(ev.node_id)

    def _link_up(self, nid: bytes) -> None:
        try:
            self._trigger_tx.send_nowait(nid)
        except trio.WouldBlock:
            self.triggers_dropped += 1  # the periodic session covers it

    async def _sync_later(self, nid: bytes, delay: float) -> None:
        try:
            if delay:
                await trio.sleep(delay)
        finally:
            self._scheduled.discard(nid)
        await self.sync_with(nid)

    def set_interval(self, interval_s: float) -> None:
        """A new periodic interval (config reload): the wait under way restarts with it."""
        self.config = msgspec.structs.replace(self.config, interval_s=interval_s)
        self._reconfigured.set()

    async def _periodic(self) -> None:
        while True:
            cfg = self.config
            factor = 1 + cfg.jitter * (2 * self._rng.random() - 1)
            with trio.move_on_after(cfg.interval_s * factor):
                await self._reconfigured.wait()
            if self._reconfigured.is_set():
                self._reconfigured = trio.Event()
                continue
            now = trio.current_time()
            for nid in [n for n, t in self._hold_off.items() if t <= now]:
                del self._hold_off[nid]
            up = [
                i.node_id
                for i in self._fed.links()
                if i.node_id not in self._busy and self._hold_off.get(i.node_id, 0.0) <= now
            ]
            if up and self._nursery is not None:
                self._nursery.start_soon(self.sync_with, self._rng.choice(up))

    async def _expirer(self) -> None:
        """Close responder sessions left idle (a peer that vanished mid-session)."""
        while True:
            deadline = self.core.next_deadline()
            if deadline is None:
                await trio.sleep(self.config.limits.session_idle_s)
            else:
                await trio.sleep_until(deadline)
            self.core.expire(trio.current_time())

    async def sync_with(self, peer: bytes) -> None:
        """One session per registered scope with ``peer`` (skipped while one runs or
        the peer asked us to hold off)."""
        if peer in self._busy or self._hold_off.get(peer, 0.0) > trio.current_time():
            return
        self._busy.add(peer)
        try:
            for scope in sorted(self._sources, key=lambda s: (s != SCOPE_HELD, s)):
                if not self._fed.link_up(peer):
                    return
                if not await self._session(peer, self._sources[scope]):
                    return
        finally:
            self._busy.discard(peer)

    async def _session(self, peer: bytes, source: SyncSource) -> bool:
        """One scope's session; False when the peer should be left alone for now."""
        fed, timeout = self._fed, self.config.limits.round_timeout_s
        now_ms = self._wall_ms()
        try:
            mine = await source.items(now_ms)
        except (QpcError, OSError) as exc:  # the store failed: not this peer's fault
            log.warning("sync: source failed", extra={"scope": int(source.scope), "err": str(exc)})
            return False
        s = self.core.begin(peer, int(source.scope), mine, trio.current_time(), now_ms)
        try:
            req: sync_pb2.SyncRequest | None = s.start()
            while req is not None:
                ans = await fed.call_neighbour(
                    peer, M_SYNC, req, sync_pb2.SyncResponse, timeout=timeout
                )
                req = s.on_answer(ans)
            if s.have:
                offered = await source.offer(peer, s.have, self._wall_ms())
                for push in s.push_requests(offered):
                    resp = await fed.call_neighbour(
                        peer, M_SYNC_PUSH, push, sync_pb2.SyncPushResponse, timeout=timeout
                    )
                    s.on_push_response(resp, len(push.items))
            for fetch in s.fetch_requests():
                got = await fed.call_neighbour(
                    peer, M_SYNC_FETCH, fetch, sync_pb2.SyncFetchResponse, timeout=timeout
                )
                items = s.on_fetch_response(got, len(fetch.ids))
                if items:
                    s.note_taken(await source.take(peer, items, self._wall_ms()))
            s.finish(trio.current_time())
        except SyncRefused as exc:
            if exc.retry_after_ms:
                self._hold_off[peer] = trio.current_time() + exc.retry_after_ms / 1000
            log.info("sync: refused", extra={"node": short(peer), "reason": str(exc)})
            return False
        except _CALL_ERRORS as exc:
            s.fail()
            log.info(
                "sync: session failed",
                extra={"node": short(peer), "scope": int(source.scope), "err": str(exc)},
            )
            return False
        log.debug(
            "sync: session done",
            extra={
                "node": short(peer),
                "scope": int(source.scope),
                "have": len(s.have),
                "need": len(s.need),
                "rounds": s.rounds,
            },
        )
        return True

    # ------------------------------------------------------------------ serving
    async def _h_sync(self, req: sync_pb2.SyncRequest, src: bytes) -> sync_pb2.SyncResponse:
        now_ms = self._wall_ms()
        r = self.core.on_query(src, req, trio.current_time(), now_ms)
        if isinstance(r, NeedItems):
            try:
                items = await self._sources[r.scope].items(now_ms)
            except BaseException:
                self.core.abandon(src, req)
                raise
            r = self.core.on_query(src, req, trio.current_time(), now_ms, items=items)
        if isinstance(r, NeedItems):  # cannot happen: items were given
            raise QpcError("sync: session not opened")
        return r

    async def _h_fetch(
        self, req: sync_pb2.SyncFetchRequest, src: bytes
    ) -> sync_pb2.SyncFetchResponse:
        r = self.core.on_fetch(src, req, trio.current_time())
        if isinstance(r, sync_pb2.SyncFetchResponse):
            return r
        items = await self._sources[int(req.scope)].offer(src, r, self._wall_ms())
        return self.core.fetch_answer(len(r), items)

    async def _h_push(self, req: sync_pb2.SyncPushRequest, src: bytes) -> sync_pb2.SyncPushResponse:
        r = self.core.on_push(src, req, trio.current_time())
        if isinstance(r, sync_pb2.SyncPushResponse):
            return r
        accepted = await self._sources[int(req.scope)].take(src, r, self._wall_ms())
        return self.core.push_answer(max(0, min(accepted, len(r))))
