"""Home bindings on disk: the routing core's user -> home node table survives a restart.

The routing core (mesh/bindings.py) decides which binding is the newest and
verifies signatures; this table only keeps the last accepted binding per user,
as signed bytes, so the next start can offer them to the core again (which
verifies them again: the file is not trusted more than a neighbour). Bounded:
at most ``cap`` rows (the oldest stored go first, as the core's LRU drops them)
and expired rows are deleted when bindings are saved or loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from qpc_node.store.sql import transaction
from qpc_node.store.store import Store

PRUNE_ROWS = 10_000
"""Expired rows deleted per save at most (a save stays one short transaction)."""


class StoredBinding(msgspec.Struct, frozen=True):
    user: bytes
    node: bytes
    expiry_ms: int
    binding: bytes
    """``HomeBinding.encode()``."""


def save_bindings(store: Store, bindings: Sequence[StoredBinding], now_ms: int, *, cap: int) -> int:
    """Upsert ``bindings`` (each the newest for its user), drop expired and over-cap rows
    in one transaction; returns how many rows were dropped."""
    with transaction(store.conn) as conn:
        conn.executemany(
            "INSERT INTO home_bindings (user, node, expiry_ms, stored_ms, binding)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(user) DO UPDATE SET node = excluded.node,"
            " expiry_ms = excluded.expiry_ms, stored_ms = excluded.stored_ms,"
            " binding = excluded.binding",
            [(b.user, b.node, b.expiry_ms, now_ms, b.binding) for b in bindings],
        )
        dropped: int = conn.execute(
            "DELETE FROM home_bindings WHERE user IN"
            " (SELECT user FROM home_bindings WHERE expiry_ms <= ? LIMIT ?)",
            (now_ms, PRUNE_ROWS),
        ).rowcount
        over = conn.execute("SELECT count(*) FROM home_bindings").fetchone()[0] - cap
        if over > 0:
            dropped += conn.execute(
                "DELETE FROM home_bindings WHERE user IN (SELECT user FROM home_bindings"
                " ORDER BY stored_ms, user LIMIT ?)",
                (over,),
            ).rowcount
    return dropped


def load_bindings(store: Store, now_ms: int, *, cap: int) -> list[StoredBinding]:
    """The unexpired bindings, least recently stored first (at most ``cap``: the newest)."""
    with transaction(store.conn) as conn:
        conn.execute("DELETE FROM home_bindings WHERE expiry_ms <= ?", (now_ms,))
        rows = conn.execute(
            "SELECT user, node, expiry_ms, binding FROM home_bindings"
            " ORDER BY stored_ms DESC, user DESC LIMIT ?",
            (cap,),
        ).fetchall()
    return [StoredBinding(bytes(r[0]), bytes(r[1]), int(r[2]), bytes(r[3])) for r in reversed(rows)]


def binding_count(store: Store) -> int:
    return int(store.conn.execute("SELECT count(*) FROM home_bindings").fetchone()[0])
