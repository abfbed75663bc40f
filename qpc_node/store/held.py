"""Store-and-forward state in the node's SQLite file: held envelopes, receipt
tombstones, the trail receipts travel back along (schema v10).

Plain functions over a :class:`~qpc_node.store.store.Store` (or a connection in
a transaction), run on the store's worker thread. Policy (quotas, eviction
order, expiry cap, spray split) comes from :mod:`qpc_node.storefwd.held`; this
module only applies it. Every change that moves an envelope between tables is
one transaction: a crash leaves it in one place or the other, never neither.

Tables:

- ``held``: envelopes this node has no route for; ``hop_limit`` as they arrived
  (holding costs no hop); ``id`` is arrival order, which release keeps.
- ``relay_seen`` (v5) gets ``delivered``: a verified receipt came; the row stays
  until the envelope's expiry as a tombstone, so a late copy is a duplicate.
- ``relay_trail``: per msg_id, the peers a receipt must go back to (the node it
  came from, and carriers a spray copy went to), until the envelope's expiry.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qpc_node.store import audit
from qpc_node.store.records import AuditEvent, Envelope
from qpc_node.store.sql import transaction
from qpc_node.store.store import Store
from qpc_node.storefwd.held import (
    EVICTION_ORDER_SQL,
    EvictReason,
    HeldMeta,
    HoldPolicy,
    reason,
    victim,
)

HoldOutcome = Literal["held", "duplicate", "full"]
AUDIT_EVICT = "storefwd.evict"


@dataclass(frozen=True, slots=True)
class HoldItem:
    """An envelope to hold: ``hop_limit`` as it arrived here (not decremented)."""

    envelope: Envelope
    origin: bytes | None
    """The sending user's fingerprint as declared (see RelayItem.origin)."""
    origin_node: bytes
    """Where it entered the federation (the quota key)."""
    from_node: bytes
    tokens: int
    trail: bool = True
    """Record ``from_node`` as where its receipt goes (False: it entered here)."""


@dataclass(frozen=True, slots=True)
class Eviction:
    msg_id: bytes
    origin_node: bytes
    reason: EvictReason


@dataclass(frozen=True, slots=True)
class HoldResult:
    outcomes: list[HoldOutcome]
    evicted: list[Eviction]


@dataclass(frozen=True, slots=True)
class HeldRow:
    id: int
    envelope: Envelope
    origin: bytes | None
    origin_node: bytes
    from_node: bytes
    tokens: int
    held_ms: int


_COLS = (
    "id, msg_id, recipient, expiry_ms, hop_limit, ciphertext, origin, origin_node,"
    " from_node, tokens, held_ms"
)


def _row(r: Any) -> HeldRow:
    return HeldRow(
        int(r[0]),
        Envelope(bytes(r[1]), bytes(r[2]), int(r[3]), int(r[4]), bytes(r[5])),
        None if r[6] is None else bytes(r[6]),
        bytes(r[7]),
        bytes(r[8]),
        int(r[9]),
        int(r[10]),
    )


def hold_many(
    store: Store, items: Sequence[HoldItem], now_ms: int, policy: HoldPolicy
) -> HoldResult:
    """Hold ``items`` in one transaction (see :func:`hold`)."""
    with transaction(store.conn) as conn:
        return hold(conn, items, now_ms, policy)


def hold(
    conn: sqlite3.Connection, items: Sequence[HoldItem], now_ms: int, policy: HoldPolicy
) -> HoldResult:
    """Hold each item unless its msg_id was seen here (``duplicate``) or its quota
    -- per origin node, then in total -- is full and it ranks worst (``full``);
    a worse held envelope is evicted for it instead (audited, returned). Run in a
    transaction: what is reported ``held`` is durable at its commit."""
    out: list[HoldOutcome] = []
    evicted: list[Eviction] = []
    # Quota depths, read once per call and kept in step (a batch often shares an
    # origin node): no count(*) per envelope.
    total = int(conn.execute("SELECT count(*) FROM held").fetchone()[0])
    per_node: dict[bytes, int] = {}
    for item in items:
        env = item.envelope
        if conn.execute("SELECT 1 FROM relay_seen WHERE msg_id = ?", (env.msg_id,)).fetchone():
            out.append("duplicate")
            continue
        incoming = HeldMeta(None, env.expiry_ms, False, env.hop_limit)
        node = item.origin_node
        if node not in per_node:
            per_node[node] = int(
                conn.execute("SELECT count(*) FROM held WHERE origin_node = ?", (node,)).fetchone()[
                    0
                ]
            )
        full = False
        for where, params, cap in (
            ("WHERE h.origin_node = :node", {"node": node}, policy.held_per_origin),
            ("", {}, policy.max_held),
        ):
            n = per_node[node] if where else total
            if n < cap:
                continue
            row = conn.execute(
                "SELECT h.id, h.expiry_ms, coalesce(s.delivered, 0), h.hop_limit, h.msg_id,"
                " h.origin_node FROM held h LEFT JOIN relay_seen s ON s.msg_id = h.msg_id"
                f" {where} {EVICTION_ORDER_SQL} LIMIT 1",
                {**params, "now": now_ms},
            ).fetchone()
            worst = None if row is None else HeldMeta(int(row[0]), row[1], bool(row[2]), row[3])
            go = victim(worst, incoming, now_ms)
            if go.id is None or row is None:
                full = True
                break
            why = reason(go, now_ms)
            victim_node = bytes(row[5])
            _evict(conn, int(row[0]), bytes(row[4]), victim_node, why, now_ms)
            evicted.append(Eviction(bytes(row[4]), victim_node, why))
            total -= 1
            if victim_node in per_node:
                per_node[victim_node] -= 1
        if full:
            out.append("full")
            continue
        conn.execute(
            "INSERT INTO held (msg_id, recipient, expiry_ms, hop_limit, ciphertext, origin,"
            " origin_node, from_node, tokens, held_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                env.msg_id,
                env.recipient,
                env.expiry_ms,
                env.hop_limit,
                env.ciphertext,
                item.origin,
                item.origin_node,
                item.from_node,
                item.tokens,
                now_ms,
            ),
        )
        conn.execute(
            "INSERT INTO relay_seen (msg_id, expiry_ms) VALUES (?, ?)", (env.msg_id, env.expiry_ms)
        )
        if item.trail:
            _trail(conn, env.msg_id, item.from_node, env.expiry_ms)
        total += 1
        per_node[node] += 1
        out.append("held")
    return HoldResult(out, evicted)


def _evict(
    conn: sqlite3.Connection,
    row_id: int,
    msg_id: bytes,
    origin_node: bytes,
    why: EvictReason,
    now_ms: int,
) -> None:
    conn.execute("DELETE FROM held WHERE id = ?", (row_id,))
    if why is EvictReason.HOPS:
        # Not delivered: forget the id too, so another copy (a retry, a spray) can
        # be held again later instead of being refused as a duplicate.
        conn.execute("DELETE FROM relay_seen WHERE msg_id = ? AND delivered = 0", (msg_id,))
    audit.append(
        conn,
        [
            AuditEvent(
                now_ms,
                AUDIT_EVICT,
                msg_id.hex()[:16],
                {"reason": why.value, "origin_node": origin_node.hex()[:16]},
            )
        ],
    )


def _trail(conn: sqlite3.Connection, msg_id: bytes, peer: bytes, expiry_ms: int) -> None:
    conn.execute(
        "INSERT INTO relay_trail (msg_id, peer, expiry_ms) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (msg_id, peer, expiry_ms),
    )


def trail_add(conn: sqlite3.Connection, msg_id: bytes, peer: bytes, expiry_ms: int) -> None:
    """Receipts for ``msg_id`` go to ``peer`` too (it gave us the envelope). In a
    transaction (store/federation.py's custody accept calls it)."""
    _trail(conn, msg_id, peer, expiry_ms)


def held_recipients(store: Store) -> set[bytes]:
    """Recipients something is held for (what a route change may release)."""
    return {bytes(r[0]) for r in store.conn.execute("SELECT DISTINCT recipient FROM held")}


def held_count(store: Store) -> int:
    return int(store.conn.execute("SELECT count(*) FROM held").fetchone()[0])


def held_for(store: Store, recipient: bytes, now_ms: int, limit: int = 256) -> list[HeldRow]:
    """``recipient``'s unexpired held envelopes, in arrival order."""
    return [
        _row(r)
        for r in store.conn.execute(
            f"SELECT {_COLS} FROM held WHERE recipient = ? AND expiry_ms > ? ORDER BY id LIMIT ?",
            (recipient, now_ms, limit),
        )
    ]


@dataclass(frozen=True, slots=True)
class Released:
    moved: int
    """Now in the custody queue toward the next hop (and gone from ``held``)."""
    hop_limit: int
    """Arrived with hop_limit 0 and the recipient is not here: dropped (counted)."""
    left: int
    """Still held for the recipient (the queue toward the hop is full: call again)."""


def release(
    store: Store,
    recipient: bytes,
    next_hop: bytes,
    now_ms: int,
    *,
    max_per_hop: int,
    max_rows: int = 256,
) -> Released:
    """Move ``recipient``'s held envelopes into custody toward ``next_hop``, in
    arrival order, in one transaction; ``hop_limit`` is decremented now (holding
    cost none). Envelopes that came from ``next_hop`` stay held: it already saw
    the msg_id and would answer DUPLICATE without holding it (known limit: they
    wait for another route, a re-route, or expiry)."""
    with transaction(store.conn) as conn:
        room = (
            max_per_hop
            - conn.execute(
                "SELECT count(*) FROM relay_queue WHERE next_hop = ?", (next_hop,)
            ).fetchone()[0]
        )
        rows = [
            _row(r)
            for r in conn.execute(
                f"SELECT {_COLS} FROM held WHERE recipient = ? AND expiry_ms > ?"
                " AND from_node != ? ORDER BY id LIMIT ?",
                (recipient, now_ms, next_hop, max(0, min(room, max_rows))),
            )
        ]
        moved = dropped = 0
        for h in rows:
            conn.execute("DELETE FROM held WHERE id = ?", (h.id,))
            e = h.envelope
            if e.hop_limit == 0:
                dropped += 1
                continue
            conn.execute(
                "INSERT INTO relay_queue (next_hop, from_node, origin, origin_node, msg_id,"
                " recipient, expiry_ms, hop_limit, ciphertext, enqueued_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    next_hop,
                    h.from_node,
                    h.origin,
                    h.origin_node,
                    e.msg_id,
                    e.recipient,
                    e.expiry_ms,
                    e.hop_limit - 1,
                    e.ciphertext,
                    now_ms,
                ),
            )
            moved += 1
        left = conn.execute(
            "SELECT count(*) FROM held WHERE recipient = ? AND expiry_ms > ? AND from_node != ?",
            (recipient, now_ms, next_hop),
        ).fetchone()[0]
    return Released(moved, dropped, int(left))


def held_drop(store: Store, ids: Sequence[int]) -> int:
    """Held rows now stored elsewhere (the local mailbox took them)."""
    with transaction(store.conn) as conn:
        return conn.executemany("DELETE FROM held WHERE id = ?", [(i,) for i in ids]).rowcount


def held_expire(store: Store, now_ms: int, *, max_rows: int = 10_000) -> int:
    """Drop held envelopes that expired (never delivered: counted by the caller) and
    trail rows past their expiry."""
    with transaction(store.conn) as conn:
        n = conn.execute(
            "DELETE FROM held WHERE id IN (SELECT id FROM held WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, max_rows),
        ).rowcount
        conn.execute(
            "DELETE FROM relay_trail WHERE (msg_id, peer) IN"
            " (SELECT msg_id, peer FROM relay_trail WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, max_rows),
        )
    return int(n)


# --------------------------------------------------------------------------- receipts


@dataclass(frozen=True, slots=True)
class ReceiptApplied:
    known: bool
    """This node handled msg_id (held, queued or relayed it, tombstone or not)."""
    already: bool
    """A receipt for it was applied before: nothing more to do or forward."""
    peers: tuple[bytes, ...]
    """Where to forward it: the trail, without the peer it came from."""
    purged_held: int
    purged_queued: dict[bytes, int]
    """Custody rows deleted, per next hop."""


def apply_receipt(store: Store, msg_id: bytes, from_peer: bytes | None) -> ReceiptApplied:
    """A verified receipt for ``msg_id``: purge held and queued replicas, mark the
    seen-row delivered (the tombstone until expiry), in one transaction."""
    with transaction(store.conn) as conn:
        seen = conn.execute(
            "SELECT expiry_ms, delivered FROM relay_seen WHERE msg_id = ?", (msg_id,)
        ).fetchone()
        held = conn.execute("SELECT id, expiry_ms FROM held WHERE msg_id = ?", (msg_id,)).fetchall()
        queued = conn.execute(
            "SELECT id, next_hop, expiry_ms FROM relay_queue WHERE msg_id = ?", (msg_id,)
        ).fetchall()
        if seen is None and not held and not queued:
            return ReceiptApplied(False, False, (), 0, {})
        if seen is not None and seen[1]:
            return ReceiptApplied(True, True, (), 0, {})
        expiry = seen[0] if seen is not None else (held or queued)[0][-1]
        for r in held:
            conn.execute("DELETE FROM held WHERE id = ?", (r[0],))
        per_hop: Counter[bytes] = Counter()
        for r in queued:
            conn.execute("DELETE FROM relay_queue WHERE id = ?", (r[0],))
            per_hop[bytes(r[1])] += 1
        conn.execute(
            "INSERT INTO relay_seen (msg_id, expiry_ms, delivered) VALUES (?, ?, 1)"
            " ON CONFLICT(msg_id) DO UPDATE SET delivered = 1",
            (msg_id, expiry),
        )
        peers = tuple(
            bytes(r[0])
            for r in conn.execute("SELECT peer FROM relay_trail WHERE msg_id = ?", (msg_id,))
            if from_peer is None or bytes(r[0]) != from_peer
        )
    return ReceiptApplied(True, False, peers, len(held), dict(per_hop))


def delivered(store: Store, msg_id: bytes) -> bool:
    """Is there a receipt tombstone for ``msg_id``?"""
    row = store.conn.execute(
        "SELECT delivered FROM relay_seen WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    return row is not None and bool(row[0])


# --------------------------------------------------------------------------- spray


def spray_candidates(
    store: Store, carrier: bytes, now_ms: int, delay_ms: int, limit: int
) -> list[HeldRow]:
    """Held envelopes a copy of which may go to ``carrier``: 2+ tokens, held for
    ``delay_ms``, unexpired, a hop left, and ``carrier`` not on their trail (it
    gave us the envelope, or has a copy already)."""
    return [
        _row(r)
        for r in store.conn.execute(
            f"SELECT {_COLS} FROM held WHERE tokens >= 2 AND held_ms <= ? AND expiry_ms > ?"
            " AND hop_limit > 0 AND NOT EXISTS (SELECT 1 FROM relay_trail t"
            " WHERE t.msg_id = held.msg_id AND t.peer = ?) ORDER BY id LIMIT ?",
            (now_ms - delay_ms, now_ms, carrier, limit),
        )
    ]


def spray_done(store: Store, carrier: bytes, sprayed: Sequence[tuple[HeldRow, int]]) -> None:
    """``(row, tokens kept)``: the carrier took a copy; receipts go to it too."""
    with transaction(store.conn) as conn:
        for h, kept in sprayed:
            conn.execute("UPDATE held SET tokens = ? WHERE id = ?", (kept, h.id))
            _trail(conn, h.envelope.msg_id, carrier, h.envelope.expiry_ms)


# --------------------------------------------------------------------------- re-route


@dataclass(frozen=True, slots=True)
class CustodyRow:
    id: int
    recipient: bytes
    hop_limit: int


def custody_toward(store: Store, hop: bytes, limit: int = 1024) -> list[CustodyRow]:
    """Custody rows bound to ``hop`` (what a re-route looks at)."""
    return [
        CustodyRow(int(r[0]), bytes(r[1]), int(r[2]))
        for r in store.conn.execute(
            "SELECT id, recipient, hop_limit FROM relay_queue WHERE next_hop = ? ORDER BY id"
            " LIMIT ?",
            (hop, limit),
        )
    ]


def reroute(
    store: Store,
    moves: Sequence[tuple[int, bytes]],
    to_held: Sequence[int],
    now_ms: int,
    tokens: int,
) -> tuple[int, int]:
    """Custody rows go to another next hop (``(id, hop)``) or back to ``held``
    (``hop_limit`` restored: the decrement is redone when it is released), in one
    transaction. Rows already gone (taken meanwhile) are skipped. Returns
    (moved, held)."""
    moved = held = 0
    with transaction(store.conn) as conn:
        for row_id, hop in moves:
            moved += conn.execute(
                "UPDATE relay_queue SET next_hop = ?, attempts = 0, next_attempt_ms = 0"
                " WHERE id = ?",
                (hop, row_id),
            ).rowcount
        for row_id in to_held:
            r = conn.execute(
                "SELECT msg_id, recipient, expiry_ms, hop_limit, ciphertext, origin,"
                " coalesce(origin_node, from_node), from_node FROM relay_queue WHERE id = ?",
                (row_id,),
            ).fetchone()
            if r is None:
                continue
            conn.execute("DELETE FROM relay_queue WHERE id = ?", (row_id,))
            conn.execute(
                "INSERT INTO held (msg_id, recipient, expiry_ms, hop_limit, ciphertext, origin,"
                " origin_node, from_node, tokens, held_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(msg_id) DO NOTHING",
                (r[0], r[1], r[2], r[3] + 1, r[4], r[5], r[6], r[7], tokens, now_ms),
            )
            held += 1
    return moved, held
