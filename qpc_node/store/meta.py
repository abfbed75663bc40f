"""A small key/value table for node state (node id, last sweep, feature flags...).

Values are bytes so callers pick their own encoding (msgspec for structured state).
"""

from __future__ import annotations

import sqlite3

from qpc_node.store.errors import InvalidRecord

MAX_KEY_LEN = 128


def get(conn: sqlite3.Connection, key: str) -> bytes | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def put(conn: sqlite3.Connection, key: str, value: bytes) -> None:
    if not key or len(key) > MAX_KEY_LEN:
        raise InvalidRecord(f"meta key must be 1..{MAX_KEY_LEN} chars")
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def delete(conn: sqlite3.Connection, key: str) -> bool:
    return conn.execute("DELETE FROM meta WHERE key = ?", (key,)).rowcount > 0
