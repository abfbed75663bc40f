"""Append-only audit trail with bounded size (rotation by count and by age).

A router's flash is small: the table must not grow without bound, hence ``rotate``
(the node calls it from its periodic sweep). Callers redact before appending: the
subject is a short fingerprint or an address class, never key material.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from qpc_node.store.errors import InvalidRecord
from qpc_node.store.records import AuditEvent, StoredAuditEvent

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode

MAX_KIND_LEN = 64
MAX_SUBJECT_LEN = 256
MAX_DETAIL_BYTES = 4096


def append(conn: sqlite3.Connection, events: Sequence[AuditEvent]) -> int:
    """Insert events; return the id of the last one. Run in a transaction."""
    rows = []
    for index, event in enumerate(events):
        detail = _encode(event.detail)
        if not event.kind or len(event.kind) > MAX_KIND_LEN:
            raise InvalidRecord(f"audit kind must be 1..{MAX_KIND_LEN} chars", index=index)
        if len(event.subject) > MAX_SUBJECT_LEN or len(detail) > MAX_DETAIL_BYTES:
            raise InvalidRecord("audit subject or detail too long", index=index)
        rows.append((event.ts_ms, event.kind, event.subject, detail.decode()))
    last = 0
    for row in rows:
        cursor = conn.execute(
            "INSERT INTO audit (ts_ms, kind, subject, detail) VALUES (?, ?, ?, ?)", row
        )
        last = int(cursor.lastrowid or 0)
    return last


def query(
    conn: sqlite3.Connection,
    *,
    kind: str | None = None,
    subject: str | None = None,
    since_ms: int | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[StoredAuditEvent]:
    """Newest first; page backwards with ``before_id`` = the smallest id seen."""
    if limit < 1:
        raise InvalidRecord("limit must be >= 1")
    clauses: list[str] = []
    params: list[object] = []
    for clause, value in (
        ("kind = ?", kind),
        ("subject = ?", subject),
        ("ts_ms >= ?", since_ms),
        ("id < ?", before_id),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    params.append(limit)
    return [
        StoredAuditEvent(id=row[0], event=AuditEvent(row[1], row[2], row[3], _decode(row[4])))
        for row in conn.execute(
            f"SELECT id, ts_ms, kind, subject, detail FROM audit{where} ORDER BY id DESC LIMIT ?",
            params,
        )
    ]


def rotate(conn: sqlite3.Connection, *, now_ms: int, keep_last: int, max_age_ms: int) -> int:
    """Drop events older than ``max_age_ms`` and all but the newest ``keep_last``."""
    if keep_last < 0 or max_age_ms < 0:
        raise InvalidRecord("keep_last and max_age_ms must be >= 0")
    deleted = conn.execute("DELETE FROM audit WHERE ts_ms < ?", (now_ms - max_age_ms,)).rowcount
    deleted += conn.execute(
        "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (keep_last,),
    ).rowcount
    return deleted
