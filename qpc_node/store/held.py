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
  until the envelope's expiry as a tombstone, so a late copy is a duplicate; and
  ``peer``: the node the envelope came from, where its receipt goes back to.
- ``relay_trail``: per msg_id, further peers a receipt goes to (carriers a spray
  copy went to), until the envelope's expiry.
- ``relay_seen.handover`` (v13): a hand-over copy of msg_id (a re-homed user's old
  home moved it toward the new home) passed here; see :func:`handover_passes`.

Flash writes: every envelope this node relays or holds writes its seen row anyway,
so the receipt's way back rides in it (a trail row and its index entry of their
own cost two more B-tree pages per envelope at one commit each);
bench/held_io_bench.py measures the bytes written per held envelope.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from google.protobuf.message import DecodeError

from qpc_node.errors import RemoteProtocolError
from qpc_node.store import audit
from qpc_node.store.records import AuditEvent, Envelope, RowRef
from qpc_node.store.sql import transaction
from qpc_node.store.store import Store
from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.held import (
    EVICTION_ORDER_SQL,
    EvictReason,
    HeldMeta,
    HoldPolicy,
    reason,
    victim,
)
from qpc_node.wire.gen.qpc.v1 import federation_pb2

HoldOutcome = Literal["held", "duplicate", "full"]
AUDIT_EVICT = "storefwd.evict"


class HoldItem(msgspec.Struct, frozen=True):
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
    handover: bool = False
    """A hand-over copy (see :func:`handover_passes`; kept as ``relay_seen.handover``,
    so its release forwards it as one)."""
    home: bytes | None = None
    """The recipient's home in this node's bindings (None: unknown), for
    :func:`handover_passes`."""


class Eviction(msgspec.Struct, frozen=True):
    msg_id: bytes
    origin_node: bytes
    reason: EvictReason


class HoldResult(msgspec.Struct, frozen=True):
    outcomes: list[HoldOutcome]
    evicted: list[Eviction]


class HeldRow(msgspec.Struct, frozen=True):
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
        seen = conn.execute("SELECT 1 FROM relay_seen WHERE msg_id = ?", (env.msg_id,)).fetchone()
        if seen is not None and not (
            item.handover and handover_passes(conn, env.msg_id, item.home)
        ):
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
        row_id = conn.execute(
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
        ).lastrowid
        peer = item.from_node if item.trail else None
        if seen is not None:  # a hand-over through a delivered tombstone (checked above)
            handover_reopen(conn, env.msg_id, peer, held=row_id)
        else:
            seen_add(conn, env.msg_id, env.expiry_ms, peer, held=row_id, handover=item.handover)
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


def seen_add(
    conn: sqlite3.Connection,
    msg_id: bytes,
    expiry_ms: int,
    peer: bytes | None,
    *,
    held: int | None = None,
    handover: bool = False,
) -> None:
    """Mark ``msg_id`` seen here until ``expiry_ms``; its receipt goes back to
    ``peer`` (it gave us the envelope; None: it entered here); ``held``: its
    held row; ``handover``: it is a hand-over copy (:func:`handover_passes`). In a
    transaction (store/federation.py's custody accept calls it too)."""
    conn.execute(
        "INSERT INTO relay_seen (msg_id, expiry_ms, peer, held, handover) VALUES (?, ?, ?, ?, ?)",
        (msg_id, expiry_ms, peer, held, int(handover)),
    )


def handover_passes(conn: sqlite3.Connection, msg_id: bytes, home: bytes | None) -> bool:
    """May a hand-over copy of ``msg_id`` pass this node although it was seen here?

    A re-homed user's old home hands its unread mail over toward the new home
    (store/federation.py relay_handover); a relay on the old path may keep a
    delivered tombstone of the same msg_id from the old home's receipt, and refusing
    the hand-over as a duplicate lost that mail for good (the old home counts a
    duplicate as taken). It passes only when the tombstone is a delivered one and
    nothing else of msg_id is here, no hand-over of it passed before (a replay is a
    duplicate), and the recipient's home now (``home``, from this node's bindings)
    is not the node whose receipt made the tombstone: a node cannot claim a
    hand-over to replay mail to a user who stayed where it was delivered. A
    tombstone without its receipt cannot show that: a duplicate, as before."""
    row = conn.execute(
        "SELECT delivered, handover, receipt FROM relay_seen WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    if row is None or not row[0] or row[1] or row[2] is None or home is None:
        return False
    if _held_row_of(conn, msg_id) is not None:
        return False
    if conn.execute("SELECT 1 FROM relay_queue WHERE msg_id = ?", (msg_id,)).fetchone():
        return False
    try:
        signer = rc.from_proto(federation_pb2.DeliveryReceipt.FromString(bytes(row[2])))
    except (DecodeError, RemoteProtocolError):
        return False
    return signer.home_node != home


def handover_reopen(
    conn: sqlite3.Connection, msg_id: bytes, peer: bytes | None, *, held: int | None = None
) -> None:
    """A hand-over copy passed a delivered tombstone (:func:`handover_passes`): the
    seen row is open again, as for a copy in custody here. The new home's receipt
    goes back to ``peer`` and closes it; the old receipt (of the old home) is
    dropped with it. ``handover`` stays set until expiry: it passes once."""
    conn.execute(
        "UPDATE relay_seen SET delivered = 0, handover = 1, peer = ?, held = ?, receipt = NULL"
        " WHERE msg_id = ?",
        (peer, held, msg_id),
    )


def _held_row_of(conn: sqlite3.Connection, msg_id: bytes) -> Any:
    """``(id, expiry_ms)`` of ``msg_id``'s held row, or None: through the seen
    row's pointer (held has no msg_id index), checked against msg_id."""
    return conn.execute(
        "SELECT h.id, h.expiry_ms FROM relay_seen s JOIN held h ON h.id = s.held"
        " AND h.msg_id = s.msg_id WHERE s.msg_id = ?",
        (msg_id,),
    ).fetchone()


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


class Released(msgspec.Struct, frozen=True):
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
    wait for another route, a re-route, or expiry). A hand-over copy
    (``relay_seen.handover``) goes on as one."""
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
                " recipient, expiry_ms, hop_limit, ciphertext, enqueued_ms, handover)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, coalesce((SELECT handover FROM"
                " relay_seen WHERE msg_id = ?), 0))",
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
                    e.msg_id,
                ),
            )
            moved += 1
        left = conn.execute(
            "SELECT count(*) FROM held WHERE recipient = ? AND expiry_ms > ? AND from_node != ?",
            (recipient, now_ms, next_hop),
        ).fetchone()[0]
    return Released(moved, dropped, int(left))


def held_drop(store: Store, rows: Sequence[RowRef]) -> int:
    """Held rows now stored elsewhere (the local mailbox took them); ``(id, msg_id)``
    as read before the store call (:data:`~qpc_node.store.federation.RowRef`)."""
    with transaction(store.conn) as conn:
        return conn.executemany("DELETE FROM held WHERE id = ? AND msg_id = ?", rows).rowcount


def held_expire(store: Store, now_ms: int, *, max_rows: int = 10_000) -> int:
    """Drop held envelopes that expired (never delivered: counted by the caller) and
    trail rows past their expiry."""
    with transaction(store.conn) as conn:
        # A seek per origin node on held_by_origin_node (origin_node, expiry_ms):
        # the walk visits each distinct origin node once (a mesh has at most a few
        # thousand), so no index of its own on expiry_ms is written per envelope.
        n = conn.execute(
            "DELETE FROM held WHERE id IN (WITH RECURSIVE nodes(n) AS"
            " (SELECT min(origin_node) FROM held UNION ALL SELECT (SELECT min(origin_node)"
            " FROM held WHERE origin_node > n) FROM nodes WHERE n IS NOT NULL)"
            " SELECT h.id FROM nodes JOIN held h ON h.origin_node = nodes.n"
            " AND h.expiry_ms <= ? LIMIT ?)",
            (now_ms, max_rows),
        ).rowcount
        conn.execute(
            "DELETE FROM relay_trail WHERE (msg_id, peer) IN"
            " (SELECT msg_id, peer FROM relay_trail WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, max_rows),
        )
    return int(n)


# --------------------------------------------------------------------------- receipts


class ReceiptApplied(msgspec.Struct, frozen=True):
    known: bool
    """This node handled msg_id (held, queued or relayed it, tombstone or not)."""
    already: bool
    """A receipt for it was applied before: nothing more to do or forward."""
    peers: tuple[bytes, ...]
    """Where to forward it: the trail, without the peer it came from."""
    purged_held: int
    purged_queued: dict[bytes, int]
    """Custody rows deleted, per next hop."""


def apply_receipt(
    store: Store, msg_id: bytes, from_peer: bytes | None, receipt: bytes | None = None
) -> ReceiptApplied:
    """A verified receipt for ``msg_id``: purge held and queued replicas, mark the
    seen-row delivered (the tombstone until expiry), in one transaction. ``receipt``
    (the encoded DeliveryReceipt) is kept with the tombstone for the inventory sync."""
    return apply_receipts(store, [(msg_id, from_peer, receipt)])[0]


def apply_receipts(
    store: Store, receipts: Sequence[tuple[bytes, bytes | None, bytes | None]]
) -> list[ReceiptApplied]:
    """:func:`apply_receipt` for each ``(msg_id, from_peer, receipt)``, in order, in one
    transaction: a neighbour's Receipt call carries up to ``MAX_RECEIPTS``, and
    one commit each rewrote the same seen-table pages once per receipt (flash
    writes). The call is still answered after its commit, so a neighbour drops
    from its outbox only receipts applied here."""
    with transaction(store.conn) as conn:
        return [_apply_receipt(conn, m, p, r) for m, p, r in receipts]


def _apply_receipt(
    conn: sqlite3.Connection, msg_id: bytes, from_peer: bytes | None, receipt: bytes | None
) -> ReceiptApplied:
    seen = conn.execute(
        "SELECT expiry_ms, delivered, peer FROM relay_seen WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    one = _held_row_of(conn, msg_id)
    held = [] if one is None else [one]
    queued = conn.execute(
        "SELECT id, next_hop, expiry_ms FROM relay_queue WHERE msg_id = ?", (msg_id,)
    ).fetchall()
    if seen is None and not held and not queued:
        return ReceiptApplied(False, False, (), 0, {})
    if seen is not None and seen[1]:
        if receipt is not None:
            conn.execute(
                "UPDATE relay_seen SET receipt = ? WHERE msg_id = ? AND receipt IS NULL",
                (receipt, msg_id),
            )
        return ReceiptApplied(True, True, (), 0, {})
    expiry = seen[0] if seen is not None else (held or queued)[0][-1]
    for r in held:
        conn.execute("DELETE FROM held WHERE id = ?", (r[0],))
    per_hop: Counter[bytes] = Counter()
    for r in queued:
        conn.execute("DELETE FROM relay_queue WHERE id = ?", (r[0],))
        per_hop[bytes(r[1])] += 1
    conn.execute(
        "INSERT INTO relay_seen (msg_id, expiry_ms, delivered, receipt) VALUES (?, ?, 1, ?)"
        " ON CONFLICT(msg_id) DO UPDATE SET delivered = 1,"
        " receipt = coalesce(excluded.receipt, relay_seen.receipt)",
        (msg_id, expiry, receipt),
    )
    trail = [] if seen is None or seen[2] is None else [bytes(seen[2])]
    trail += (
        bytes(r[0])
        for r in conn.execute("SELECT peer FROM relay_trail WHERE msg_id = ?", (msg_id,))
    )
    peers = tuple(p for p in dict.fromkeys(trail) if from_peer is None or p != from_peer)
    return ReceiptApplied(True, False, peers, len(held), dict(per_hop))


def delivered(store: Store, msg_id: bytes) -> bool:
    """Is there a receipt tombstone for ``msg_id``?"""
    row = store.conn.execute(
        "SELECT delivered FROM relay_seen WHERE msg_id = ?", (msg_id,)
    ).fetchone()
    return row is not None and bool(row[0])


# --------------------------------------------------------------------------- sync


class SyncInventory(msgspec.Struct, frozen=True):
    """What scope 2 of the inventory sync reconciles, within expiry."""

    held: list[tuple[int, bytes]]
    """(expiry_ms, msg_id) of held envelopes."""
    receipts: list[tuple[int, bytes]]
    """(expiry_ms, msg_id) of receipt tombstones whose signed receipt is kept."""


def sync_inventory(store: Store, now_ms: int) -> SyncInventory:
    conn = store.conn
    held = conn.execute(
        "SELECT expiry_ms, msg_id FROM held WHERE expiry_ms > ? ORDER BY expiry_ms", (now_ms,)
    ).fetchall()
    rec = conn.execute(
        "SELECT expiry_ms, msg_id FROM relay_seen WHERE delivered = 1 AND receipt IS NOT NULL"
        " AND expiry_ms > ? ORDER BY expiry_ms",
        (now_ms,),
    ).fetchall()
    return SyncInventory(
        [(int(e), bytes(m)) for e, m in held], [(int(e), bytes(m)) for e, m in rec]
    )


def held_for_sync(
    store: Store, msg_ids: Sequence[bytes], peer: bytes, now_ms: int
) -> list[HeldRow]:
    """Held envelopes among ``msg_ids``, unexpired, with a hop left, that neither came
    from ``peer`` nor went to it (not on their trail), by expiry."""
    out: list[HeldRow] = []
    for mid in msg_ids:
        # through the seen row's pointer: held has no msg_id index (flash writes)
        r = store.conn.execute(
            f"SELECT {_COLS} FROM held WHERE id = (SELECT s.held FROM relay_seen s"
            " WHERE s.msg_id = :mid) AND msg_id = :mid AND expiry_ms > :now AND hop_limit > 0"
            " AND from_node != :peer AND NOT EXISTS (SELECT 1 FROM relay_trail t"
            " WHERE t.msg_id = held.msg_id AND t.peer = :peer)",
            {"mid": mid, "now": now_ms, "peer": peer},
        ).fetchone()
        if r is not None:
            out.append(_row(r))
    out.sort(key=lambda h: (h.envelope.expiry_ms, h.id))
    return out


def receipts_for_sync(
    store: Store, msg_ids: Sequence[bytes], now_ms: int
) -> list[tuple[int, bytes]]:
    """(expiry_ms, encoded DeliveryReceipt) of the tombstones among ``msg_ids``."""
    out: list[tuple[int, bytes]] = []
    for mid in msg_ids:
        r = store.conn.execute(
            "SELECT expiry_ms, receipt FROM relay_seen WHERE msg_id = ? AND delivered = 1"
            " AND receipt IS NOT NULL AND expiry_ms > ?",
            (mid, now_ms),
        ).fetchone()
        if r is not None:
            out.append((int(r[0]), bytes(r[1])))
    out.sort()
    return out


def remember_receipt(store: Store, msg_id: bytes, expiry_ms: int, receipt: bytes) -> bool:
    """A verified receipt for a msg_id this node never handled (the sync brought it):
    keep the tombstone (a later copy is a duplicate) and the receipt. False if the
    msg_id is known here (``apply_receipt`` is the path for those)."""
    with transaction(store.conn) as conn:
        cur = conn.execute(
            "INSERT INTO relay_seen (msg_id, expiry_ms, delivered, receipt) VALUES (?, ?, 1, ?)"
            " ON CONFLICT(msg_id) DO NOTHING",
            (msg_id, expiry_ms, receipt),
        )
        return cur.rowcount == 1


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
            f"SELECT {_COLS} FROM held WHERE tokens >= 2 AND held_ms <= :before"
            " AND expiry_ms > :now AND hop_limit > 0 AND NOT EXISTS (SELECT 1 FROM relay_seen s"
            " WHERE s.msg_id = held.msg_id AND s.peer = :carrier) AND NOT EXISTS (SELECT 1"
            " FROM relay_trail t WHERE t.msg_id = held.msg_id AND t.peer = :carrier)"
            " ORDER BY id LIMIT :limit",
            {"before": now_ms - delay_ms, "now": now_ms, "carrier": carrier, "limit": limit},
        )
    ]


def spray_done(store: Store, carrier: bytes, sprayed: Sequence[tuple[HeldRow, int]]) -> None:
    """``(row, tokens kept)``: the carrier took a copy; receipts go to it too."""
    with transaction(store.conn) as conn:
        for h, kept in sprayed:
            conn.execute(
                "UPDATE held SET tokens = ? WHERE id = ? AND msg_id = ?",
                (kept, h.id, h.envelope.msg_id),
            )
            _trail(conn, h.envelope.msg_id, carrier, h.envelope.expiry_ms)


# --------------------------------------------------------------------------- re-route


class CustodyRow(msgspec.Struct, frozen=True):
    id: int
    recipient: bytes
    hop_limit: int
    msg_id: bytes


def custody_toward(store: Store, hop: bytes, limit: int = 1024) -> list[CustodyRow]:
    """Custody rows bound to ``hop`` (what a re-route looks at)."""
    return [
        CustodyRow(int(r[0]), bytes(r[1]), int(r[2]), bytes(r[3]))
        for r in store.conn.execute(
            "SELECT id, recipient, hop_limit, msg_id FROM relay_queue WHERE next_hop = ? ORDER BY id"
            " LIMIT ?",
            (hop, limit),
        )
    ]


def reroute(
    store: Store,
    moves: Sequence[tuple[RowRef, bytes]],
    to_held: Sequence[RowRef],
    now_ms: int,
    tokens: int,
) -> tuple[int, int]:
    """Custody rows go to another next hop (``((id, msg_id), hop)``) or back to ``held``
    (``hop_limit`` restored: the decrement is redone when it is released), in one
    transaction. Rows already gone (taken meanwhile) are skipped. Returns
    (moved, held)."""
    moved = held = 0
    with transaction(store.conn) as conn:
        for (row_id, msg_id), hop in moves:
            moved += conn.execute(
                "UPDATE relay_queue SET next_hop = ?, attempts = 0, next_attempt_ms = 0"
                " WHERE id = ? AND msg_id = ?",
                (hop, row_id, msg_id),
            ).rowcount
        for row_id, msg_id in to_held:
            r = conn.execute(
                "SELECT msg_id, recipient, expiry_ms, hop_limit, ciphertext, origin,"
                " coalesce(origin_node, from_node), from_node FROM relay_queue"
                " WHERE id = ? AND msg_id = ?",
                (row_id, msg_id),
            ).fetchone()
            if r is None:
                continue
            conn.execute("DELETE FROM relay_queue WHERE id = ?", (row_id,))
            held += 1
            if _held_row_of(conn, r[0]) is not None:
                continue  # held already (one row per msg_id)
            new_id = conn.execute(
                "INSERT INTO held (msg_id, recipient, expiry_ms, hop_limit, ciphertext, origin,"
                " origin_node, from_node, tokens, held_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r[0], r[1], r[2], r[3] + 1, r[4], r[5], r[6], r[7], tokens, now_ms),
            ).lastrowid
            # Its seen row points at it (custody always wrote one; made if not).
            conn.execute(
                "INSERT INTO relay_seen (msg_id, expiry_ms, held) VALUES (?, ?, ?)"
                " ON CONFLICT(msg_id) DO UPDATE SET held = excluded.held",
                (r[0], r[2], new_id),
            )
    return moved, held
