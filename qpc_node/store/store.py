"""The synchronous store: one connection, explicit transactions, one owner thread.

Everything the node persists goes through a :class:`Store`. It is used directly by
tests and tools, and from the single worker thread behind
:class:`~qpc_node.store.async_store.AsyncStore` (which is what services await). It is
not thread-safe by design: sqlite3 connections are bound to their creating thread.

Transaction boundaries live here, not in the table modules, so that
:meth:`Store.enqueue_many` can put several independent enqueue batches into one commit
(group commit: one fsync for all of them) while each batch stays all-or-nothing
through its own savepoint.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from qpc_node.errors import QpcError
from qpc_node.store import audit, keypackages, mailbox, meta
from qpc_node.store.backup import BackupInfo, Finalizer, backup_to
from qpc_node.store.errors import QuotaExceeded, StoreClosed
from qpc_node.store.fairness import Reason, SenderKey
from qpc_node.store.payload_log import PayloadLog
from qpc_node.store.records import (
    MIB,
    AuditEvent,
    EnqueueResult,
    Envelope,
    FetchResult,
    KeyPackageCount,
    KeyPackageRecord,
    KeyPackageUpload,
    MailboxDepth,
    StoredAuditEvent,
    StoreLimits,
    StoreStatistics,
    SweepResult,
)
from qpc_node.store.schema import migrate, schema_version
from qpc_node.store.sql import Synchronous, connect, transaction

WAL_AUTOCHECKPOINT_BYTES = 8 * 1024 * 1024
"""SQLite checkpoints the WAL into the file once it holds this many bytes of frames
(as a page count; its default: 1,000 frames, 4 MiB at 4 KiB pages). A checkpoint
copies each page changed since the last one once, however often it was rewritten, and
the mailbox's hot pages (counters, index tails, the payload pages an ack frees and the
next enqueue reuses) are rewritten all the time: twice the interval, 9 % fewer bytes
written per delivered message in bench/node_bench.py (docs/performance.md). The price
is disk space, not durability (every commit still fsyncs the WAL): the WAL file keeps
its high-water size, ~8 MiB, until the TRUNCATE checkpoint at close."""

RECLAIM_MAX_ROWS = 1024
"""Acked rows left for the next enqueue to reclaim (store/mailbox.py): past this many
an ack reclaims them in its own commit, so a mailbox drained without new mail (a
backlog fetched after a partition) does not keep its acked payloads around."""


class EnqueueBatch(NamedTuple):
    """One enqueue call: its envelopes, the caller's wall clock, and who sends them
    (``None``: an operator path that only the plain mailbox quota binds)."""

    envelopes: Sequence[Envelope]
    now_ms: int
    sender: SenderKey | None = None


EnqueueOutcome = list[EnqueueResult] | QpcError
"""Per batch of :meth:`Store.enqueue_many`: its results, or the typed error that
rejected it (and only it)."""


class MailboxTotals(NamedTuple):
    """All mailboxes together: unacked messages and their bytes (metrics)."""

    mailboxes: int
    messages: int
    bytes: int


class Store:
    """A node's database. Open with :meth:`Store.open`; close (or ``with``) when done."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, limits: StoreLimits, payloads: PayloadLog
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path
        self.limits = limits
        self._payloads = payloads
        self._collecting = False
        self._schema_version = schema_version(conn)
        # Acked rows waiting for the next write transaction (mailbox.reclaim), per
        # recipient, and the tombstones not yet moved into ``delivered``.
        self._unreclaimed = mailbox.unreclaimed(conn)
        self._tombstones = mailbox.Tombstones.load(conn)
        self._transactions = 0
        self._enqueued = 0
        self._duplicates = 0
        self._fetched = 0
        self._acked = 0
        self._expired = 0
        self._quota_rejections = 0
        self._refused: dict[str, int] = {}  # quota rejections by reason
        self._kp_uploaded = 0
        self._kp_served = 0

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        limits: StoreLimits | None = None,
        synchronous: Synchronous = "FULL",
    ) -> Store:
        """Open (creating if needed) and migrate; raises ``SchemaTooNew`` for newer files."""
        path = Path(path)
        conn = connect(path, synchronous=synchronous)
        with contextlib.ExitStack() as on_error:
            on_error.callback(conn.close)
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_BYTES // page:d}")
            migrate(conn)
            payloads = PayloadLog.open(path, conn)
            on_error.callback(payloads.close)
            store = cls(conn, path, limits or StoreLimits(), payloads)
            on_error.pop_all()
        return store

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint the WAL into the main file (and truncate it), then close."""
        if self._conn is not None and self._unreclaimed:
            with contextlib.suppress(sqlite3.Error):  # the next open reclaims them
                self.reclaim()
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error, OSError):  # the next open collects
                self._collect()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
            self._payloads.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed("store is closed")
        return self._conn

    @contextlib.contextmanager
    def write(self, *, reclaim: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction that first reclaims acked rows (``reclaim``) and moves
        the tombstone log into ``delivered`` once it is long enough; keeps the
        in-memory state in step with the commit or the rollback. Every write to the
        mailbox tables goes through here (federation's hand-over too). The payload log
        is synced before the COMMIT: a committed row never points at bytes a crash
        could lose."""
        tombstones = self._tombstones
        payloads = self._payloads
        try:
            with transaction(self.conn) as conn:
                if reclaim and self._unreclaimed:
                    mailbox.reclaim(conn, list(self._unreclaimed), tombstones)
                yield conn
                if len(tombstones) >= mailbox.MERGE_ROWS:
                    tombstones.merge(conn)
                payloads.sync()
        except BaseException:
            tombstones.rolled_back()
            payloads.rolled_back()
            raise
        tombstones.committed()
        if reclaim:
            self._unreclaimed.clear()
        self._transactions += 1
        if payloads.committed() and not self._collecting:
            # A segment was sealed: delete those no row points at any more. The caller's
            # commit stands whatever happens here; the next seal or open retries.
            with contextlib.suppress(sqlite3.Error, OSError):
                self._collect()

    @property
    def payloads(self) -> PayloadLog:
        """The mailbox's payload log (federation's hand-over reads from it)."""
        return self._payloads

    def _collect(self) -> None:
        """Delete dead segments; compact the most wasteful ones if too much is dead."""
        self._collecting = True
        try:
            for seg in self._payloads.collect(self.conn):
                with self.write(reclaim=False) as conn:
                    rows = conn.execute(
                        "SELECT id, off, size FROM messages WHERE seg = ?", (seg,)
                    ).fetchall()
                    for row_id, off, size in rows:
                        moved = self._payloads.append(self._payloads.read(seg, off, size))
                        conn.execute(
                            "UPDATE messages SET seg = ?, off = ? WHERE id = ?", (*moved, row_id)
                        )
                self._transactions -= 1  # housekeeping
            self._payloads.collect(self.conn)
        finally:
            self._collecting = False

    @property
    def tombstones(self) -> mailbox.Tombstones:
        """For mailbox functions run inside :meth:`write` (federation's hand-over)."""
        return self._tombstones

    @property
    def reclaim_due(self) -> bool:
        """Acked rows wait for a write transaction (the async worker runs one when idle)."""
        return bool(self._unreclaimed)

    def reclaim(self) -> None:
        """Delete acked rows now, in a commit of their own (idle, close), and the
        payload segments nobody needs any more."""
        with self.write():
            pass
        self._transactions -= 1  # housekeeping, not a caller's transaction
        self._collect()

    def checkpoint(self) -> None:
        """Fold the WAL into the main file (PASSIVE: never waits for readers)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- mailbox -------------------------------------------------------------------

    def enqueue(
        self, envelopes: Sequence[Envelope], now_ms: int, *, sender: SenderKey | None = None
    ) -> list[EnqueueResult]:
        """Store one batch atomically (one commit); raise its typed error if refused."""
        outcome = self.enqueue_many([EnqueueBatch(envelopes, now_ms, sender)])[0]
        if isinstance(outcome, QpcError):
            raise outcome
        return outcome

    def enqueue_many(self, batches: Sequence[EnqueueBatch]) -> list[EnqueueOutcome]:
        """Group commit: all batches in one transaction, each all-or-nothing.

        A batch refused for validation or quota gets its error in the result list and
        leaves no trace; the others still commit. A database error (disk full, I/O)
        rolls everything back and propagates: nothing was acknowledged.
        """
        batches = [EnqueueBatch(*b) for b in batches]  # plain (envelopes, now_ms) too
        outcomes: list[EnqueueOutcome] = []
        valid: list[int] = []
        for index, (envelopes, now_ms, _) in enumerate(batches):
            try:
                mailbox.validate_envelopes(envelopes, now_ms, self.limits)
            except QpcError as exc:
                outcomes.append(exc)
                continue
            outcomes.append([])
            valid.append(index)
        if not valid:
            return outcomes
        conn = self.conn
        enqueued = duplicates = rejections = 0
        refused: dict[str, int] = {}
        with self.write():
            memo = mailbox.Acceptances()  # this transaction's: see its docstring
            for index in valid:
                envelopes, now_ms, sender = batches[index]
                try:
                    # No savepoint of its own: a refused batch writes nothing (see
                    # mailbox.enqueue); a database error rolls the whole group back.
                    results = mailbox.enqueue(
                        conn,
                        envelopes,
                        now_ms,
                        self.limits,
                        sender,
                        memo,
                        self._tombstones,
                        self._payloads,
                    )
                except QuotaExceeded as exc:
                    outcomes[index] = exc
                    rejections += 1
                    refused[exc.reason] = refused.get(exc.reason, 0) + 1
                    continue
                outcomes[index] = results
                dup = sum(r.duplicate for r in results)
                duplicates += dup
                enqueued += len(results) - dup
        self._enqueued += enqueued
        self._duplicates += duplicates
        self._quota_rejections += rejections
        for reason, n in refused.items():
            self._refused[reason] = self._refused.get(reason, 0) + n
        return outcomes

    def fetch(
        self,
        recipient: bytes,
        *,
        now_ms: int,
        after_seq: int = 0,
        limit: int = 100,
        max_bytes: int = 4 * MIB,
        overhead: int = 0,
        strict: bool = False,
    ) -> FetchResult:
        """See :func:`mailbox.fetch` (``overhead``, ``strict``: a reserved answer size)."""
        # A read transaction gives last_seq and the rows from one snapshot.
        conn = self.conn
        conn.execute("BEGIN")
        try:
            result = mailbox.fetch(
                conn,
                recipient,
                after_seq=after_seq,
                limit=limit,
                max_bytes=max_bytes,
                now_ms=now_ms,
                overhead=overhead,
                strict=strict,
                payloads=self._payloads,
            )
        finally:
            conn.execute("COMMIT")
        self._fetched += len(result.messages)
        return result

    def ack(
        self, recipient: bytes, *, up_to_seq: int | None = None, seqs: Sequence[int] = ()
    ) -> int:
        """Mark delivered messages done; returns how many were new. Durable when it
        returns; the rows go in the next write transaction (see store/mailbox.py)."""
        backlog = sum(self._unreclaimed.values())
        with self.write(reclaim=backlog >= RECLAIM_MAX_ROWS) as conn:
            acked, pending = mailbox.ack(
                conn, recipient, up_to_seq=up_to_seq, seqs=seqs, tombstones=self._tombstones
            )
        if pending:
            self._unreclaimed[recipient] = self._unreclaimed.get(recipient, 0) + pending
        self._acked += acked
        return acked

    def depth(self, recipient: bytes) -> MailboxDepth:
        return mailbox.depth(self.conn, recipient)

    def mailbox_totals(self) -> MailboxTotals:
        """Read-only, for metrics: one pass over ``mailboxes`` (a row per recipient)."""
        row = self.conn.execute(
            "SELECT count(*), coalesce(sum(depth), 0), coalesce(sum(bytes), 0) FROM mailboxes"
        ).fetchone()
        return MailboxTotals(mailboxes=row[0], messages=row[1], bytes=row[2])

    def expire_messages(self, now_ms: int, *, max_rows: int = 10_000) -> SweepResult:
        with self.write() as conn:
            result = mailbox.expire(
                conn,
                now_ms,
                max_rows=max_rows,
                accepted_ttl_ms=self.limits.accepted_ttl_ms,
                log=self._tombstones,
            )
        self._expired += result.expired
        return result

    # -- KeyPackage directory ------------------------------------------------------

    def upload_keypackages(
        self, identity: bytes, packages: Sequence[KeyPackageUpload], now_ms: int
    ) -> int:
        with transaction(self.conn) as conn:
            stored = keypackages.upload(conn, identity, packages, now_ms, self.limits)
        self._transactions += 1
        self._kp_uploaded += stored
        return stored

    def fetch_keypackage(
        self, identity: bytes, now_ms: int, *, ciphersuite: int | None = None
    ) -> KeyPackageRecord | None:
        with transaction(self.conn) as conn:
            record = keypackages.fetch_one(conn, identity, now_ms, ciphersuite=ciphersuite)
        self._transactions += 1
        self._kp_served += record is not None
        return record

    def count_keypackages(self, identity: bytes, now_ms: int) -> KeyPackageCount:
        return keypackages.count(self.conn, identity, now_ms)

    def expire_keypackages(self, now_ms: int, *, max_rows: int = 10_000) -> SweepResult:
        with transaction(self.conn) as conn:
            result = keypackages.expire(conn, now_ms, max_rows=max_rows)
        self._transactions += 1
        return result

    # -- audit ---------------------------------------------------------------------

    def audit_append(self, events: Sequence[AuditEvent]) -> int:
        with transaction(self.conn) as conn:
            last_id = audit.append(conn, events)
        self._transactions += 1
        return last_id

    def audit_query(
        self,
        *,
        kind: str | None = None,
        subject: str | None = None,
        since_ms: int | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[StoredAuditEvent]:
        return audit.query(
            self.conn,
            kind=kind,
            subject=subject,
            since_ms=since_ms,
            before_id=before_id,
            limit=limit,
        )

    def audit_rotate(self, *, now_ms: int, keep_last: int, max_age_ms: int) -> int:
        with transaction(self.conn) as conn:
            deleted = audit.rotate(conn, now_ms=now_ms, keep_last=keep_last, max_age_ms=max_age_ms)
        self._transactions += 1
        return deleted

    # -- node state ----------------------------------------------------------------

    def meta_get(self, key: str) -> bytes | None:
        return meta.get(self.conn, key)

    def meta_put(self, key: str, value: bytes) -> None:
        with transaction(self.conn) as conn:
            meta.put(conn, key, value)
        self._transactions += 1

    def meta_delete(self, key: str) -> bool:
        with transaction(self.conn) as conn:
            found = meta.delete(conn, key)
        self._transactions += 1
        return found

    # -- operations ----------------------------------------------------------------

    def backup(self, destination: Path | str, *, finalize: Finalizer | None = None) -> BackupInfo:
        """Verified online copy; ``finalize`` is the seam for encrypting it."""
        if finalize is None:
            return backup_to(self.conn, Path(destination))
        return backup_to(self.conn, Path(destination), finalize=finalize)

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            schema_version=self._schema_version,
            transactions=self._transactions,
            enqueued=self._enqueued,
            duplicates=self._duplicates,
            fetched=self._fetched,
            acked=self._acked,
            expired_messages=self._expired,
            quota_rejections=self._quota_rejections,
            keypackages_uploaded=self._kp_uploaded,
            keypackages_served=self._kp_served,
            refused_stranger_pool=self._refused.get(Reason.STRANGER_POOL_FULL.value, 0),
            refused_stranger_share=self._refused.get(Reason.STRANGER_SHARE_USED.value, 0),
        )
