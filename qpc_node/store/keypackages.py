"""KeyPackage directory: opaque packages per identity, single use, 24 h TTL.

The service has already checked the bytes and the ciphersuite allowlist; here we only
keep them. Normal packages are handed out once (RFC 9420 single use) and deleted in the
same transaction that selects them, so two concurrent fetches can never get the same
one. A last-resort package is kept and handed out only when no normal one is left; a
newer last-resort upload for the same suite replaces the older one.

Uploads are idempotent on the SHA-256 of the bytes: a retried upload does not store a
package twice (which would let it be handed out twice).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence

from qpc_node.store.errors import InvalidRecord, QuotaExceeded
from qpc_node.store.mailbox import check_fingerprint
from qpc_node.store.records import (
    KeyPackageCount,
    KeyPackageRecord,
    KeyPackageUpload,
    StoreLimits,
    SweepResult,
)


def upload(
    conn: sqlite3.Connection,
    identity: bytes,
    packages: Sequence[KeyPackageUpload],
    now_ms: int,
    limits: StoreLimits,
) -> int:
    """Store a batch; return how many were new. All-or-nothing; run in a transaction."""
    check_fingerprint(identity)
    if not packages:
        raise InvalidRecord("empty KeyPackage batch")
    for index, kp in enumerate(packages):
        if not kp.data or len(kp.data) > limits.keypackage_max_bytes:
            raise InvalidRecord(
                f"KeyPackage must be 1..{limits.keypackage_max_bytes} bytes", index=index
            )
        if not 0 <= kp.ciphersuite <= 0xFFFF:
            raise InvalidRecord("ciphersuite out of range", index=index)
        if kp.not_after_ms is not None and kp.not_after_ms <= now_ms:
            raise InvalidRecord("KeyPackage already expired", index=index)

    horizon = now_ms + limits.keypackage_ttl_ms
    new_normal: list[tuple[bytes, KeyPackageUpload]] = []
    new_last_resort: dict[int, tuple[bytes, KeyPackageUpload]] = {}
    seen: set[bytes] = set()
    for kp in packages:
        digest = hashlib.sha256(kp.data).digest()
        if digest in seen or _exists(conn, identity, digest):
            continue
        seen.add(digest)
        if kp.last_resort:
            new_last_resort[kp.ciphersuite] = (digest, kp)  # the last one of a suite wins
        else:
            new_normal.append((digest, kp))

    held = count(conn, identity, now_ms).normal
    if held + len(new_normal) > limits.keypackage_max_per_identity:
        raise QuotaExceeded(
            "KeyPackages",
            limit=limits.keypackage_max_per_identity,
            requested=held + len(new_normal),
        )
    for suite in new_last_resort:
        conn.execute(
            "DELETE FROM keypackages WHERE identity = ? AND last_resort = 1 AND ciphersuite = ?",
            (identity, suite),
        )
    for digest, kp in [*new_normal, *new_last_resort.values()]:
        not_after = horizon if kp.not_after_ms is None else min(kp.not_after_ms, horizon)
        conn.execute(
            "INSERT INTO keypackages (identity, ciphersuite, last_resort, not_after_ms,"
            " uploaded_ms, digest, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (identity, kp.ciphersuite, int(kp.last_resort), not_after, now_ms, digest, kp.data),
        )
    return len(new_normal) + len(new_last_resort)


def fetch_one(
    conn: sqlite3.Connection,
    identity: bytes,
    now_ms: int,
    *,
    ciphersuite: int | None = None,
) -> KeyPackageRecord | None:
    """Consume the oldest live normal package, else return (keep) the last-resort one.

    Must run inside a write transaction: select and delete are one atomic step.
    """
    check_fingerprint(identity)
    suite_clause = "" if ciphersuite is None else " AND ciphersuite = ?"
    params: tuple[object, ...] = (identity, now_ms)
    if ciphersuite is not None:
        params += (ciphersuite,)
    row = conn.execute(
        "DELETE FROM keypackages WHERE id = (SELECT id FROM keypackages WHERE identity = ?"
        f" AND last_resort = 0 AND not_after_ms > ?{suite_clause} ORDER BY id LIMIT 1)"
        " RETURNING ciphersuite, last_resort, not_after_ms, uploaded_ms, data",
        params,
    ).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT ciphersuite, last_resort, not_after_ms, uploaded_ms, data FROM keypackages"
            f" WHERE identity = ? AND last_resort = 1 AND not_after_ms > ?{suite_clause}"
            " ORDER BY id DESC LIMIT 1",
            params,
        ).fetchone()
    if row is None:
        return None
    suite, last_resort, not_after, uploaded, data = row
    return KeyPackageRecord(
        identity=identity,
        data=data,
        ciphersuite=suite,
        last_resort=bool(last_resort),
        not_after_ms=not_after,
        uploaded_ms=uploaded,
    )


def count(conn: sqlite3.Connection, identity: bytes, now_ms: int) -> KeyPackageCount:
    """Live packages, so clients know when to top up their pool."""
    check_fingerprint(identity)
    normal = last_resort = 0
    for flag, n in conn.execute(
        "SELECT last_resort, count(*) FROM keypackages WHERE identity = ? AND not_after_ms > ?"
        " GROUP BY last_resort",
        (identity, now_ms),
    ):
        if flag:
            last_resort = int(n)
        else:
            normal = int(n)
    return KeyPackageCount(normal=normal, last_resort=last_resort)


def expire(conn: sqlite3.Connection, now_ms: int, *, max_rows: int) -> SweepResult:
    """Delete packages past ``not_after`` (last-resort ones too: they expire as well)."""
    deleted = conn.execute(
        "DELETE FROM keypackages WHERE id IN (SELECT id FROM keypackages"
        " WHERE not_after_ms <= ? ORDER BY not_after_ms LIMIT ?)",
        (now_ms, max_rows),
    ).rowcount
    return SweepResult(expired=deleted, tombstones=0, more=deleted >= max_rows)


def _exists(conn: sqlite3.Connection, identity: bytes, digest: bytes) -> bool:
    row = conn.execute(
        "SELECT 1 FROM keypackages WHERE identity = ? AND digest = ?", (identity, digest)
    ).fetchone()
    return row is not None
