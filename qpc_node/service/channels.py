"""Channel/Publish and Channel/Fetch: broadcast channel messages for client sessions.

The node cannot read a channel message; it checks what a relay can (wire/channel.py)
and stores it (store/channels.py). Publish is rate limited per session identity on
top of the Guard's general limits (a channel message reaches every node of the mesh:
one user must not flood them all). A message refused by a check gets its typed
status in the answer, is counted by reason, and nothing of it is stored.

Fetch pages by per-channel cursors over the node's own sequence numbers and may
long-poll: it answers when a message for one of its channels arrives, or mail for
the caller's mailbox (so a client waits on one call for both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import msgspec
import trio

from qpc_node.errors import RemoteProtocolError
from qpc_node.rpc.context import AnswerOverBudget, CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.delivery import Waiters
from qpc_node.service.guard import Guard, RateLimited
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store.channels import ChannelPage, ChannelStore
from qpc_node.wire.channel import CHANNEL_ID_LEN, ChannelMessageError, from_proto
from qpc_node.wire.gen.qpc.v1 import channel_pb2, rpc_pb2

MAX_CHANNELS = 64
"""Cursors (channels) one Fetch may name."""
MAX_FETCH = 256
DEFAULT_FETCH = 64
MAX_WAIT_S = 30.0
FETCH_BYTES = 512 * 1024
"""What one Fetch answer reserves of the node's send budget at most."""
ANSWER_OVERHEAD = 64
MESSAGE_OVERHEAD = 32
"""A StoredChannelMessage's bytes besides the encoded message (seq, tags, lengths)."""


def publish_limiter(rate: float) -> TokenBucketLimiter[str]:
    return TokenBucketLimiter[str](rate=rate, burst=max(1.0, 4 * rate))


class ChannelServiceStatistics(msgspec.Struct, frozen=True):
    published: int  # new messages local clients published
    duplicates: int  # publishes of a message already held (a retry)
    refused: int  # publishes refused by a relay check (by reason: ChannelStore)
    rate_limited: int  # publishes refused by the per-session publish rate
    fetches: int
    parked_fetches: int  # long-polls waiting right now


class ChannelService:
    def __init__(
        self,
        store: ChannelStore,
        guard: Guard,
        *,
        wall_ms: Callable[[], int],
        limiter: TokenBucketLimiter[str],
        mail: Waiters | None = None,
        max_wait: float = MAX_WAIT_S,
    ) -> None:
        self._store = store
        self._guard = guard
        self._wall_ms = wall_ms
        self.limiter = limiter
        self._mail = mail
        self._max_wait = max_wait
        self._draining = False
        self._drain = trio.Event()
        self._published = 0
        self._duplicates = 0
        self._refused = 0
        self._rate_limited = 0
        self._fetches = 0
        self._parked = 0

    def register(self, table: MethodTable) -> None:
        table.register(
            "qpc.v1.Channel/Publish",
            channel_pb2.ChannelPublishRequest,
            channel_pb2.ChannelPublishResponse,
            self.publish,
        )
        table.register(
            "qpc.v1.Channel/Fetch",
            channel_pb2.ChannelFetchRequest,
            channel_pb2.ChannelFetchResponse,
            self.fetch,
            max_timeout=self._max_wait + 15,
        )

    def begin_drain(self) -> None:
        """Answer parked long-polls now and park no more (the node is stopping)."""
        self._draining = True
        self._drain.set()

    async def publish(
        self, req: channel_pb2.ChannelPublishRequest, ctx: CallContext
    ) -> channel_pb2.ChannelPublishResponse:
        user = self._guard.check(ctx)
        if not self.limiter.allow(user.hex(), trio.current_time()):
            self._rate_limited += 1
            raise RateLimited("channel publish rate exceeded for this session; slow down")
        now = self._wall_ms()
        try:
            msg = from_proto(req.message, now, self._store.policy)
        except ChannelMessageError as exc:
            self._refused += 1
            self._store.refused(exc)
            return channel_pb2.ChannelPublishResponse(
                status=cast(rpc_pb2.StatusCode, int(exc.code)), detail=exc.message
            )
        added = await self._store.published(msg, now)
        if added.new:
            self._published += 1
        else:
            self._duplicates += 1
        return channel_pb2.ChannelPublishResponse(duplicate=not added.new, seq=added.seq)

    async def fetch(
        self, req: channel_pb2.ChannelFetchRequest, ctx: CallContext
    ) -> channel_pb2.ChannelFetchResponse:
        user = self._guard.check(ctx)
        if not 0 < len(req.cursors) <= MAX_CHANNELS:
            raise RemoteProtocolError(f"a fetch names 1..{MAX_CHANNELS} channels")
        cursors: dict[bytes, int] = {}
        for c in req.cursors:
            if len(c.channel_id) != CHANNEL_ID_LEN:
                raise RemoteProtocolError(f"channel_id must be {CHANNEL_ID_LEN} bytes")
            cid = bytes(c.channel_id)
            cursors[cid] = max(cursors.get(cid, 0), c.after_seq)
        self._fetches += 1
        limit = min(req.limit or DEFAULT_FETCH, MAX_FETCH)
        wait = min(req.wait_ms / 1000.0, self._max_wait, max(ctx.time_remaining() - 1.0, 0.0))
        items = list(cursors.items())
        page = await self._read(ctx, items, limit)
        if page.messages or wait <= 0 or self._draining:
            return _answer(page)
        self._parked += 1
        try:
            with trio.move_on_after(wait):
                for _ in range(1000):  # each round waits for a wakeup; bounded anyway
                    # Take the event before re-reading, so a store in between wakes us.
                    changed = self._store.changed
                    page = await self._read(ctx, items, limit)
                    if page.messages or self._draining:
                        break
                    if self._mail is not None:
                        with self._mail.parked(user) as mail:
                            if await _first(changed, mail, self._drain) is mail:
                                break  # mail for the caller: answer so it fetches that
                    elif await _first(changed, self._drain) is self._drain:
                        break
        finally:
            self._parked -= 1
        return _answer(page)

    async def _read(
        self, ctx: CallContext, cursors: list[tuple[bytes, int]], limit: int
    ) -> ChannelPage:
        """Reserve the answer's bytes before the store reads them (as Delivery/Fetch)."""
        want = min(FETCH_BYTES, ctx.answer.frame_cap)
        granted = ctx.answer.reserve(want)
        try:
            page = await self._store.fetch(
                cursors,
                self._wall_ms(),
                limit=limit,
                max_bytes=max(granted - ANSWER_OVERHEAD, 0),
                overhead=MESSAGE_OVERHEAD,
            )
        except BaseException:
            ctx.answer.shrink(0)
            raise
        if not page.messages and page.more:
            ctx.answer.shrink(0)
            raise AnswerOverBudget("node is holding too many response bytes; retry later")
        ctx.answer.shrink(_bound(page))
        return page

    def statistics(self) -> ChannelServiceStatistics:
        return ChannelServiceStatistics(
            published=self._published,
            duplicates=self._duplicates,
            refused=self._refused,
            rate_limited=self._rate_limited,
            fetches=self._fetches,
            parked_fetches=self._parked,
        )


async def _first(*events: trio.Event) -> trio.Event:
    """Wait until one of ``events`` is set; return the first found set."""
    for ev in events:
        if ev.is_set():
            return ev
    async with trio.open_nursery() as nursery:

        async def wait(ev: trio.Event) -> None:
            await ev.wait()
            nursery.cancel_scope.cancel()

        for ev in events:
            nursery.start_soon(wait, ev)
    return next(ev for ev in events if ev.is_set())


def _bound(page: ChannelPage) -> int:
    if not page.messages:
        return 0
    return ANSWER_OVERHEAD + sum(MESSAGE_OVERHEAD + len(d) for _, d in page.messages)


def _answer(page: ChannelPage) -> channel_pb2.ChannelFetchResponse:
    out = channel_pb2.ChannelFetchResponse(more=page.more)
    for seq, data in page.messages:
        item = out.messages.add(seq=seq)
        item.message.ParseFromString(data)
    return out
