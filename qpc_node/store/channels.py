"""Broadcast channel messages held by this node: within retention, under caps, by seq.

A node keeps every channel message it accepted -- published by a local client or
received from a neighbour -- for clients to fetch and for neighbours to reconcile
with, until the earlier of its expiry and ``retention`` after it arrived (routers: 48 h
by default). Caps on messages and bytes hold: past them the message that would go
soonest anyway (oldest keep-until) is evicted first, counted.

Every message gets a node-wide sequence number (never reused: AUTOINCREMENT), which
is what clients page with (one cursor per channel). The table is idempotent on
msg_id: an evicted or retention-dropped message stays as a tombstone (no data) until
its own expiry, so a late copy from another neighbour is a duplicate, not a new
message shown twice. Tombstones are bounded too (``max_tombstones``).

Functions here run on the store's worker thread (``AsyncStore.run``);
:class:`ChannelStore` is what the node's services and the gossip driver await.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import trio

from qpc_node.errors import QpcError
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.sql import transaction
from qpc_node.store.store import Store
from qpc_node.wire.channel import (
    REASONS,
    ChannelHopLimit,
    ChannelMessage,
    ChannelMessageError,
    ChannelPolicy,
    decode_channel_message,
)

log = get_logger("qpc.channels")

DEFAULT_RETENTION_MS = 48 * 3600 * 1000
DEFAULT_MAX_MESSAGES = 20_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
SWEEP_ROWS = 10_000
"""Rows a sweep turns into tombstones or deletes at most per transaction."""


class ChannelLimits(msgspec.Struct, frozen=True):
    retention_ms: int = DEFAULT_RETENTION_MS
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def max_tombstones(self) -> int:
        """Ids remembered without their message at most (4 per message of the cap)."""
        return 4 * self.max_messages


class Added(msgspec.Struct, frozen=True):
    """One message's fate in :func:`add_messages`."""

    new: bool
    seq: int
    """Its sequence number here (also for a duplicate: the first copy's)."""


class AddResult(msgspec.Struct, frozen=True):
    added: list[Added]
    evicted: int
    """Messages turned into tombstones to get back under the caps."""


class ChannelPage(msgspec.Struct, frozen=True):
    messages: list[tuple[int, bytes]]
    """(seq, encoded ChannelMessage), oldest first."""
    more: bool


class ChannelTotals(msgspec.Struct, frozen=True):
    messages: int
    bytes: int
    tombstones: int


def _totals(conn_store: Store) -> tuple[int, int]:
    row = conn_store.conn.execute(
        "SELECT messages, bytes FROM channel_totals WHERE id = 1"
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def _bump(store: Store, messages: int, nbytes: int) -> None:
    store.conn.execute(
        "INSERT INTO channel_totals (id, messages, bytes) VALUES (1, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET messages = messages + excluded.messages,"
        " bytes = bytes + excluded.bytes",
        (messages, nbytes),
    )


def _evict_over_caps(store: Store, limits: ChannelLimits) -> int:
    """Tombstone the soonest-to-go messages until both caps hold; how many went."""
    conn = store.conn
    evicted = 0
    while True:
        count, nbytes = _totals(store)
        if count <= limits.max_messages and nbytes <= limits.max_bytes:
            return evicted
        over = max(count - limits.max_messages, 1)
        rows = conn.execute(
            "SELECT seq, size FROM channel_messages WHERE data IS NOT NULL"
            " ORDER BY keep_until_ms, seq LIMIT ?",
            (min(over, SWEEP_ROWS),),
        ).fetchall()
        if not rows:
            return evicted
        conn.executemany(
            "UPDATE channel_messages SET data = NULL WHERE seq = ?", [(r[0],) for r in rows]
        )
        _bump(store, -len(rows), -sum(int(r[1]) for r in rows))
        evicted += len(rows)


def add_messages(
    store: Store, msgs: Sequence[ChannelMessage], now_ms: int, limits: ChannelLimits
) -> AddResult:
    """Store what is new (idempotent on msg_id), then evict down to the caps: one
    transaction for the batch."""
    out: list[Added] = []
    with transaction(store.conn) as conn:
        for m in msgs:
            row = conn.execute(
                "SELECT seq FROM channel_messages WHERE msg_id = ?", (m.msg_id,)
            ).fetchone()
            if row is not None:
                out.append(Added(False, int(row[0])))
                continue
            data = m.encode()
            keep_until = min(m.expiry_ms, now_ms + limits.retention_ms)
            cur = conn.execute(
                "INSERT INTO channel_messages (msg_id, channel_id, expiry_ms, keep_until_ms,"
                " received_ms, size, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m.msg_id, m.channel_id, m.expiry_ms, keep_until, now_ms, len(data), data),
            )
            _bump(store, 1, len(data))
            out.append(Added(True, int(cur.lastrowid or 0)))
        evicted = _evict_over_caps(store, limits)
    return AddResult(out, evicted)


def sweep_messages(store: Store, now_ms: int, limits: ChannelLimits) -> tuple[int, int]:
    """Retention: tombstone messages past keep-until, delete tombstones past expiry and
    over their cap. Returns (messages dropped, tombstones deleted)."""
    with transaction(store.conn) as conn:
        rows = conn.execute(
            "SELECT seq, size FROM channel_messages WHERE data IS NOT NULL AND keep_until_ms <= ?"
            " ORDER BY keep_until_ms LIMIT ?",
            (now_ms, SWEEP_ROWS),
        ).fetchall()
        conn.executemany(
            "UPDATE channel_messages SET data = NULL WHERE seq = ?", [(r[0],) for r in rows]
        )
        _bump(store, -len(rows), -sum(int(r[1]) for r in rows))
        deleted: int = conn.execute(
            "DELETE FROM channel_messages WHERE seq IN (SELECT seq FROM channel_messages"
            " WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, SWEEP_ROWS),
        ).rowcount
        # Expired live rows (keep-until is never past expiry) were tombstoned above.
        tombstones = int(
            conn.execute("SELECT count(*) FROM channel_messages WHERE data IS NULL").fetchone()[0]
        )
        over = tombstones - limits.max_tombstones
        if over > 0:
            deleted += conn.execute(
                "DELETE FROM channel_messages WHERE seq IN (SELECT seq FROM channel_messages"
                " WHERE data IS NULL ORDER BY expiry_ms, seq LIMIT ?)",
                (min(over, SWEEP_ROWS),),
            ).rowcount
        _evict_over_caps(store, limits)  # caps lowered by a reload take effect here
    return len(rows), deleted


def fetch_messages(
    store: Store,
    cursors: Sequence[tuple[bytes, int]],
    now_ms: int,
    *,
    limit: int,
    max_bytes: int,
    overhead: int = 0,
) -> ChannelPage:
    """Messages of the cursors' channels above each cursor, oldest (by seq) first.

    Cut at ``limit`` messages or ``max_bytes`` (each message counts its encoded size
    plus ``overhead``; never more: a first message that does not fit gives an empty
    page with ``more``): each channel's part stays a prefix of what it has, so a
    client that moves each cursor to the highest seq it got for that channel misses
    nothing.
    """
    found: list[tuple[int, bytes]] = []
    more = False
    conn = store.conn
    for channel_id, after in cursors:
        rows = conn.execute(
            "SELECT seq, data FROM channel_messages WHERE channel_id = ? AND seq > ?"
            " AND data IS NOT NULL AND keep_until_ms > ? ORDER BY seq LIMIT ?",
            (channel_id, min(after, 2**63 - 1), now_ms, limit + 1),
        ).fetchall()
        more = more or len(rows) > limit
        found += [(int(s), bytes(d)) for s, d in rows[:limit]]
    found.sort()
    page: list[tuple[int, bytes]] = []
    used = 0
    for seq, data in found:
        if len(page) >= limit or used + len(data) + overhead > max_bytes:
            more = True
            break
        page.append((seq, data))
        used += len(data) + overhead
    return ChannelPage(page, more)


def channel_totals(store: Store) -> ChannelTotals:
    count, nbytes = _totals(store)
    tomb = store.conn.execute(
        "SELECT count(*) FROM channel_messages WHERE data IS NULL"
    ).fetchone()[0]
    return ChannelTotals(count, nbytes, int(tomb))


def holding(store: Store, now_ms: int) -> list[tuple[int, bytes]]:
    """(expiry_ms, msg_id) of every message still served here (for reconciliation)."""
    rows = store.conn.execute(
        "SELECT expiry_ms, msg_id FROM channel_messages WHERE data IS NOT NULL"
        " AND keep_until_ms > ? ORDER BY seq",
        (now_ms,),
    ).fetchall()
    return [(int(e), bytes(m)) for e, m in rows]


def get_messages(store: Store, msg_ids: Sequence[bytes], now_ms: int) -> list[bytes]:
    """The encoded messages of ``msg_ids`` still served here (unknown ids are skipped)."""
    out: list[bytes] = []
    for mid in msg_ids:
        row = store.conn.execute(
            "SELECT data FROM channel_messages WHERE msg_id = ? AND data IS NOT NULL"
            " AND keep_until_ms > ?",
            (mid, now_ms),
        ).fetchone()
        if row is not None:
            out.append(bytes(row[0]))
    return out


class ChannelStoreStatistics(msgspec.Struct, frozen=True):
    stored: int  # new messages accepted (local publishes and from neighbours)
    duplicates: int  # copies of a message already held (or remembered)
    evicted_caps: int  # messages dropped to stay under channels.max_messages/max_bytes
    evicted_retention: int  # messages dropped past channels.retention_s (or expiry)
    refused_malformed: int  # refused by the relay checks, by reason (wire/channel.py)
    refused_too_large: int
    refused_expired: int
    refused_expiry_too_far: int
    refused_hop_limit: int


class ChannelStore:
    """The node's channel messages: what Channel/Publish, Channel/Fetch and the gossip
    driver use. ``on_published`` (set by the node wiring) gets each new message a
    local client published, encoded; ``add`` is for what neighbours deliver.

    For the gossip driver (storefwd/gossip.py) ``validate`` is its PayloadValidator
    and ``deliver`` its DeliverSink."""

    def __init__(
        self,
        store: AsyncStore,
        limits: ChannelLimits,
        policy: ChannelPolicy | None = None,
        *,
        wall_ms: WallClock = system_wall_ms,
    ) -> None:
        self._store = store
        self._wall_ms = wall_ms
        self.limits = limits
        self.policy = policy or ChannelPolicy()
        self.on_published: Callable[[bytes], None] = lambda _data: None
        self._changed = trio.Event()
        self._stored = 0
        self._duplicates = 0
        self._evicted_caps = 0
        self._evicted_retention = 0
        self._refused = dict.fromkeys(REASONS, 0)

    def set_limits(self, limits: ChannelLimits, policy: ChannelPolicy) -> None:
        """Live reload: the next add and sweep use them."""
        self.limits = limits
        self.policy = policy

    def refused(self, exc: ChannelMessageError) -> None:
        """Count a message a relay check refused (by the caller that decoded it)."""
        self._refused[exc.reason] = self._refused.get(exc.reason, 0) + 1

    @property
    def changed(self) -> trio.Event:
        """Set when a new message is stored (then replaced): what long-polls wait on."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def store_checked(self, msgs: Sequence[ChannelMessage], now_ms: int) -> list[Added]:
        """Store messages that passed the relay checks; each new one wakes long-polls."""
        limits = self.limits
        res = await self._store.run(lambda s: add_messages(s, msgs, now_ms, limits))
        new = sum(1 for a in res.added if a.new)
        self._stored += new
        self._duplicates += len(res.added) - new
        self._evicted_caps += res.evicted
        if new:
            self._notify()
        return res.added

    def validate(self, payload: bytes, now_ms: int, hops: int = 0, /) -> bytes | QpcError:
        """The relay checks on a payload from a neighbour: its msg_id, or the typed
        error that refuses it (returned, and counted here by reason). ``hops``: how far
        the copy has travelled; past the sender's hop_limit it is refused (the gossip
        driver forwards the sender's bytes unchanged and counts hops beside them)."""
        try:
            msg = decode_channel_message(payload, now_ms, self.policy)
            if hops > msg.hop_limit:
                raise ChannelHopLimit(f"travelled {hops} hops, hop_limit {msg.hop_limit}")
            return msg.msg_id
        except ChannelMessageError as exc:
            self.refused(exc)
            return exc

    async def deliver(self, payload: bytes) -> None:
        """Store a message a neighbour delivered (first reception here)."""
        await self.add([payload], self._wall_ms())

    async def add(self, msgs: Sequence[bytes], now_ms: int) -> list[bool]:
        """Check and store encoded messages from neighbours; True for each new one.

        A message failing a relay check is counted (by reason) and gets False, as a
        duplicate does: nothing of it is stored.
        """
        ok: list[tuple[int, ChannelMessage]] = []
        for i, data in enumerate(msgs):
            try:
                ok.append((i, decode_channel_message(data, now_ms, self.policy)))
            except ChannelMessageError as exc:
                self.refused(exc)
        out = [False] * len(msgs)
        if ok:
            added = await self.store_checked([m for _, m in ok], now_ms)
            for (i, _), a in zip(ok, added, strict=True):
                out[i] = a.new
        return out

    async def published(self, msg: ChannelMessage, now_ms: int) -> Added:
        """A local client's message (already checked): store it; if new, hand it to
        ``on_published`` (the gossip driver spreads it)."""
        (added,) = await self.store_checked([msg], now_ms)
        if added.new:
            try:
                self.on_published(msg.encode())
            except QpcError as exc:  # stored here all the same; the sync spreads it later
                log.warning("a published channel message was not spread", extra={"err": str(exc)})
        return added

    async def fetch(
        self,
        cursors: Sequence[tuple[bytes, int]],
        now_ms: int,
        *,
        limit: int,
        max_bytes: int,
        overhead: int = 0,
    ) -> ChannelPage:
        return await self._store.run(
            lambda s: fetch_messages(
                s, cursors, now_ms, limit=limit, max_bytes=max_bytes, overhead=overhead
            )
        )

    async def sweep(self, now_ms: int) -> tuple[int, int]:
        limits = self.limits
        dropped, deleted = await self._store.run(lambda s: sweep_messages(s, now_ms, limits))
        self._evicted_retention += dropped
        return dropped, deleted

    async def holding(self, now_ms: int) -> list[tuple[int, bytes]]:
        return await self._store.run(lambda s: holding(s, now_ms))

    async def get(self, msg_ids: Sequence[bytes], now_ms: int) -> list[bytes]:
        return await self._store.run(lambda s: get_messages(s, msg_ids, now_ms))

    async def totals(self) -> ChannelTotals:
        return await self._store.run(channel_totals)

    def statistics(self) -> ChannelStoreStatistics:
        r = self._refused
        return ChannelStoreStatistics(
            stored=self._stored,
            duplicates=self._duplicates,
            evicted_caps=self._evicted_caps,
            evicted_retention=self._evicted_retention,
            refused_malformed=r["malformed"],
            refused_too_large=r["too_large"],
            refused_expired=r["expired"],
            refused_expiry_too_far=r["expiry_too_far"],
            refused_hop_limit=r["hop_limit"],
        )
