"""The Trio facade: calls run on the worker thread, concurrent enqueues share commits,
close drains."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import trio

from qpc_node.store import (
    SCHEMA_VERSION,
    AsyncStore,
    EnqueueResult,
    Envelope,
    QuotaExceeded,
    SchemaTooNew,
    Store,
    StoreClosed,
    StoreLimits,
)

NOW = 1_700_000_000_000
HOUR = 3_600_000
ALICE = b"A" * 32


def env(n: int, to: bytes = ALICE) -> Envelope:
    return Envelope(n.to_bytes(16, "big"), to, NOW + HOUR, 8, b"x" * 64)


async def _hold_worker(store: AsyncStore) -> threading.Event:
    """Park the worker on a job so that later calls pile up in its queue."""
    release = threading.Event()
    started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def park(_: Store) -> None:
        token.run_sync_soon(started.set)
        release.wait(10)

    async def submit() -> None:
        await store.run(park)

    trio.lowlevel.spawn_system_task(submit)
    await started.wait()
    return release


async def _wait_queued(store: AsyncStore, n: int) -> None:
    with trio.fail_after(5):
        # The counter is fed by another thread: there is no Trio event to wait on.
        while store.statistics().queued < n:  # noqa: ASYNC110
            await trio.sleep(0.001)


async def test_roundtrip_runs_off_the_trio_thread(tmp_path: Path) -> None:
    store = await AsyncStore.open(tmp_path / "n.db")
    async with store:
        assert (await store.enqueue([env(1), env(2)], NOW))[1].seq == 2
        page = await store.fetch(ALICE, now_ms=NOW)
        assert [m.envelope for m in page.messages] == [env(1), env(2)]
        assert await store.ack(ALICE, up_to_seq=2) == 2
        assert (await store.depth(ALICE)).messages == 0
        thread = await store.run(lambda _: threading.current_thread().name)
        assert thread == "qpc-store" != threading.current_thread().name
    with pytest.raises(StoreClosed):
        await store.enqueue([env(3)], NOW)
    # Close checkpointed and truncated the WAL: the main file holds everything.
    wal = tmp_path / "n.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0


async def test_concurrent_enqueues_are_group_committed(tmp_path: Path) -> None:
    tasks = 64
    results: dict[int, list[EnqueueResult]] = {}
    async with await AsyncStore.open(tmp_path / "n.db") as store:
        release = await _hold_worker(store)

        async def one(n: int) -> None:
            results[n] = await store.enqueue([env(n), env(n)], NOW)

        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(one, n)
            await _wait_queued(store, tasks)
            release.set()
        stats = store.statistics()
        assert stats.group_commits == 1 and stats.largest_group == tasks
        assert stats.store.transactions == 1
        seqs = sorted(r[0].seq for r in results.values())
        assert seqs == list(range(1, tasks + 1))
        assert all(r[1].duplicate and r[1].seq == r[0].seq for r in results.values())
        assert (await store.depth(ALICE)).messages == tasks


async def test_refused_batch_in_a_group_fails_only_its_caller(tmp_path: Path) -> None:
    limits = StoreLimits(mailbox_max_messages=3)
    outcomes: dict[int, object] = {}
    async with await AsyncStore.open(tmp_path / "n.db", limits=limits) as store:
        release = await _hold_worker(store)

        async def one(n: int, batch: list[Envelope]) -> None:
            try:
                outcomes[n] = await store.enqueue(batch, NOW)
            except QuotaExceeded as exc:
                outcomes[n] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, [env(1), env(2)])
            await _wait_queued(store, 1)
            nursery.start_soon(one, 1, [env(3), env(4)])
            await _wait_queued(store, 2)
            nursery.start_soon(one, 2, [env(5)])
            await _wait_queued(store, 3)
            release.set()
        assert isinstance(outcomes[1], QuotaExceeded)
        assert [r.seq for r in outcomes[0]] == [1, 2]  # type: ignore[attr-defined]
        assert [r.seq for r in outcomes[2]] == [3]  # type: ignore[attr-defined]
        assert store.statistics().group_commits == 1


async def test_close_drains_pending_enqueues(tmp_path: Path) -> None:
    acked: list[int] = []
    store = await AsyncStore.open(tmp_path / "n.db")
    release = await _hold_worker(store)

    async def one(n: int) -> None:
        await store.enqueue([env(n)], NOW)
        acked.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(one, n)
        await _wait_queued(store, 20)
        nursery.start_soon(store.aclose)
        # aclose queues its stop marker behind the 20 enqueues before it blocks.
        await _wait_queued(store, 21)
        release.set()
    assert sorted(acked) == list(range(20))
    with Store.open(tmp_path / "n.db") as reopened:
        assert reopened.depth(ALICE).messages == 20


async def test_cancelled_caller_does_not_break_the_store(tmp_path: Path) -> None:
    async with await AsyncStore.open(tmp_path / "n.db") as store:
        release = await _hold_worker(store)

        async def cancel_once_queued(scope: trio.CancelScope) -> None:
            await _wait_queued(store, 1)
            scope.cancel()

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_once_queued, scope)
                await store.enqueue([env(1)], NOW)
        assert scope.cancelled_caught  # the caller gave up while its job was queued
        release.set()
        # The abandoned enqueue still commits; a retry sees it as a duplicate.
        assert (await store.enqueue([env(1)], NOW))[0].duplicate


async def test_open_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        conn.close()
    with pytest.raises(SchemaTooNew):
        await AsyncStore.open(path)
