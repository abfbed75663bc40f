"""Per-recipient mailboxes: the delivery queue behind enqueue / fetch / ack.

Functions here take an open connection and run inside the caller's transaction (the
:class:`~qpc_node.store.store.Store` decides the boundaries, which is what lets it group
several enqueue batches into one commit). They never read a clock: ``now_ms`` is the
caller's wall clock in unix milliseconds.

Idempotency: ``(recipient, msg_id)`` is unique. Acked messages keep a tombstone row (no
ciphertext) until their expiry, so a retry that arrives after delivery is still
recognised as a duplicate instead of being delivered twice; after expiry the envelope
itself is refused as expired, so the window is closed on both sides.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from qpc_node.store.errors import (
    EnvelopeExpired,
    InvalidRecord,
    PayloadTooLarge,
    QuotaExceeded,
)
from qpc_node.store.records import (
    FINGERPRINT_LEN,
    MSG_ID_LEN,
    EnqueueResult,
    Envelope,
    FetchResult,
    MailboxDepth,
    StoredMessage,
    StoreLimits,
    SweepResult,
)

SEQ_MAX = 2**63 - 1
"""Largest SQLite INTEGER; seqs from the wire (uint64) are clamped to it."""


def validate_envelopes(envelopes: Sequence[Envelope], now_ms: int, limits: StoreLimits) -> None:
    """Refuse the whole batch on the first bad envelope, before touching the database."""
    if not envelopes:
        raise InvalidRecord("empty enqueue batch")
    for index, env in enumerate(envelopes):
        if len(env.msg_id) != MSG_ID_LEN:
            raise InvalidRecord(f"msg_id must be {MSG_ID_LEN} bytes", index=index)
        check_fingerprint(env.recipient, index=index)
        if not 0 <= env.hop_limit <= 0xFFFFFFFF:
            raise InvalidRecord("hop_limit out of range", index=index)
        if env.expiry_ms <= now_ms:
            raise EnvelopeExpired("envelope expired", index=index)
        if len(env.ciphertext) > limits.max_payload_bytes:
            raise PayloadTooLarge(len(env.ciphertext), limits.max_payload_bytes, index=index)
        if not env.ciphertext:
            raise InvalidRecord("empty ciphertext", index=index)


def check_fingerprint(value: bytes, *, index: int | None = None) -> None:
    if len(value) != FINGERPRINT_LEN:
        raise InvalidRecord(f"fingerprint must be {FINGERPRINT_LEN} bytes", index=index)


def enqueue(
    conn: sqlite3.Connection,
    envelopes: Sequence[Envelope],
    now_ms: int,
    limits: StoreLimits,
) -> list[EnqueueResult]:
    """Store a validated batch; raise :class:`QuotaExceeded` before writing anything.

    Must run inside a transaction (or savepoint) so the batch is all-or-nothing.
    """
    # Pass 1: classify each envelope as a duplicate (of an earlier copy, possibly in
    # this very batch) or new, and count what the new ones add to each mailbox.
    results: list[EnqueueResult | None] = []
    first_in_batch: dict[tuple[bytes, bytes], int] = {}
    added: dict[bytes, list[int]] = {}  # recipient -> [count, bytes]
    for index, env in enumerate(envelopes):
        key = (env.recipient, env.msg_id)
        row = conn.execute(
            "SELECT seq FROM messages WHERE recipient = ? AND msg_id = ?", key
        ).fetchone()
        if row is not None:
            results.append(EnqueueResult(env.msg_id, int(row[0]), duplicate=True))
        elif key in first_in_batch:
            results.append(None)  # resolved in pass 2, once the first copy has its seq
        else:
            first_in_batch[key] = index
            totals = added.setdefault(env.recipient, [0, 0])
            totals[0] += 1
            totals[1] += len(env.ciphertext)
            results.append(None)

    # Quota check per mailbox, before any write; expired messages do not count.
    state: dict[bytes, tuple[int, int, int]] = {}
    for recipient, (count, size) in added.items():
        last_seq, depth, used = _mailbox_row(conn, recipient)
        if depth + count > limits.mailbox_max_messages or used + size > limits.mailbox_max_bytes:
            _purge_expired_of(conn, recipient, now_ms)
            last_seq, depth, used = _mailbox_row(conn, recipient)
        if depth + count > limits.mailbox_max_messages:
            raise QuotaExceeded(
                "mailbox messages", limit=limits.mailbox_max_messages, requested=depth + count
            )
        if used + size > limits.mailbox_max_bytes:
            raise QuotaExceeded(
                "mailbox bytes", limit=limits.mailbox_max_bytes, requested=used + size
            )
        state[recipient] = (last_seq, depth, used)

    # Pass 2: write.
    for recipient in added:
        conn.execute(
            "INSERT INTO mailboxes (recipient) VALUES (?) ON CONFLICT DO NOTHING", (recipient,)
        )
    next_seq = {recipient: s[0] for recipient, s in state.items()}
    assigned: dict[tuple[bytes, bytes], int] = {}
    horizon = now_ms + limits.message_retention_ms
    out: list[EnqueueResult] = []
    for index, (env, result) in enumerate(zip(envelopes, results, strict=True)):
        key = (env.recipient, env.msg_id)
        if result is not None:
            out.append(result)
        elif first_in_batch[key] != index:
            out.append(EnqueueResult(env.msg_id, assigned[key], duplicate=True))
        else:
            seq = next_seq[env.recipient] + 1
            next_seq[env.recipient] = seq
            assigned[key] = seq
            conn.execute(
                "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit,"
                " enqueued_ms, size, ciphertext) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    env.recipient,
                    seq,
                    env.msg_id,
                    min(env.expiry_ms, horizon),
                    env.hop_limit,
                    now_ms,
                    len(env.ciphertext),
                    env.ciphertext,
                ),
            )
            out.append(EnqueueResult(env.msg_id, seq, duplicate=False))
    for recipient, (count, size) in added.items():
        conn.execute(
            "UPDATE mailboxes SET last_seq = ?, depth = depth + ?, bytes = bytes + ?"
            " WHERE recipient = ?",
            (next_seq[recipient], count, size, recipient),
        )
    return out


def fetch(
    conn: sqlite3.Connection,
    recipient: bytes,
    *,
    after_seq: int,
    limit: int,
    max_bytes: int,
    now_ms: int,
) -> FetchResult:
    """Messages with ``seq > after_seq`` in order, never an expired one.

    ``max_bytes`` bounds the page, but the first message is always returned so that a
    message larger than the page size can still be delivered.
    """
    check_fingerprint(recipient)
    if limit < 1 or max_bytes < 1 or after_seq < 0:
        raise InvalidRecord("fetch needs limit >= 1, max_bytes >= 1 and after_seq >= 0")
    # Wire seqs are uint64, SQLite INTEGER is int64: no stored seq exceeds the clamp.
    after_seq = min(after_seq, SEQ_MAX)
    last_seq = _mailbox_row(conn, recipient)[0]
    cursor = conn.execute(
        "SELECT seq, msg_id, expiry_ms, hop_limit, enqueued_ms, ciphertext FROM messages"
        " WHERE recipient = ? AND seq > ? AND ciphertext IS NOT NULL AND expiry_ms > ?"
        " ORDER BY seq LIMIT ?",
        (recipient, after_seq, now_ms, limit + 1),
    )
    messages: list[StoredMessage] = []
    used = 0
    more = False
    try:
        for seq, msg_id, expiry_ms, hop_limit, enqueued_ms, ciphertext in cursor:
            if len(messages) == limit or (messages and used + len(ciphertext) > max_bytes):
                more = True
                break
            used += len(ciphertext)
            envelope = Envelope(msg_id, recipient, expiry_ms, hop_limit, ciphertext)
            messages.append(StoredMessage(seq, envelope, enqueued_ms))
    finally:
        cursor.close()
    return FetchResult(tuple(messages), more=more, last_seq=last_seq)


def ack(
    conn: sqlite3.Connection,
    recipient: bytes,
    *,
    up_to_seq: int | None = None,
    seqs: Sequence[int] = (),
) -> int:
    """Drop the payload of delivered messages; return how many were newly acked.

    Acking twice, or acking an unknown or expired seq, is not an error (clients retry
    acks after reconnecting). Must run inside a transaction.
    """
    check_fingerprint(recipient)
    if up_to_seq is None and not seqs:
        raise InvalidRecord("ack needs up_to_seq or seqs")
    sizes: list[int] = []
    if up_to_seq is not None:
        sizes += [
            int(r[0])
            for r in conn.execute(
                "UPDATE messages SET ciphertext = NULL WHERE recipient = ? AND seq <= ?"
                " AND ciphertext IS NOT NULL RETURNING size",
                (recipient, min(up_to_seq, SEQ_MAX)),
            ).fetchall()
        ]
    for seq in sorted(set(seqs)):
        if not 0 <= seq <= SEQ_MAX:
            continue  # no such message can exist
        row = conn.execute(
            "UPDATE messages SET ciphertext = NULL WHERE recipient = ? AND seq = ?"
            " AND ciphertext IS NOT NULL RETURNING size",
            (recipient, seq),
        ).fetchone()
        if row is not None:
            sizes.append(int(row[0]))
    if sizes:
        conn.execute(
            "UPDATE mailboxes SET depth = depth - ?, bytes = bytes - ? WHERE recipient = ?",
            (len(sizes), sum(sizes), recipient),
        )
    return len(sizes)


def depth(conn: sqlite3.Connection, recipient: bytes) -> MailboxDepth:
    """Unacked messages and bytes; expired ones count until the next sweep."""
    check_fingerprint(recipient)
    last_seq, count, used = _mailbox_row(conn, recipient)
    return MailboxDepth(messages=count, bytes=used, last_seq=last_seq)


def expire(conn: sqlite3.Connection, now_ms: int, *, max_rows: int) -> SweepResult:
    """Delete rows whose expiry has passed (at most ``max_rows``). In a transaction."""
    rows = conn.execute(
        "DELETE FROM messages WHERE id IN"
        " (SELECT id FROM messages WHERE expiry_ms <= ? ORDER BY expiry_ms LIMIT ?)"
        " RETURNING recipient, size, ciphertext IS NOT NULL",
        (now_ms, max_rows),
    ).fetchall()
    more = len(rows) >= max_rows
    live: dict[bytes, list[int]] = {}
    tombstones = 0
    for recipient, size, unacked in rows:
        if unacked:
            totals = live.setdefault(recipient, [0, 0])
            totals[0] += 1
            totals[1] += size
        else:
            tombstones += 1
    for recipient, (count, size) in live.items():
        conn.execute(
            "UPDATE mailboxes SET depth = depth - ?, bytes = bytes - ? WHERE recipient = ?",
            (count, size, recipient),
        )
    expired = sum(c for c, _ in live.values())
    return SweepResult(expired=expired, tombstones=tombstones, more=more)


def _purge_expired_of(conn: sqlite3.Connection, recipient: bytes, now_ms: int) -> None:
    """Make room by dropping this mailbox's expired messages (quota is about live ones)."""
    rows = conn.execute(
        "DELETE FROM messages WHERE recipient = ? AND expiry_ms <= ?"
        " RETURNING size, ciphertext IS NOT NULL",
        (recipient, now_ms),
    ).fetchall()
    live = [int(size) for size, unacked in rows if unacked]
    if live:
        conn.execute(
            "UPDATE mailboxes SET depth = depth - ?, bytes = bytes - ? WHERE recipient = ?",
            (len(live), sum(live), recipient),
        )


def _mailbox_row(conn: sqlite3.Connection, recipient: bytes) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT last_seq, depth, bytes FROM mailboxes WHERE recipient = ?", (recipient,)
    ).fetchone()
    if row is None:
        return (0, 0, 0)
    return (int(row[0]), int(row[1]), int(row[2]))
