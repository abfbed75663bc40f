"""Federation state in the node's SQLite file: trust pins and the relay custody queue.

Plain functions over a :class:`~qpc_node.store.store.Store`, run on the store's
worker thread with ``await async_store.run(lambda s: fn(s, ...))``. Every
multi-row change is one transaction: when :func:`relay_accept` returns, what it
reports as queued is on disk (WAL, ``synchronous=FULL``) -- that is the moment a
relay may acknowledge custody to the previous hop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from typing import Literal

import msgspec

from qpc_node.errors import ConfigError
from qpc_node.store.held import handover_passes, handover_reopen, seen_add
from qpc_node.store.mailbox import note_sent, payload_of, release_to_custody
from qpc_node.store.records import Envelope, RowRef
from qpc_node.store.sql import transaction
from qpc_node.store.store import Store

PinState = Literal["trusted", "refused"]
AcceptOutcome = Literal["queued", "duplicate", "hop_full", "source_full", "origin_full"]


class PinRecord(msgspec.Struct, frozen=True):
    node_id: bytes
    public_key: bytes | None  # None: trusted by id before we ever saw its key
    state: PinState
    address: str  # where it was last seen ("" if never)
    first_seen_ms: int
    last_seen_ms: int


class TrustSnapshot(msgspec.Struct, frozen=True):
    pins: tuple[PinRecord, ...]
    addresses: tuple[tuple[str, bytes], ...]  # address -> node id that answered there


class TrustChange(msgspec.Struct, frozen=True):
    """One change a trust decision made: a pin (new or changed) and/or an address binding."""

    pin: PinRecord | None = None
    bind: tuple[str, bytes] | None = None


def load_trust(store: Store) -> TrustSnapshot:
    conn = store.conn
    pins = tuple(
        PinRecord(bytes(r[0]), None if r[1] is None else bytes(r[1]), r[2], r[3], r[4], r[5])
        for r in conn.execute(
            "SELECT node_id, public_key, state, address, first_seen_ms, last_seen_ms FROM fed_pins"
        )
    )
    addrs = tuple(
        (str(r[0]), bytes(r[1])) for r in conn.execute("SELECT address, node_id FROM fed_addresses")
    )
    return TrustSnapshot(pins, addrs)


def save_trust(store: Store, changes: Sequence[TrustChange], now_ms: int) -> None:
    with transaction(store.conn) as conn:
        for ch in changes:
            if ch.pin is not None:
                p = ch.pin
                conn.execute(
                    "INSERT INTO fed_pins (node_id, public_key, state, address, first_seen_ms,"
                    " last_seen_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE"
                    " SET public_key = coalesce(excluded.public_key, public_key),"
                    " state = excluded.state, address = excluded.address,"
                    " last_seen_ms = excluded.last_seen_ms",
                    (p.node_id, p.public_key, p.state, p.address, p.first_seen_ms, p.last_seen_ms),
                )
            if ch.bind is not None:
                conn.execute(
                    "INSERT INTO fed_addresses (address, node_id, bound_ms) VALUES (?, ?, ?)"
                    " ON CONFLICT(address) DO UPDATE SET node_id = excluded.node_id,"
                    " bound_ms = excluded.bound_ms",
                    (ch.bind[0], ch.bind[1], now_ms),
                )


# --------------------------------------------------------------------------- custody


class RelayItem(msgspec.Struct, frozen=True):
    """An envelope to hand to ``next_hop``: ``hop_limit`` is already decremented.

    ``origin`` is the sending user's fingerprint as declared with the envelope (proven
    here if it entered here), ``None`` if the previous hop declared none; it travels
    with the envelope unchanged (federation.proto, ``RelayEnqueueRequest.origins``).
    """

    next_hop: bytes
    from_node: bytes
    envelope: Envelope
    origin: bytes | None
    origin_node: bytes | None = None
    """The node where it entered the federation (``RelayEnqueueRequest.origin_nodes``),
    None if undeclared; forwarded unchanged, the hold quota's key."""
    handover: bool = False
    """A hand-over copy (``RelayEnqueueRequest.handover``): queued as one, forwarded as
    one, and it may pass a delivered tombstone of its msg_id once
    (:func:`~qpc_node.store.held.handover_passes`)."""
    home: bytes | None = None
    """The recipient's home node in this node's bindings now (None: unknown); a
    hand-over passes a tombstone only when it is not the node whose receipt made it."""


class QueuedRelay(msgspec.Struct, frozen=True):
    id: int
    next_hop: bytes
    envelope: Envelope
    attempts: int
    origin: bytes | None
    handover: bool = False
    """A hand-over copy: handed over by this node as the user's old home
    (:func:`relay_handover`), or relayed here as one (:attr:`RelayItem.handover`)."""
    origin_node: bytes | None = None


class RelayQueueLimits(msgspec.Struct, frozen=True):
    max_per_hop: int = 10_000
    """Envelopes held toward one next hop."""
    max_per_source: int = 2_000
    """Envelopes held that one neighbour handed us: it cannot fill the queue of others.
    Mail this node's own users send counts with this node as its source."""
    max_per_origin: int = 1_000
    """Envelopes held from one sending user (declared origin) of one source: one local
    user flooding remote users fills its own share, not the whole source limit that
    every other local user's remote DMs need too. Half the source limit: a user's
    burst of 1,000 DMs while the next hop is away still fits (the relay kill -9 test)."""

    def __post_init__(self) -> None:
        if min(self.max_per_hop, self.max_per_source, self.max_per_origin) < 1:
            raise ConfigError("relay queue limits must be >= 1")


def relay_accept(
    store: Store,
    items: Sequence[RelayItem],
    now_ms: int,
    limits: RelayQueueLimits,
    *,
    proven: bool = False,
) -> list[AcceptOutcome]:
    """Take custody of ``items`` in one transaction; one outcome per item, in order.

    Idempotent on msg_id: an id already queued or relayed before (and not yet
    expired) is ``duplicate`` and stored no second time -- except a hand-over copy
    meeting a delivered tombstone, once (:func:`~qpc_node.store.held.handover_passes`):
    the mail was delivered to the recipient's old home, which now moves it on.

    ``proven``: the items entered the federation here, and each origin is the user
    who proved that key on its session. Then, as for a local send
    (:func:`~qpc_node.store.mailbox.note_sent`), each origin accepts mail from the
    recipients it sent to -- in the same transaction -- or a user's remote contacts
    would stay strangers to its mailbox.
    """
    with transaction(store.conn) as conn:
        return _accept(conn, items, now_ms, limits, proven=proven)


class AcceptCall(msgspec.Struct, frozen=True):
    """One :func:`relay_accept` call's arguments, for :func:`relay_accept_many`."""

    items: Sequence[RelayItem]
    now_ms: int
    proven: bool = False


def relay_accept_many(
    store: Store, calls: Sequence[AcceptCall], limits: RelayQueueLimits
) -> list[list[AcceptOutcome]]:
    """Several :func:`relay_accept` calls in one transaction (one commit, one fsync),
    in order: each sees what the earlier ones queued (the same caps and seen-set as
    one call after another). A database error rolls all of them back and propagates:
    none was taken.
    """
    with transaction(store.conn) as conn:
        return [_accept(conn, c.items, c.now_ms, limits, proven=c.proven) for c in calls]


def _accept(
    conn: sqlite3.Connection,
    items: Sequence[RelayItem],
    now_ms: int,
    limits: RelayQueueLimits,
    *,
    proven: bool,
) -> list[AcceptOutcome]:
    out: list[AcceptOutcome] = []
    hop_depth: dict[bytes, int] = {}
    src_depth: dict[bytes, int] = {}
    origin_depth: dict[tuple[bytes, bytes], int] = {}
    noted: set[tuple[bytes, bytes]] = set()
    for item in items:
        env = item.envelope
        seen = conn.execute("SELECT 1 FROM relay_seen WHERE msg_id = ?", (env.msg_id,)).fetchone()
        if seen is not None and not (
            item.handover and handover_passes(conn, env.msg_id, item.home)
        ):
            out.append("duplicate")
            continue
        if item.next_hop not in hop_depth:
            hop_depth[item.next_hop] = conn.execute(
                "SELECT count(*) FROM relay_queue WHERE next_hop = ?", (item.next_hop,)
            ).fetchone()[0]
        if item.from_node not in src_depth:
            src_depth[item.from_node] = conn.execute(
                "SELECT count(*) FROM relay_queue WHERE from_node = ?", (item.from_node,)
            ).fetchone()[0]
        if hop_depth[item.next_hop] >= limits.max_per_hop:
            out.append("hop_full")
            continue
        if src_depth[item.from_node] >= limits.max_per_source:
            out.append("source_full")
            continue
        key = (item.from_node, item.origin) if item.origin is not None else None
        if key is not None:
            if key not in origin_depth:
                origin_depth[key] = conn.execute(
                    "SELECT count(*) FROM relay_queue WHERE from_node = ? AND origin = ?",
                    key,
                ).fetchone()[0]
            if origin_depth[key] >= limits.max_per_origin:
                out.append("origin_full")
                continue
            origin_depth[key] += 1
        conn.execute(
            "INSERT INTO relay_queue (next_hop, from_node, origin, origin_node, msg_id,"
            " recipient, expiry_ms, hop_limit, ciphertext, enqueued_ms, handover)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item.next_hop,
                item.from_node,
                item.origin,
                item.origin_node,
                env.msg_id,
                env.recipient,
                env.expiry_ms,
                env.hop_limit,
                env.ciphertext,
                now_ms,
                int(item.handover),
            ),
        )
        # A neighbour's: its receipt goes back there (store/held.py).
        peer = None if proven else item.from_node
        if seen is not None:  # a hand-over through a delivered tombstone (checked above)
            handover_reopen(conn, env.msg_id, peer)
        else:
            seen_add(conn, env.msg_id, env.expiry_ms, peer, handover=item.handover)
        hop_depth[item.next_hop] += 1
        src_depth[item.from_node] += 1
        out.append("queued")
        if proven and item.origin is not None and (item.origin, env.recipient) not in noted:
            noted.add((item.origin, env.recipient))  # once per pair: same now, same row
            note_sent(conn, item.origin, (env.recipient,), now_ms)
    return out


def relay_due(
    store: Store,
    next_hop: bytes,
    now_ms: int,
    limit: int,
    *,
    skip: Collection[int] = (),
) -> list[QueuedRelay]:
    """The oldest envelopes toward ``next_hop`` whose retry time has come.

    ``skip``: row ids to leave out (batches still in flight toward the hop: each row
    is in one batch at a time). They are read and dropped here rather than listed in
    the SQL (a few hundred ids at most; no bound-parameter limit to mind).
    """
    rows = store.conn.execute(
        "SELECT id, msg_id, recipient, expiry_ms, hop_limit, ciphertext, attempts, origin,"
        " handover, origin_node FROM relay_queue WHERE next_hop = ? AND next_attempt_ms <= ? AND expiry_ms > ?"
        " ORDER BY id LIMIT ?",
        (next_hop, now_ms, now_ms, limit + len(skip)),
    ).fetchall()
    if skip:
        rows = [r for r in rows if r[0] not in skip][:limit]
    return [
        QueuedRelay(
            r[0],
            next_hop,
            Envelope(bytes(r[1]), bytes(r[2]), r[3], r[4], bytes(r[5])),
            r[6],
            None if r[7] is None else bytes(r[7]),
            bool(r[8]),
            None if r[9] is None else bytes(r[9]),
        )
        for r in rows
    ]


class Handover(msgspec.Struct, frozen=True):
    """What :func:`relay_handover` did with one user's mailbox."""

    moved: int
    """Messages now in custody toward the new home (and gone from the mailbox)."""
    already: int
    """Messages whose msg_id this node had already relayed: dropped from the mailbox only."""
    left: int
    """Unacked messages still in the mailbox (the custody queue toward the hop is full,
    or more than one call moves): call again."""


def relay_handover(
    store: Store,
    recipient: bytes,
    next_hop: bytes,
    from_node: bytes,
    now_ms: int,
    limits: RelayQueueLimits,
    *,
    max_rows: int = 256,
) -> Handover:
    """Move ``recipient``'s unacked mail from its mailbox here into custody toward
    ``next_hop``: the user re-homed elsewhere and this node is its old home.

    One transaction: each message leaves the mailbox (as an ack does: a tombstone keeps
    its msg_id, the fairness counters are released) in the same commit that queues it,
    so a crash leaves it in one place or the other, never neither; a retry moves only
    what is still there. Idempotent on msg_id like :func:`relay_accept` (the relay
    seen-set); the new home's mailbox de-duplicates on its side. The origin declared
    with each is the sender's as the mailbox kept it (stranger mail), else unknown.
    Only the per-hop bound applies: this is mail the node already holds, not new load.
    """
    with store.write() as conn:  # reclaims acked rows first: only unacked mail is left
        room = (
            limits.max_per_hop
            - conn.execute(
                "SELECT count(*) FROM relay_queue WHERE next_hop = ?", (next_hop,)
            ).fetchone()[0]
        )
        rows = conn.execute(
            "SELECT id, seq, msg_id, expiry_ms, hop_limit, sender, ciphertext, seg, off, size"
            " FROM messages WHERE recipient = ? AND expiry_ms > ? ORDER BY seq LIMIT ?",
            (recipient, now_ms, max(0, min(room, max_rows))),
        ).fetchall()
        moved = already = 0
        for _id, _seq, msg_id, expiry_ms, hop_limit, tag, *stored in rows:
            ciphertext = payload_of(store.payloads, *stored)
            seen = conn.execute("SELECT 1 FROM relay_seen WHERE msg_id = ?", (msg_id,)).fetchone()
            if seen is not None:
                already += 1
                continue
            origin = None if tag is None else bytes(tag)[-32:]
            if origin == bytes(32):  # the stranger key of an undeclared relayed origin
                origin = None
            conn.execute(
                "INSERT INTO relay_queue (next_hop, from_node, origin, msg_id, recipient,"
                " expiry_ms, hop_limit, ciphertext, enqueued_ms, handover)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    next_hop,
                    from_node,
                    origin,
                    msg_id,
                    recipient,
                    expiry_ms,
                    hop_limit,
                    ciphertext,
                    now_ms,
                ),
            )
            conn.execute(
                "INSERT INTO relay_seen (msg_id, expiry_ms, handover) VALUES (?, ?, 1)",
                (msg_id, expiry_ms),
            )
            moved += 1
        release_to_custody(conn, recipient, [int(r[1]) for r in rows], store.tombstones)
        left = conn.execute(
            "SELECT count(*) FROM messages WHERE recipient = ? AND expiry_ms > ?",
            (recipient, now_ms),
        ).fetchone()[0]
    return Handover(moved, already, int(left))


def mailboxes_with_mail(store: Store) -> set[bytes]:
    """Recipients with unacked messages here (expired ones count until the sweep): the
    only users a hand-over can concern. O(mailboxes), not O(messages)."""
    return {
        bytes(r[0]) for r in store.conn.execute("SELECT recipient FROM mailboxes WHERE depth > 0")
    }


def mailbox_has_mail(store: Store, recipient: bytes, now_ms: int) -> bool:
    """Does ``recipient`` have unacked, unexpired mail here (a hand-over to do)?"""
    row = store.conn.execute(
        "SELECT 1 FROM messages WHERE recipient = ?"
        " AND expiry_ms > ? AND seq > (SELECT acked_seq FROM mailboxes WHERE recipient = ?)"
        " LIMIT 1",
        (recipient, now_ms, recipient),
    ).fetchone()
    return row is not None


def relay_next_attempt(store: Store, next_hop: bytes, now_ms: int) -> int | None:
    """When the earliest unexpired envelope toward ``next_hop`` may be tried (None: empty)."""
    row = store.conn.execute(
        "SELECT min(next_attempt_ms) FROM relay_queue WHERE next_hop = ? AND expiry_ms > ?",
        (next_hop, now_ms),
    ).fetchone()
    return None if row[0] is None else int(row[0])


def relay_done(store: Store, rows: Sequence[RowRef]) -> int:
    """The next hop acknowledged (or finally refused) these: custody ends here."""
    if not rows:
        return 0
    with transaction(store.conn) as conn:
        cur = conn.executemany("DELETE FROM relay_queue WHERE id = ? AND msg_id = ?", rows)
        return cur.rowcount  # executemany: the rows deleted by all statements together


def relay_done_many(store: Store, groups: Sequence[Sequence[RowRef]]) -> list[int]:
    """:func:`relay_done` for several callers in one transaction: rows deleted per group."""
    with transaction(store.conn) as conn:
        return [
            conn.executemany("DELETE FROM relay_queue WHERE id = ? AND msg_id = ?", rows).rowcount
            if rows
            else 0
            for rows in groups
        ]


def relay_retry_later(store: Store, retries: Sequence[tuple[int, bytes, int]]) -> None:
    """``(id, msg_id, at_ms)``: the next hop could not take these yet; try each again at
    its time."""
    if not retries:
        return
    with transaction(store.conn) as conn:
        conn.executemany(
            "UPDATE relay_queue SET attempts = attempts + 1, next_attempt_ms = ?"
            " WHERE id = ? AND msg_id = ?",
            [(at_ms, i, m) for i, m, at_ms in retries],
        )


def relay_hops(store: Store) -> dict[bytes, int]:
    """Next hop -> envelopes held for it (what a restart must drain)."""
    return {
        bytes(r[0]): int(r[1])
        for r in store.conn.execute("SELECT next_hop, count(*) FROM relay_queue GROUP BY next_hop")
    }


def relay_expire(store: Store, now_ms: int, *, max_rows: int = 10_000) -> tuple[int, int]:
    """Drop expired custody (never delivered: counted by the caller) and old seen-marks."""
    with transaction(store.conn) as conn:
        q = conn.execute(
            "DELETE FROM relay_queue WHERE id IN"
            " (SELECT id FROM relay_queue WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, max_rows),
        ).rowcount
        s = conn.execute(
            "DELETE FROM relay_seen WHERE msg_id IN"
            " (SELECT msg_id FROM relay_seen WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, max_rows),
        ).rowcount
    return q, s
