"""Per-recipient mailboxes: the delivery queue behind enqueue / fetch / ack.

Functions here take an open connection and run inside the caller's transaction (the
:class:`~qpc_node.store.store.Store` decides the boundaries, which is what lets it group
several enqueue batches into one commit). They never read a clock: ``now_ms`` is the
caller's wall clock in unix milliseconds.

Idempotency: ``(recipient, msg_id)`` is unique. An acked message's row is deleted and a
tombstone (recipient, msg_id, seq, expiry) stays until its expiry, so a retry that
arrives after delivery is still recognised as a duplicate instead of being delivered
twice; after expiry the envelope itself is refused as expired, so the window is closed
on both sides. Why a tombstone and not the row with its ciphertext set to NULL:
updating the row rewrote the payload's pages at every ack and left pages of tombstones
that were never reused; a deleted row frees its pages for the next enqueue.

Acks and flash (docs/performance.md): an ack is durable in its own commit, but what it
writes there is one small row, the mailbox's ``acked_seq`` watermark; rows at or below
it are acked (never fetched, counted or handed over again) and are deleted by
:func:`reclaim` in the next write transaction, whose inserts reuse their pages (a
delete in a commit of its own makes SQLite write every touched leaf page once more).
Stranger mail is the exception: its row carries the sender's tag, so it goes at the ack.
Tombstones are appended to ``delivered_log`` (rowid order: one tail page per commit)
and a :class:`Tombstones` mirror in memory answers the duplicate check for them; every
:data:`MERGE_ROWS` they move into the ``delivered`` tree in one sorted insert (a
random-keyed insert per ack touched a page per tombstone). A crash loses nothing: the
watermark, the rows it covers and the log are all in the database, and the mirror is
rebuilt from the log at open.

Fairness (store/fairness.py): each unacked message from a sender the recipient had not
accepted carries that sender's tag, and counters per mailbox (``stranger_*``) and per
such sender (``mailbox_senders``) keep the pool and share checks O(1). Every path that
removes an unacked message (ack, expiry, purge) gives its room back through
:func:`_release`.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence

from qpc_node.store.errors import (
    EnvelopeExpired,
    InvalidRecord,
    PayloadTooLarge,
    QuotaExceeded,
)
from qpc_node.store.fairness import FairnessLimits, MailboxUsage, SenderKey, Usage, admit
from qpc_node.store.payload_log import PayloadLog, PayloadMissing
from qpc_node.store.records import (
    DAY_MS,
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

MERGE_ROWS = 8192
"""Tombstones in ``delivered_log`` that trigger the move into ``delivered`` (one sorted
insert touching each of the tree's pages at most once per this many acks). Also the
bound of the in-memory mirror: ~1.2 MB at this size (0.3 MB at 2,048). Why 8,192: the
tree holds every tombstone of the retention window and its keys are random, so a move
touches a share of all its pages however few tombstones it carries; four times fewer
moves, 2,525 -> 2,239 B written per delivered message at bench/node_bench.py's default
size and 2,863 -> 2,415 at 64,000 messages (docs/performance.md)."""


class Tombstones:
    """What the duplicate check needs besides ``delivered``'s own key, in memory.

    The tombstones of ``delivered_log``, mirrored: (recipient + msg_id) -> seq. The log
    has no msg_id index (that would be a random-keyed insert again). Rows appended in a
    transaction are staged and become part of the mirror only when the caller reports
    the commit (:meth:`committed`); a rolled-back transaction drops them
    (:meth:`rolled_back`).

    And the rows of ``messages``: (recipient + msg_id) -> seq, a superset (schema v15:
    an index of random msg_ids had most of its pages written by every enqueue and
    reclaim, ~210 B per delivered message). A hit is only a candidate, confirmed by the
    row at (recipient, seq) (:func:`enqueue`), so an entry whose row is gone or never
    committed is harmless; what must hold is that every committed row has its entry:
    entries are added at the insert and dropped only when the transaction that deleted
    the row commits. Rebuilt by one scan at open; ~200 B per stored message."""

    __slots__ = ("_gone", "_live", "_merged", "_recent", "_rows", "_staged")

    def __init__(self, recent: dict[bytes, int], live: dict[bytes, int] | None = None) -> None:
        self._recent = recent
        self._staged: dict[bytes, int] = {}
        self._rows = len(recent)
        self._merged = False
        self._live: dict[bytes, int] = {} if live is None else live
        self._gone: list[bytes] = []

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> Tombstones:
        rows = conn.execute("SELECT recipient, msg_id, seq FROM delivered_log")
        recent = {bytes(r) + bytes(m): int(q) for r, m, q in rows}
        rows = conn.execute("SELECT recipient, msg_id, seq FROM messages")
        return cls(recent, {bytes(r) + bytes(m): int(q) for r, m, q in rows})

    def stored(self, recipient: bytes, msg_id: bytes, seq: int) -> None:
        """A row inserted in this transaction (kept even if it rolls back: a candidate)."""
        self._live[recipient + msg_id] = seq

    def candidate(self, recipient: bytes, msg_id: bytes) -> int | None:
        """The seq of the row ``messages`` may hold for this msg_id (confirm it)."""
        return self._live.get(recipient + msg_id)

    def deleted(self, recipient: bytes, msg_ids: Iterable[bytes]) -> None:
        """Rows deleted in this transaction without a tombstone (expiry, purge)."""
        self._gone += [recipient + m for m in msg_ids]

    def __len__(self) -> int:
        return self._rows + len(self._staged)

    def seq_of(self, recipient: bytes, msg_id: bytes) -> int | None:
        key = recipient + msg_id
        got = self._staged.get(key)
        return self._recent.get(key) if got is None else got

    def append(
        self, conn: sqlite3.Connection, rows: Sequence[tuple[bytes, bytes, int, int]]
    ) -> None:
        """Tombstones (recipient, msg_id, seq, expiry_ms) of rows deleted in this
        transaction."""
        if not rows:
            return
        conn.executemany(
            "INSERT INTO delivered_log (recipient, msg_id, seq, expiry_ms) VALUES (?, ?, ?, ?)",
            rows,
        )
        for recipient, msg_id, seq, _ in rows:
            key = recipient + msg_id
            self._staged[key] = seq
            self._gone.append(key)

    def merge(self, conn: sqlite3.Connection) -> None:
        """Move the log into ``delivered``: sorted, so each of its pages is written once."""
        conn.execute(
            "INSERT INTO delivered (recipient, msg_id, seq, expiry_ms)"
            " SELECT recipient, msg_id, seq, expiry_ms FROM delivered_log"
            " ORDER BY recipient, msg_id ON CONFLICT DO NOTHING"
        )
        conn.execute("DELETE FROM delivered_log")
        self._merged = True

    def committed(self) -> None:
        if self._merged:
            self._recent.clear()
        else:
            self._recent.update(self._staged)
        self._rows = len(self._recent)
        self._staged.clear()
        self._merged = False
        for key in self._gone:
            self._live.pop(key, None)
        self._gone.clear()

    def rolled_back(self) -> None:
        self._staged.clear()
        self._merged = False
        self._gone.clear()


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
    sender: SenderKey | None = None,
    memo: Acceptances | None = None,
    tombstones: Tombstones | None = None,
    payloads: PayloadLog | None = None,
) -> list[EnqueueResult]:
    """Store a validated batch; raise :class:`QuotaExceeded` before writing anything.

    ``sender`` is who puts the batch in (the fairness rules of store/fairness.py apply
    to it, and a local sender's recipients become senders it accepts). ``None`` is an
    operator path (tools, tests) that only the plain mailbox quota binds; every network
    path names its sender. Must run inside a transaction (or savepoint) so the batch is
    all-or-nothing. With ``payloads`` the ciphertexts go to the store's payload log
    (the store syncs it before the commit), else inline in the row.
    """
    # Pass 1: classify each envelope as a duplicate (of an earlier copy, possibly in
    # this very batch) or new, and count what the new ones add to each mailbox.
    results: list[EnqueueResult | None] = []
    first_in_batch: dict[tuple[bytes, bytes], int] = {}
    added: dict[bytes, list[int]] = {}  # recipient -> [count, bytes]
    for index, env in enumerate(envelopes):
        key = (env.recipient, env.msg_id)
        row = _first_copy(conn, tombstones, *key)
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

    # Admission per mailbox, before any write; expired messages do not count. Nothing
    # is written before every mailbox is admitted, except a purge of expired mail to
    # make room, which is undone if the batch is refused anyway: so a refused batch
    # leaves no trace without a savepoint of the caller's (two statements per batch).
    fair = fairness_limits(limits)
    state: dict[bytes, int] = {}  # recipient -> last_seq
    fresh: list[bytes] = []  # recipients without a mailbox row yet
    stranger_tag: dict[bytes, bytes] = {}  # recipients for whom the sender is a stranger
    purging = False
    for recipient, (count, size) in added.items():
        accepted = sender is None or is_accepted(conn, recipient, sender, now_ms, limits, memo)
        tag = None if accepted or sender is None else sender.tag()
        adding = Usage(count, size)
        row = conn.execute(_MAILBOX, (recipient,)).fetchone()
        usage = _usage_of(conn, recipient, row, tag)
        refusal = admit(fair, usage, adding, accepted=accepted)
        if refusal is not None:
            if not purging:
                conn.execute("SAVEPOINT purge")
                purging = True
            _purge_expired_of(conn, recipient, now_ms)
            row = conn.execute(_MAILBOX, (recipient,)).fetchone()
            refusal = admit(fair, _usage_of(conn, recipient, row, tag), adding, accepted=accepted)
        if refusal is not None:
            if purging:
                conn.execute("ROLLBACK TO purge")
                conn.execute("RELEASE purge")
            raise QuotaExceeded(
                refusal.what,
                limit=refusal.limit,
                requested=refusal.requested,
                reason=refusal.reason.value,
            )
        if row is None:
            fresh.append(recipient)
        state[recipient] = 0 if row is None else int(row[0])
        if tag is not None:
            stranger_tag[recipient] = tag
    if purging:
        conn.execute("RELEASE purge")

    # Pass 2: write.
    for recipient in fresh:
        conn.execute("INSERT INTO mailboxes (recipient) VALUES (?)", (recipient,))
    next_seq = dict(state)
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
            inline: bytes | None = env.ciphertext
            seg = off = None
            if payloads is not None:
                seg, off = payloads.append(env.ciphertext)
                inline = None
            if tombstones is not None:
                tombstones.stored(env.recipient, env.msg_id, seq)
            conn.execute(
                "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit,"
                " enqueued_ms, size, ciphertext, sender, seg, off)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    env.recipient,
                    seq,
                    env.msg_id,
                    min(env.expiry_ms, horizon),
                    env.hop_limit,
                    now_ms,
                    len(env.ciphertext),
                    inline,
                    stranger_tag.get(env.recipient),
                    seg,
                    off,
                ),
            )
            out.append(EnqueueResult(env.msg_id, seq, duplicate=False))
    for recipient, (count, size) in added.items():
        conn.execute(
            "UPDATE mailboxes SET last_seq = ?, depth = depth + ?, bytes = bytes + ?"
            " WHERE recipient = ?",
            (next_seq[recipient], count, size, recipient),
        )
        tag = stranger_tag.get(recipient)
        if tag is not None:
            _charge_stranger(conn, recipient, tag, count, size)
    if sender is not None and sender.is_local:
        note_sent(conn, sender.origin, {env.recipient for env in envelopes}, now_ms, memo)
    return out


def _first_copy(
    conn: sqlite3.Connection, tombstones: Tombstones | None, recipient: bytes, msg_id: bytes
) -> tuple[int] | None:
    """The first copy's seq: in ``messages`` (unacked, or acked and not yet reclaimed),
    or delivered (its tombstone in ``delivered_log``, mirrored by ``tombstones``, or in
    ``delivered``). ``messages`` has no msg_id index: ``tombstones`` names the candidate
    row, confirmed here; without it (operator tools) the recipient's rows are scanned."""
    key = (recipient, msg_id)
    if tombstones is None:
        return conn.execute(_DUPLICATE, key + key).fetchone()  # type: ignore[no-any-return]
    logged = tombstones.seq_of(recipient, msg_id)
    if logged is not None:
        return (logged,)
    seq = tombstones.candidate(recipient, msg_id)
    if seq is not None and conn.execute(_ROW, (recipient, seq, msg_id)).fetchone() is not None:
        return (seq,)
    return conn.execute(_DELIVERED, key).fetchone()  # type: ignore[no-any-return]


_DUPLICATE = (
    "SELECT seq FROM messages WHERE recipient = ? AND msg_id = ?"
    " UNION ALL SELECT seq FROM delivered WHERE recipient = ? AND msg_id = ? LIMIT 1"
)
_ROW = "SELECT 1 FROM messages WHERE recipient = ? AND seq = ? AND msg_id = ?"
_DELIVERED = "SELECT seq FROM delivered WHERE recipient = ? AND msg_id = ?"


_MAILBOX = (
    "SELECT last_seq, depth, bytes, stranger_depth, stranger_bytes FROM mailboxes"
    " WHERE recipient = ?"
)


@functools.lru_cache(maxsize=8)
def fairness_limits(limits: StoreLimits) -> FairnessLimits:
    """Derived once per limits (a node has one; each enqueue used to derive them)."""
    return FairnessLimits.derive(
        mailbox_messages=limits.mailbox_max_messages,
        mailbox_bytes=limits.mailbox_max_bytes,
        max_payload_bytes=limits.max_payload_bytes,
        pool_percent=limits.stranger_pool_percent,
        shares=limits.stranger_shares,
    )


class Acceptances:
    """The ``accepted`` rows one transaction has read or written: (recipient, peer) ->
    last_ms, or None for no row. Why: a client's batch is stored envelope by envelope
    and a group commit holds many of them from few senders; each used to read the
    acceptance and upsert ``note_sent`` again (two of six statements per envelope).
    With the memo each pair is read once per transaction and written only when the
    database would change. Valid only inside the transaction that made it, and only if
    every write to ``accepted`` in it goes through :func:`note_sent` with it."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[bytes, bytes], int | None] = {}

    def last_ms(self, conn: sqlite3.Connection, recipient: bytes, peer: bytes) -> int | None:
        key = (recipient, peer)
        if key not in self._last:
            row = conn.execute(
                "SELECT last_ms FROM accepted WHERE recipient = ? AND peer = ?", key
            ).fetchone()
            self._last[key] = None if row is None else int(row[0])
        return self._last[key]

    def wrote(self, recipient: bytes, peer: bytes, last_ms: int) -> None:
        self._last[(recipient, peer)] = last_ms


def is_accepted(
    conn: sqlite3.Connection,
    recipient: bytes,
    sender: SenderKey,
    now_ms: int,
    limits: StoreLimits,
    memo: Acceptances | None = None,
) -> bool:
    """Has ``recipient`` sent to ``sender``'s origin within the acceptance TTL?

    For relayed mail this trusts the origin the neighbour declares (see the threat
    model); the per-sender share still keys on (neighbour, origin).
    """
    if sender.accepted_by_default(recipient):
        return True
    if memo is not None:
        last = memo.last_ms(conn, recipient, sender.origin)
        return last is not None and last > now_ms - limits.accepted_ttl_ms
    row = conn.execute(
        "SELECT 1 FROM accepted WHERE recipient = ? AND peer = ? AND last_ms > ?",
        (recipient, sender.origin, now_ms - limits.accepted_ttl_ms),
    ).fetchone()
    return row is not None


ACCEPT_REFRESH_MS = DAY_MS
"""An acceptance's timestamp is rewritten at most once a day: a chatty user costs no
flash write per message, and the TTL (months) does not need finer ticks."""

_NOTE_SENT = (
    "INSERT INTO accepted (recipient, peer, last_ms) VALUES (?, ?, ?)"
    " ON CONFLICT (recipient, peer) DO UPDATE SET last_ms = excluded.last_ms"
    " WHERE excluded.last_ms >= accepted.last_ms + ?"
)


def note_sent(
    conn: sqlite3.Connection,
    user: bytes,
    peers: Iterable[bytes],
    now_ms: int,
    memo: Acceptances | None = None,
) -> None:
    """``user`` sent to each of ``peers``: from now on it accepts their mail."""
    rows = [(user, peer, now_ms, ACCEPT_REFRESH_MS) for peer in peers if peer != user]
    if memo is not None:  # write only what the upsert would change, and remember it
        due = []
        for row in rows:
            last = memo.last_ms(conn, user, row[1])
            if last is None or now_ms >= last + ACCEPT_REFRESH_MS:
                due.append(row)
                memo.wrote(user, row[1], now_ms)
        rows = due
    if rows:
        conn.executemany(_NOTE_SENT, rows)


def _usage(conn: sqlite3.Connection, recipient: bytes, stranger: bytes | None) -> MailboxUsage:
    return _usage_of(conn, recipient, conn.execute(_MAILBOX, (recipient,)).fetchone(), stranger)


def _usage_of(
    conn: sqlite3.Connection,
    recipient: bytes,
    row: tuple[int, int, int, int, int] | None,
    stranger: bytes | None,
) -> MailboxUsage:
    """``row``: the mailbox's ``_MAILBOX`` columns as read in this transaction."""
    total, strangers = (Usage(row[1], row[2]), Usage(row[3], row[4])) if row else (Usage(), Usage())
    mine = Usage()
    if stranger is not None:
        got = conn.execute(
            "SELECT depth, bytes FROM mailbox_senders WHERE recipient = ? AND sender = ?",
            (recipient, stranger),
        ).fetchone()
        if got is not None:
            mine = Usage(got[0], got[1])
    return MailboxUsage(total=total, strangers=strangers, sender=mine)


def _charge_stranger(
    conn: sqlite3.Connection, recipient: bytes, tag: bytes, count: int, size: int
) -> None:
    conn.execute(
        "UPDATE mailboxes SET stranger_depth = stranger_depth + ?,"
        " stranger_bytes = stranger_bytes + ? WHERE recipient = ?",
        (count, size, recipient),
    )
    conn.execute(
        "INSERT INTO mailbox_senders (recipient, sender, depth, bytes) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (recipient, sender) DO UPDATE"
        " SET depth = depth + excluded.depth, bytes = bytes + excluded.bytes",
        (recipient, tag, count, size),
    )


def _release(
    conn: sqlite3.Connection, recipient: bytes, gone: Iterable[tuple[bytes | None, int]]
) -> None:
    """Unacked messages (sender tag or None, size) left ``recipient``'s mailbox: lower
    its counters, and the stranger pool's and each stranger's share for theirs."""
    count = size = s_count = s_size = 0
    per: dict[bytes, list[int]] = {}
    for tag, n in gone:
        count += 1
        size += n
        if tag is not None:
            s_count += 1
            s_size += n
            t = per.setdefault(tag, [0, 0])
            t[0] += 1
            t[1] += n
    if not count:
        return
    conn.execute(
        "UPDATE mailboxes SET depth = depth - ?, bytes = bytes - ?,"
        " stranger_depth = stranger_depth - ?, stranger_bytes = stranger_bytes - ?"
        " WHERE recipient = ?",
        (count, size, s_count, s_size, recipient),
    )
    for tag, (c, b) in per.items():
        conn.execute(
            "UPDATE mailbox_senders SET depth = depth - ?, bytes = bytes - ?"
            " WHERE recipient = ? AND sender = ?",
            (c, b, recipient, tag),
        )
        conn.execute(
            "DELETE FROM mailbox_senders WHERE recipient = ? AND sender = ? AND depth <= 0",
            (recipient, tag),
        )


def fetch(
    conn: sqlite3.Connection,
    recipient: bytes,
    *,
    after_seq: int,
    limit: int,
    max_bytes: int,
    now_ms: int,
    overhead: int = 0,
    strict: bool = False,
    payloads: PayloadLog | None = None,
) -> FetchResult:
    """Messages with ``seq > after_seq`` in order, never an expired one.

    ``max_bytes`` bounds the page, each message counted as its ciphertext plus
    ``overhead``. Unless ``strict``, the first message is always returned so that
    a message larger than the page size can still be delivered; ``strict`` (the
    caller reserved exactly ``max_bytes`` for its answer) returns none then, with
    ``more`` set. Only the returned messages' ciphertexts are read: sizes come
    first, so a large message past the page costs nothing.
    Must run inside a (read) transaction: both queries see one snapshot. Rows whose
    ciphertext is in the payload log are read from ``payloads`` (:func:`payload_of`).
    """
    check_fingerprint(recipient)
    if limit < 1 or max_bytes < 0 or (max_bytes < 1 and not strict) or after_seq < 0:
        raise InvalidRecord("fetch needs limit >= 1, max_bytes >= 1 and after_seq >= 0")
    if overhead < 0:
        raise InvalidRecord("fetch needs overhead >= 0")
    # Wire seqs are uint64, SQLite INTEGER is int64: no stored seq exceeds the clamp.
    last_seq, acked_seq = _mailbox_seqs(conn, recipient)
    after_seq = max(min(after_seq, SEQ_MAX), acked_seq)  # acked rows wait for reclaim
    where = " WHERE recipient = ? AND seq > ? AND seq <= ? AND expiry_ms > ? ORDER BY seq"
    sizes = conn.execute(
        "SELECT seq, size FROM messages" + where + " LIMIT ?",
        (recipient, after_seq, SEQ_MAX, now_ms, limit + 1),
    ).fetchall()
    used = 0
    taken = 0
    for _seq, size in sizes:
        cost = size + overhead
        if taken == limit or (used + cost > max_bytes and (taken or strict)):
            break
        used += cost
        taken += 1
    more = taken < len(sizes)
    if not taken:
        return FetchResult((), more=more, last_seq=last_seq)
    cursor = conn.execute(
        "SELECT seq, msg_id, expiry_ms, hop_limit, enqueued_ms, ciphertext, seg, off, size"
        " FROM messages" + where,
        (recipient, after_seq, sizes[taken - 1][0], now_ms),
    )
    messages: list[StoredMessage] = []
    try:
        for seq, msg_id, expiry_ms, hop_limit, enqueued_ms, *stored in cursor:
            ciphertext = payload_of(payloads, *stored)
            envelope = Envelope(msg_id, recipient, expiry_ms, hop_limit, ciphertext)
            messages.append(StoredMessage(seq, envelope, enqueued_ms))
    finally:
        cursor.close()
    return FetchResult(tuple(messages), more=more, last_seq=last_seq)


def payload_of(
    payloads: PayloadLog | None, inline: bytes | None, seg: int | None, off: int | None, size: int
) -> bytes:
    """A row's ciphertext: inline (rows stored before schema v15), or in the log."""
    if inline is not None:
        return bytes(inline)
    if payloads is None or seg is None or off is None:
        raise PayloadMissing("the row's payload is in the log, and no log was given")
    return payloads.read(int(seg), int(off), int(size))


def ack(
    conn: sqlite3.Connection,
    recipient: bytes,
    *,
    up_to_seq: int | None = None,
    seqs: Sequence[int] = (),
    tombstones: Tombstones | None = None,
) -> tuple[int, int]:
    """Acknowledge delivered messages; return (how many were newly acked, how many of
    them wait for :func:`reclaim`).

    ``up_to_seq`` moves the mailbox's ``acked_seq`` watermark (clamped to its last seq:
    an ack never covers a message not stored yet); the rows under it stay until the
    next write transaction reclaims them, except stranger mail (its row carries the
    sender's tag), deleted here. ``seqs`` (explicit seqs, e.g. mail handed to
    federation custody) are deleted here too. Rows deleted here log their tombstones
    in ``tombstones``. Acking twice, or acking an unknown or expired seq, is not an error
    (clients retry acks after reconnecting). Must run inside a transaction.
    """
    check_fingerprint(recipient)
    if up_to_seq is None and not seqs:
        raise InvalidRecord("ack needs up_to_seq or seqs")
    last_seq, acked_seq = _mailbox_seqs(conn, recipient)
    gone: list[tuple[bytes | None, int]] = []  # (sender tag, size) of newly acked rows
    deleted: list[tuple[bytes, bytes, int, int]] = []  # tombstones of rows deleted here
    pending = 0
    if up_to_seq is not None and min(up_to_seq, last_seq) > acked_seq:
        upto = min(up_to_seq, last_seq)
        rows = conn.execute(
            "SELECT sender, size FROM messages WHERE recipient = ? AND seq > ? AND seq <= ?",
            (recipient, acked_seq, upto),
        ).fetchall()
        conn.execute("UPDATE mailboxes SET acked_seq = ? WHERE recipient = ?", (upto, recipient))
        gone += [(tag, int(size)) for tag, size in rows]
        pending = len(rows)
        if any(tag is not None for tag, _ in rows):
            # Stranger mail carries its sender's tag: that goes at the ack, not later
            # (no trace of who wrote to whom once delivered); rare, so it costs little.
            if tombstones is None:
                raise InvalidRecord("acking stranger mail needs the store's tombstones")
            tagged = conn.execute(
                "DELETE FROM messages WHERE recipient = ? AND seq > ? AND seq <= ?"
                " AND sender IS NOT NULL RETURNING msg_id, seq, expiry_ms",
                (recipient, acked_seq, upto),
            ).fetchall()
            deleted += [(recipient, m, int(q), int(e)) for m, q, e in tagged]
            pending -= len(tagged)
        acked_seq = upto
    for seq in sorted(set(seqs)):
        if not acked_seq < seq <= SEQ_MAX:
            continue  # acked already, or no such message can exist
        if tombstones is None:
            raise InvalidRecord("ack by seqs needs the store's tombstones")
        row = conn.execute(
            "DELETE FROM messages WHERE recipient = ? AND seq = ?" + _ACKED, (recipient, seq)
        ).fetchone()
        if row is not None:
            msg_id, seq_, expiry_ms, tag, size = row
            deleted.append((recipient, msg_id, int(seq_), int(expiry_ms)))
            gone.append((tag, int(size)))
    if tombstones is not None:
        tombstones.append(conn, deleted)
    _release(conn, recipient, gone)
    return len(gone), pending


def reclaim(conn: sqlite3.Connection, recipients: Iterable[bytes], tombstones: Tombstones) -> int:
    """Delete the acked rows (at or below ``acked_seq``) of ``recipients`` and log their
    tombstones; return how many. Their counters were released at ack. In a transaction:
    best the one of the next enqueue, whose inserts then reuse the freed pages."""
    logged: list[tuple[bytes, bytes, int, int]] = []
    for recipient in recipients:
        rows = conn.execute(
            "DELETE FROM messages WHERE recipient = ? AND seq <= (SELECT acked_seq FROM"
            " mailboxes WHERE recipient = ?) RETURNING msg_id, seq, expiry_ms",
            (recipient, recipient),
        ).fetchall()
        logged += [(recipient, m, int(q), int(e)) for m, q, e in rows]
    tombstones.append(conn, logged)
    return len(logged)


def unreclaimed(conn: sqlite3.Connection) -> dict[bytes, int]:
    """Recipients with acked rows still in ``messages``, and how many (at open)."""
    rows = conn.execute(
        "SELECT m.recipient, count(*) FROM mailboxes b JOIN messages m"
        " ON m.recipient = b.recipient AND m.seq <= b.acked_seq GROUP BY m.recipient"
    )
    return {bytes(r): int(n) for r, n in rows}


_ACKED = " RETURNING msg_id, seq, expiry_ms, sender, size"


def release_to_custody(
    conn: sqlite3.Connection, recipient: bytes, seqs: Sequence[int], tombstones: Tombstones
) -> int:
    """These messages left the mailbox for federation custody (the user re-homed):
    dropped like acked ones -- the tombstone keeps the msg_id, the counters and
    fairness shares are released. Must run in the transaction that queued them."""
    return ack(conn, recipient, seqs=seqs, tombstones=tombstones)[0] if seqs else 0


def depth(conn: sqlite3.Connection, recipient: bytes) -> MailboxDepth:
    """Unacked messages and bytes; expired ones count until the next sweep."""
    check_fingerprint(recipient)
    last_seq, count, used = _mailbox_row(conn, recipient)
    strangers = _usage(conn, recipient, None).strangers
    return MailboxDepth(
        messages=count,
        bytes=used,
        last_seq=last_seq,
        stranger_messages=strangers.messages,
        stranger_bytes=strangers.bytes,
    )


def expire(
    conn: sqlite3.Connection,
    now_ms: int,
    *,
    max_rows: int,
    accepted_ttl_ms: int | None = None,
    log: Tombstones | None = None,
) -> SweepResult:
    """Delete rows whose expiry has passed (at most ``max_rows``). In a transaction.

    With ``accepted_ttl_ms``, also forget acceptances not renewed for that long (at
    most ``max_rows``): the contact graph the node keeps is only as old as it must be.
    An expired tombstone still in the log is moved into ``delivered`` (the whole log,
    sorted, as at :data:`MERGE_ROWS`) and swept from there; ``log``: the store's.
    """
    if log is not None and len(log):
        due = conn.execute(
            "SELECT 1 FROM delivered_log WHERE expiry_ms <= ? LIMIT 1", (now_ms,)
        ).fetchone()
        if due is not None:
            log.merge(conn)
    rows = conn.execute(
        "DELETE FROM messages WHERE id IN"
        " (SELECT id FROM messages WHERE expiry_ms <= ? ORDER BY expiry_ms LIMIT ?)"
        " RETURNING recipient, size, sender, seq, msg_id",
        (now_ms, max_rows),
    ).fetchall()
    if log is not None:
        for recipient, _size, _tag, _seq, msg_id in rows:
            log.deleted(recipient, (msg_id,))
    tombstones = conn.execute(
        "DELETE FROM delivered WHERE (recipient, msg_id) IN (SELECT recipient, msg_id"
        " FROM delivered WHERE expiry_ms <= ? ORDER BY expiry_ms LIMIT ?)",
        (now_ms, max_rows),
    ).rowcount
    more = len(rows) >= max_rows or tombstones >= max_rows
    live: dict[bytes, list[tuple[bytes | None, int]]] = {}
    acked: dict[bytes, int] = {}
    for recipient, size, tag, seq, _ in rows:
        if recipient not in acked:
            acked[recipient] = _mailbox_seqs(conn, recipient)[1]
        if seq > acked[recipient]:  # an acked row's room was given back at its ack
            live.setdefault(recipient, []).append((tag, int(size)))
    for recipient, gone in live.items():
        _release(conn, recipient, gone)
    if accepted_ttl_ms is not None:
        lapsed = conn.execute(
            "DELETE FROM accepted WHERE (recipient, peer) IN (SELECT recipient, peer"
            " FROM accepted WHERE last_ms <= ? ORDER BY last_ms LIMIT ?)",
            (now_ms - accepted_ttl_ms, max_rows),
        ).rowcount
        more = more or lapsed >= max_rows
    expired = sum(len(g) for g in live.values())
    return SweepResult(expired=expired, tombstones=tombstones, more=more)


def _purge_expired_of(conn: sqlite3.Connection, recipient: bytes, now_ms: int) -> None:
    """Make room by dropping this mailbox's expired messages (quota is about live ones).
    Runs in a savepoint that a refusal rolls back while the transaction goes on: so the
    rows' entries in :class:`Tombstones` stay (a stale entry is only a candidate)."""
    rows = conn.execute(
        "DELETE FROM messages WHERE recipient = ? AND expiry_ms <= ? RETURNING size, sender, seq",
        (recipient, now_ms),
    ).fetchall()
    acked_seq = _mailbox_seqs(conn, recipient)[1]
    _release(conn, recipient, [(tag, int(size)) for size, tag, seq in rows if seq > acked_seq])


def _mailbox_row(conn: sqlite3.Connection, recipient: bytes) -> tuple[int, int, int]:
    row = conn.execute(
        "SELECT last_seq, depth, bytes FROM mailboxes WHERE recipient = ?", (recipient,)
    ).fetchone()
    if row is None:
        return (0, 0, 0)
    return (int(row[0]), int(row[1]), int(row[2]))


def _mailbox_seqs(conn: sqlite3.Connection, recipient: bytes) -> tuple[int, int]:
    """(last_seq, acked_seq); (0, 0) for a recipient without a mailbox row."""
    row = conn.execute(
        "SELECT last_seq, acked_seq FROM mailboxes WHERE recipient = ?", (recipient,)
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))
