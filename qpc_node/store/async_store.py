"""Trio facade: every SQLite call runs on one dedicated worker thread.

Why a dedicated thread and not ``trio.to_thread.run_sync``: sqlite3 connections belong
to the thread that made them, and owning the queue lets the worker see every enqueue
that piled up while it was committing the previous one and commit them together
(group commit: one WAL fsync for many callers, the main lever on flash writes and
throughput). Nothing waits on a timer: batching happens exactly when there is a
backlog, so a lone enqueue is committed immediately.

The Trio side puts a job on a ``queue.SimpleQueue`` and waits on a ``trio.Event`` that
the worker sets through ``TrioToken.run_sync_soon`` (non-blocking for the worker). A
caller cancelled while waiting abandons the result, not the job: an enqueue that was
already queued may still commit, which is fine because enqueue is idempotent on msg_id.

``aclose()`` queues a stop marker behind all pending work, so everything accepted
before it is drained, then checkpoints and truncates the WAL.
"""

from __future__ import annotations

import bisect
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

import msgspec
import outcome
import trio

from qpc_node.errors import QpcError
from qpc_node.store.backup import BackupInfo, Finalizer
from qpc_node.store.errors import StoreClosed
from qpc_node.store.fairness import SenderKey
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
from qpc_node.store.sql import Synchronous
from qpc_node.store.store import EnqueueBatch, EnqueueOutcome, MailboxTotals, Store

T = TypeVar("T")

RECLAIM_IDLE_SECONDS = 1.0
"""Acked rows wait for the next write transaction to delete them (store/mailbox.py);
when no write comes for this long the worker deletes them in a commit of its own, so
an acked payload and its sender tag stay in the file about a second on a quiet node."""

MAX_GROUP_BATCHES = 256
"""Upper bound of enqueue calls folded into one commit (bounds transaction size)."""

OP_SECONDS_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
"""Upper bounds of the worker's operation-time histogram (metrics: SQLite latency)."""


class _Waiter(Generic[T]):
    """A result slot the worker fills and the Trio task waits on."""

    __slots__ = ("_token", "done", "result")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.result: outcome.Outcome[T] | None = None
        self.done = trio.Event()
        self._token = token

    def finish(self, result: outcome.Outcome[T]) -> None:
        self.result = result
        # The Trio run may be gone (nobody waits any more); the job itself is done.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.done.set)


class _Job(_Waiter[T]):
    """One unit of work for the worker."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Store], T], token: trio.lowlevel.TrioToken) -> None:
        super().__init__(token)
        self.fn = fn


class _EnqueueJob(_Job[T]):
    """Enqueue batches of one caller; ``split`` turns their outcomes into its result.

    The worker folds the batches of every queued enqueue job into one
    ``Store.enqueue_many`` (one commit) and hands each job its own slice.
    """

    __slots__ = ("batches", "split")

    def __init__(
        self,
        batches: Sequence[EnqueueBatch],
        split: Callable[[list[EnqueueOutcome]], outcome.Outcome[T]],
        token: trio.lowlevel.TrioToken,
    ) -> None:
        super().__init__(lambda store: split(store.enqueue_many(batches)).unwrap(), token)
        self.batches = batches
        self.split = split


def _whole_batch(outcomes: list[EnqueueOutcome]) -> outcome.Outcome[list[EnqueueResult]]:
    """One batch, all-or-nothing: its results, or the typed error that refused it."""
    (item,) = outcomes
    if isinstance(item, QpcError):
        return outcome.Error(item)
    return outcome.Value(item)


def _each_envelope(
    outcomes: list[EnqueueOutcome],
) -> outcome.Outcome[list[EnqueueResult | QpcError]]:
    """One single-envelope batch per envelope: a result or a refusal for each."""
    return outcome.Value([o if isinstance(o, QpcError) else o[0] for o in outcomes])


_STOP = object()


class AsyncStoreStatistics(msgspec.Struct, frozen=True):
    store: StoreStatistics
    queued: int  # jobs waiting for the worker right now
    jobs: int  # jobs completed
    group_commits: int  # enqueue transactions that carried more than one call
    grouped_batches: int  # enqueue calls that shared a transaction with others
    largest_group: int
    # Worker time per operation (one job, or one group commit): counts per bucket of
    # OP_SECONDS_BOUNDS, not cumulative, the last one past the largest bound.
    op_seconds_buckets: tuple[int, ...] = ()
    op_seconds_sum: float = 0.0
    op_seconds_bounds: tuple[float, ...] = OP_SECONDS_BOUNDS


class AsyncStore:
    """What node services await. Create with ``await AsyncStore.open(...)`` or
    ``async with open_store(...)``; always ``aclose()``."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._store: Store | None = None
        self._closing = False
        self._stopped = trio.Event()
        self._jobs = 0
        self._group_commits = 0
        self._grouped_batches = 0
        self._largest_group = 0
        self._queued = 0
        self._op_buckets = [0] * (len(OP_SECONDS_BOUNDS) + 1)
        self._op_seconds = 0.0

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        limits: StoreLimits | None = None,
        synchronous: Synchronous = "FULL",
    ) -> AsyncStore:
        """Start the worker, which opens and migrates the file (off the Trio thread)."""
        self = cls()
        token = trio.lowlevel.current_trio_token()
        opened: _Waiter[Store] = _Waiter(token)
        self._thread = threading.Thread(
            target=self._run,
            args=(opened, token, lambda: Store.open(path, limits=limits, synchronous=synchronous)),
            name="qpc-store",
            daemon=True,
        )
        self._thread.start()
        with trio.CancelScope(shield=True):  # never leak a half-started worker
            await opened.done.wait()
        assert opened.result is not None
        if isinstance(opened.result, outcome.Error):
            await self._join()
        self._store = opened.result.unwrap()
        return self

    # -- worker thread -------------------------------------------------------------

    def _run(
        self,
        opened: _Waiter[Store],
        token: trio.lowlevel.TrioToken,
        open_store: Callable[[], Store],
    ) -> None:
        result = outcome.capture(open_store)
        store = result.value if isinstance(result, outcome.Value) else None
        opened.finish(result)
        try:
            if store is not None:
                self._serve(store)
        finally:
            if store is not None:
                store.close()
            self._fail_leftovers()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._stopped.set)

    def _fail_leftovers(self) -> None:
        """Never leave a waiter hanging: jobs queued after the stop marker (or behind a
        worker that died) get ``StoreClosed``."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                item.finish(outcome.Error(StoreClosed("store worker stopped")))

    def _serve(self, store: Store) -> None:
        held: object | None = None
        while True:
            if held is not None:
                item = held
            elif store.reclaim_due:
                try:
                    item = self._queue.get(timeout=RECLAIM_IDLE_SECONDS)
                except queue.Empty:
                    # A failed reclaim leaves the rows for the next write; the worker
                    # must not die of it (the next caller gets the error, if any).
                    with contextlib.suppress(sqlite3.Error):
                        store.reclaim()
                    continue
            else:
                item = self._queue.get()
            held = None
            if item is _STOP:
                return
            # Worker thread: trio.current_time() is not available here; perf_counter is
            # the monotonic clock. Two calls and a bisect per job: no measurable cost.
            started = time.perf_counter()
            if isinstance(item, _EnqueueJob):
                group: list[_EnqueueJob[object]] = [item]
                while len(group) < MAX_GROUP_BATCHES:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(nxt, _EnqueueJob):
                        group.append(nxt)
                    else:
                        held = nxt
                        break
                self._run_group(store, group)
            else:
                assert isinstance(item, _Job)
                self._jobs += 1
                item.finish(outcome.capture(item.fn, store))
            took = time.perf_counter() - started
            self._op_seconds += took
            self._op_buckets[bisect.bisect_left(OP_SECONDS_BOUNDS, took)] += 1

    def _run_group(self, store: Store, group: list[_EnqueueJob[object]]) -> None:
        self._jobs += len(group)
        if len(group) == 1:
            group[0].finish(outcome.capture(group[0].fn, store))
            return
        self._group_commits += 1
        self._grouped_batches += len(group)
        self._largest_group = max(self._largest_group, len(group))
        results = outcome.capture(
            store.enqueue_many, [batch for job in group for batch in job.batches]
        )
        start = 0
        for job in group:
            end = start + len(job.batches)
            job.finish(_per_job(results, job, start, end))
            start = end

    # -- Trio side -----------------------------------------------------------------

    async def _submit(self, job: _Job[T]) -> T:
        if self._closing or self._store is None:
            raise StoreClosed("store is closed")
        if self._thread is None or not self._thread.is_alive():
            raise StoreClosed("store worker stopped")
        self._queue.put(job)
        await job.done.wait()
        assert job.result is not None
        return job.result.unwrap()

    async def run(self, fn: Callable[[Store], T]) -> T:
        """Run ``fn(store)`` on the worker: the escape hatch for calls not wrapped below."""
        return await self._submit(_Job(fn, trio.lowlevel.current_trio_token()))

    async def aclose(self) -> None:
        """Drain pending work, checkpoint the WAL, stop the worker. Idempotent."""
        if not self._closing:
            self._closing = True
            self._queue.put(_STOP)
        await self._join()

    async def _join(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stopped.wait()
        if self._thread is not None:
            self._thread.join()  # already returned: it set _stopped as its last act

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def statistics(self) -> AsyncStoreStatistics:
        """Counters for the REPL; read from the Trio thread without a round trip, so
        the store part may lag the worker by the job in flight."""
        assert self._store is not None
        return AsyncStoreStatistics(
            store=self._store.statistics(),
            queued=self._queue.qsize(),
            jobs=self._jobs,
            group_commits=self._group_commits,
            grouped_batches=self._grouped_batches,
            largest_group=self._largest_group,
            op_seconds_buckets=tuple(self._op_buckets),
            op_seconds_sum=self._op_seconds,
        )

    @property
    def is_open(self) -> bool:
        """Open, not closing, and its worker alive (readiness)."""
        thread = self._thread
        return (
            self._store is not None
            and not self._closing
            and thread is not None
            and thread.is_alive()
        )

    # -- mailbox -------------------------------------------------------------------

    async def enqueue(
        self, envelopes: Sequence[Envelope], now_ms: int, *, sender: SenderKey | None = None
    ) -> list[EnqueueResult]:
        """Durable once it returns (see docs/storage.md); may share a commit with others."""
        return await self._submit(
            _EnqueueJob(
                (EnqueueBatch(tuple(envelopes), now_ms, sender),),
                _whole_batch,
                trio.lowlevel.current_trio_token(),
            )
        )

    async def enqueue_each(
        self, envelopes: Sequence[Envelope], now_ms: int, *, sender: SenderKey | None = None
    ) -> list[EnqueueResult | QpcError]:
        """Each envelope on its own: a result, or the typed error that refused it alone.

        Why: a client's batch mixes unrelated recipients, so one full mailbox or bad
        envelope must not hold back the rest. Each envelope is its own savepoint in one
        commit (one fsync), in order, so a later envelope sees the quota the earlier
        ones used. A database error still fails the whole call: nothing was stored.

        ``sender`` (who puts them in) is what the fairness rules of store/fairness.py
        judge, envelope by envelope: one beyond the sender's share is refused alone.
        """
        return await self._submit(
            _EnqueueJob(
                tuple(EnqueueBatch((env,), now_ms, sender) for env in envelopes),
                _each_envelope,
                trio.lowlevel.current_trio_token(),
            )
        )

    async def fetch(
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
        return await self.run(
            lambda s: s.fetch(
                recipient,
                now_ms=now_ms,
                after_seq=after_seq,
                limit=limit,
                max_bytes=max_bytes,
                overhead=overhead,
                strict=strict,
            )
        )

    async def ack(
        self, recipient: bytes, *, up_to_seq: int | None = None, seqs: Sequence[int] = ()
    ) -> int:
        seqs = tuple(seqs)
        return await self.run(lambda s: s.ack(recipient, up_to_seq=up_to_seq, seqs=seqs))

    async def depth(self, recipient: bytes) -> MailboxDepth:
        return await self.run(lambda s: s.depth(recipient))

    async def mailbox_totals(self) -> MailboxTotals:
        """All mailboxes together (metrics); reads the O(1)-per-mailbox counters."""
        return await self.run(Store.mailbox_totals)

    async def expire_messages(self, now_ms: int, *, max_rows: int = 10_000) -> SweepResult:
        return await self.run(lambda s: s.expire_messages(now_ms, max_rows=max_rows))

    # -- KeyPackage directory ------------------------------------------------------

    async def upload_keypackages(
        self, identity: bytes, packages: Sequence[KeyPackageUpload], now_ms: int
    ) -> int:
        packages = tuple(packages)
        return await self.run(lambda s: s.upload_keypackages(identity, packages, now_ms))

    async def fetch_keypackage(
        self, identity: bytes, now_ms: int, *, ciphersuite: int | None = None
    ) -> KeyPackageRecord | None:
        return await self.run(
            lambda s: s.fetch_keypackage(identity, now_ms, ciphersuite=ciphersuite)
        )

    async def count_keypackages(self, identity: bytes, now_ms: int) -> KeyPackageCount:
        return await self.run(lambda s: s.count_keypackages(identity, now_ms))

    async def expire_keypackages(self, now_ms: int, *, max_rows: int = 10_000) -> SweepResult:
        return await self.run(lambda s: s.expire_keypackages(now_ms, max_rows=max_rows))

    # -- audit, meta, operations ---------------------------------------------------

    async def audit_append(self, events: Sequence[AuditEvent]) -> int:
        events = tuple(events)
        return await self.run(lambda s: s.audit_append(events))

    async def audit_query(
        self,
        *,
        kind: str | None = None,
        subject: str | None = None,
        since_ms: int | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[StoredAuditEvent]:
        return await self.run(
            lambda s: s.audit_query(
                kind=kind, subject=subject, since_ms=since_ms, before_id=before_id, limit=limit
            )
        )

    async def audit_rotate(self, *, now_ms: int, keep_last: int, max_age_ms: int) -> int:
        return await self.run(
            lambda s: s.audit_rotate(now_ms=now_ms, keep_last=keep_last, max_age_ms=max_age_ms)
        )

    async def meta_get(self, key: str) -> bytes | None:
        return await self.run(lambda s: s.meta_get(key))

    async def meta_put(self, key: str, value: bytes) -> None:
        await self.run(lambda s: s.meta_put(key, value))

    async def meta_delete(self, key: str) -> bool:
        return await self.run(lambda s: s.meta_delete(key))

    async def backup(
        self, destination: Path | str, *, finalize: Finalizer | None = None
    ) -> BackupInfo:
        return await self.run(lambda s: s.backup(destination, finalize=finalize))


def _per_job(
    results: outcome.Outcome[list[EnqueueOutcome]], job: _EnqueueJob[T], start: int, end: int
) -> outcome.Outcome[T]:
    """Split a group's outcome: a database error fails every batch of the group."""
    if isinstance(results, outcome.Error):
        return outcome.Error(results.error)  # an Outcome is single-use: one per waiter
    assert isinstance(results, outcome.Value)
    return job.split(results.value[start:end])
