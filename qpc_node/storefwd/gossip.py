"""The gossip driver: one Plumtree core per node, run over the federation links.

What it does around the sans-IO core (:mod:`.plumtree`):

- serves ``qpc.v1.Federation/Gossip`` on the federation's method table (the caller's
  federation budgets are charged first, as for every federation method);
- checks every incoming frame before the core sees it: the wire rules
  (:mod:`.gossip_wire`, bad frames dropped and counted by reason), a per-neighbour rate
  limit on pushes, the hop count, and the payload itself through a pluggable validator
  (``validate(payload, now_ms) -> msg_id | QpcError``: the channel layer's envelope
  checks; the push's msg_id must be the payload's). Whatever fails is dropped and
  counted, never raised into the core, never stored;
- hands first receptions to the ``deliver(payload)`` sink (awaited in the handler: a
  slow store slows the neighbour's call, it does not queue without bound);
- sends what the core wants sent as Gossip calls, one sender per neighbour, coalescing
  whatever queued while the previous call was in flight, with a bounded queue per
  neighbour (the oldest control frames go first when it overflows; counted);
- feeds link up/down from the federation's link events and runs the core's timers.

``publish(payload)`` is for messages published on this node (a local client).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
import trio

from qpc_node.errors import QpcError, RemoteProtocolError
from qpc_node.federation.core import Federation, LinkEvent
from qpc_node.mesh.nodeid import short
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.storefwd.core import Deliver, Frame, Push, Send
from qpc_node.storefwd.gossip_wire import (
    GossipMalformed,
    GossipWireLimits,
    decode_frames,
    to_proto,
)
from qpc_node.storefwd.plumtree import PlumtreeCore, PlumtreePolicy, PlumtreeStatistics
from qpc_node.wire.gen.qpc.v1 import gossip_pb2

__all__ = [
    "M_GOSSIP",
    "DeliverSink",
    "GossipDriver",
    "GossipLimits",
    "GossipStatistics",
    "PayloadValidator",
]

log = get_logger("qpc.gossip")

M_GOSSIP = "qpc.v1.Federation/Gossip"


class PayloadValidator(Protocol):
    """Checks a payload (an encoded ChannelMessage) as a relay can; returns its msg_id,
    or the typed error that refuses it (returned, not raised: refusals are counted).

    ``hops``: node-to-node hops the copy has travelled (0 for a local publish); the
    payload's own hop limit is the validator's to enforce (relays forward the sender's
    bytes unchanged, so the limit is compared with the hop count, not decremented)."""

    def __call__(self, payload: bytes, now_ms: int, hops: int, /) -> bytes | QpcError: ...


DeliverSink = Callable[[bytes], Awaitable[None]]


class GossipLimits(msgspec.Struct, frozen=True):
    queue_frames: int = 2048
    """Frames queued toward one neighbour while its previous call is in flight."""
    frames_per_call: int = 128
    pushes_per_second: float = 200.0
    push_burst: float = 400.0
    """Per neighbour: pushes beyond this rate are dropped (the core repairs via GRAFT)."""
    max_hops: int = 64
    """Pushes that travelled further are dropped (beyond any mesh's diameter)."""
    wire: GossipWireLimits = msgspec.field(default_factory=GossipWireLimits)


class GossipStatistics(msgspec.Struct, frozen=True):
    calls_in: int
    malformed_calls: int
    calls_out: int
    call_failures: int
    frames_in: int
    frames_out: int
    frames_dropped_bad_id: int
    frames_dropped_bad_hops: int
    frames_dropped_too_many_ids: int
    frames_dropped_too_large: int
    frames_dropped_empty: int
    pushes_rate_limited: int
    pushes_over_hops: int
    pushes_invalid: int
    pushes_id_mismatch: int
    queue_dropped: int
    published: int
    injected: int
    delivered: int
    deliver_failures: int
    link_ups: int
    link_downs: int
    core: PlumtreeStatistics


class _Counts(msgspec.Struct):
    calls_in: int = 0
    malformed_calls: int = 0
    calls_out: int = 0
    call_failures: int = 0
    frames_in: int = 0
    frames_out: int = 0
    pushes_rate_limited: int = 0
    pushes_over_hops: int = 0
    pushes_invalid: int = 0
    pushes_id_mismatch: int = 0
    queue_dropped: int = 0
    published: int = 0
    injected: int = 0
    delivered: int = 0
    deliver_failures: int = 0
    link_ups: int = 0
    link_downs: int = 0
    dropped: dict[str, int] = msgspec.field(default_factory=dict)


class _Outbox:
    """Frames toward one neighbour and the wake-up of its sender task."""

    __slots__ = ("frames", "scope", "wake")

    def __init__(self) -> None:
        self.frames: deque[Frame] = deque()
        self.wake = trio.Event()
        self.scope = trio.CancelScope()


class GossipDriver:
    """One node's broadcast delivery (see the module docstring)."""

    def __init__(
        self,
        federation: Federation,
        validate: PayloadValidator,
        deliver: DeliverSink,
        *,
        policy: PlumtreePolicy | None = None,
        limits: GossipLimits | None = None,
        wall_ms: WallClock = system_wall_ms,
    ) -> None:
        self.federation = federation
        self.core = PlumtreeCore(policy)
        self.limits = limits or GossipLimits()
        self._validate = validate
        self._deliver = deliver
        self._wall_ms = wall_ms
        self._push_budget = TokenBucketLimiter[bytes](
            rate=self.limits.pushes_per_second, burst=self.limits.push_burst
        )
        self._out: dict[bytes, _Outbox] = {}
        self._c = _Counts()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        federation.register_method(
            M_GOSSIP, gossip_pb2.GossipRequest, gossip_pb2.GossipResponse, self._h_gossip
        )
        federation.add_link_listener(self._on_link_event)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: the core's timers and one sender per linked neighbour."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for info in self.federation.links():  # links that came up before we ran
                self._link_up(info.node_id, info.rtt)
            task_status.started()
            try:
                await self._timer_loop()
            finally:
                self._nursery = None

    async def _timer_loop(self) -> None:
        core = self.core
        while True:
            deadline = core.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            core.tick(trio.current_time())
            self._dispatch(core.poll())

    # ------------------------------------------------------------------ links
    def _on_link_event(self, ev: LinkEvent) -> None:
        if ev.kind == "up":
            if ev.replaced:
                # A new incarnation of the neighbour: what the core knew of it is void
                # (unACKed pushes, tree edge); it starts over as a fresh link.
                self._link_down(ev.node_id)
            self._link_up(ev.node_id, ev.rtt)
        elif not self.federation.link_up(ev.node_id):
            # (a "down" of a connection already replaced by another is no news)
            self._link_down(ev.node_id)

    def _link_up(self, nid: bytes, rtt: float | None) -> None:
        if self._nursery is None or nid in self._out:
            return
        self._c.link_ups += 1
        box = self._out[nid] = _Outbox()
        self.core.link_up(trio.current_time(), nid)
        if rtt is not None:
            self.core.set_rtt(nid, rtt)
        self._nursery.start_soon(self._sender, nid, box)
        self._dispatch(self.core.poll())
        self._wake.set()

    def _link_down(self, nid: bytes) -> None:
        box = self._out.pop(nid, None)
        if box is None:
            return
        self._c.link_downs += 1
        box.scope.cancel()
        self.core.link_down(trio.current_time(), nid)
        self._wake.set()

    # ------------------------------------------------------------------ sending
    def _dispatch(self, outputs: list[Send | Deliver]) -> list[bytes]:
        """Queue the Sends; return the payloads of first receptions (to deliver)."""
        fresh: list[bytes] = []
        cap = self.limits.queue_frames
        for o in outputs:
            if isinstance(o, Deliver):
                if o.peer is not None:
                    fresh.append(o.payload)
                continue
            box = self._out.get(o.peer)
            if box is None:
                continue
            q = box.frames
            for f in o.frames:
                if len(q) >= cap:
                    self._c.queue_dropped += 1
                    q.popleft()
                q.append(f)
            box.wake.set()
        return fresh

    async def _sender(self, nid: bytes, box: _Outbox) -> None:
        with box.scope:
            while True:
                await box.wake.wait()
                box.wake = trio.Event()
                while box.frames:
                    n = min(len(box.frames), self.limits.frames_per_call)
                    frames = [box.frames.popleft() for _ in range(n)]
                    await self._call(nid, frames)

    async def _call(self, nid: bytes, frames: list[Frame]) -> None:
        self._c.calls_out += 1
        self._c.frames_out += len(frames)
        try:
            await self.federation.call_neighbour(
                nid, M_GOSSIP, to_proto(frames), gossip_pb2.GossipResponse
            )
        except QpcError as exc:
            # Lost like a radio frame: the core's ACK/IHAVE/GRAFT machinery repairs it.
            self._c.call_failures += 1
            log.debug("gossip: call failed", extra={"node": short(nid), "err": str(exc)})

    # ------------------------------------------------------------------ receiving
    async def _h_gossip(
        self, req: gossip_pb2.GossipRequest, src: bytes
    ) -> gossip_pb2.GossipResponse:
        c = self._c
        c.calls_in += 1
        try:
            dec = decode_frames(req, self.limits.wire)
        except GossipMalformed:
            c.malformed_calls += 1
            raise
        for reason, n in dec.dropped.items():
            c.dropped[reason] = c.dropped.get(reason, 0) + n
        c.frames_in += len(dec.frames)
        now = trio.current_time()
        now_ms = self._wall_ms()
        frames: list[Frame] = []
        for f in dec.frames:
            if isinstance(f, Push) and not self._push_ok(f, src, now, now_ms):
                continue
            frames.append(f)
        if src not in self._out:  # a call that raced the link event
            self._link_up(src, None)
        if frames:
            self.core.receive(now, src, frames)
            fresh = self._dispatch(self.core.poll())
            self._wake.set()
            for payload in fresh:
                await self._hand_over(payload)
        return gossip_pb2.GossipResponse()

    def _push_ok(self, f: Push, src: bytes, now: float, now_ms: int) -> bool:
        c = self._c
        if f.hops > self.limits.max_hops:
            c.pushes_over_hops += 1
            return False
        if self.core.has(f.msg_id):
            return True  # a duplicate: the core only needs it to ACK/PRUNE, not checked again
        if not self._push_budget.allow(src, now):
            c.pushes_rate_limited += 1
            return False
        try:
            got = self._validate(f.payload, now_ms, f.hops)
        except QpcError as exc:  # a validator that raises its refusal instead
            got = exc
        if isinstance(got, QpcError):
            c.pushes_invalid += 1
            log.debug("gossip: invalid push", extra={"node": short(src), "err": str(got)})
            return False
        if got != f.msg_id:
            c.pushes_id_mismatch += 1
            return False
        return True

    async def _hand_over(self, payload: bytes) -> None:
        try:
            await self._deliver(payload)
        except QpcError as exc:
            self._c.deliver_failures += 1
            log.warning("gossip: delivery sink refused a message", extra={"err": str(exc)})
        else:
            self._c.delivered += 1

    # ------------------------------------------------------------------ publishing
    def publish(self, payload: bytes) -> bytes:
        """A message published on this node: checked like any other, then spread.

        Returns its msg_id; raises the validator's typed error if it refuses it.
        """
        got = self._validate(payload, self._wall_ms(), 0)
        if isinstance(got, QpcError):
            raise got
        if len(got) != 16:
            raise RemoteProtocolError("validator returned a msg_id that is not 16 bytes")
        self._c.published += 1
        self.core.publish(trio.current_time(), got, payload)
        self._dispatch(self.core.poll())
        self._wake.set()
        return got

    def inject(self, payload: bytes, peer: bytes | None) -> bool:
        """A message the inventory sync brought from ``peer`` and the store took as
        new: spread on the tree like a first reception from ``peer`` (eager edges
        push, lazy ones get an IHAVE; ``peer`` is skipped), not flooded like a
        publish. Checked like any payload; False if refused or seen before."""
        got = self._validate(payload, self._wall_ms(), 0)  # sync carries no hop count
        if isinstance(got, QpcError) or len(got) != 16:
            return False
        if not self.core.inject(trio.current_time(), got, payload, peer):
            return False
        self._c.injected += 1
        self._dispatch(self.core.poll())
        self._wake.set()
        return True

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> GossipStatistics:
        c = self._c
        d = c.dropped
        return GossipStatistics(
            calls_in=c.calls_in,
            malformed_calls=c.malformed_calls,
            calls_out=c.calls_out,
            call_failures=c.call_failures,
            frames_in=c.frames_in,
            frames_out=c.frames_out,
            frames_dropped_bad_id=d.get("bad_id", 0),
            frames_dropped_bad_hops=d.get("bad_hops", 0),
            frames_dropped_too_many_ids=d.get("too_many_ids", 0),
            frames_dropped_too_large=d.get("too_large", 0),
            frames_dropped_empty=d.get("empty", 0),
            pushes_rate_limited=c.pushes_rate_limited,
            pushes_over_hops=c.pushes_over_hops,
            pushes_invalid=c.pushes_invalid,
            pushes_id_mismatch=c.pushes_id_mismatch,
            queue_dropped=c.queue_dropped,
            published=c.published,
            injected=c.injected,
            delivered=c.delivered,
            deliver_failures=c.deliver_failures,
            link_ups=c.link_ups,
            link_downs=c.link_downs,
            core=self.core.statistics(),
        )
