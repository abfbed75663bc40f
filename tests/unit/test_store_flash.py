"""Acks and tombstones written for flash (store/mailbox.py, docs/performance.md): an
ack moves a watermark, the acked rows go in the next write transaction, tombstones go
through an append-only log into ``delivered`` in bulk. Every guarantee of the plain
design must hold across it: an ack that returned holds after a crash, a retry of a
delivered message is a duplicate with its first seq, counters stay exact."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_node.store import Envelope, Store, mailbox
from qpc_node.store.fairness import SenderKey

NOW = 1_700_000_000_000
HOUR = 3_600_000
ALICE = b"A" * 32
BOB = b"B" * 32


def env(n: int, to: bytes = ALICE, *, size: int = 1280, expiry: int = NOW + HOUR) -> Envelope:
    return Envelope(n.to_bytes(16, "big"), to, expiry, 8, bytes([n % 251]) * size)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db") as s:
        yield s


def crash(store: Store) -> None:
    """Drop the connection as kill -9 would: no reclaim, no collect of the payload
    log, no checkpoint at close."""
    conn = store._conn
    assert conn is not None
    store._conn = None
    conn.close()
    store.payloads.close()


def wal_frames(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    if not wal.exists() or wal.stat().st_size < 32:
        return 0
    data = wal.read_bytes()
    page = int.from_bytes(data[8:12], "big")
    return (len(data) - 32) // (page + 24)


def test_an_ack_commit_writes_one_page_not_the_payloads(tmp_path: Path) -> None:
    """Fails before this change: the ack deleted 32 rows of 1,280 B in its own commit and
    inserted 32 random-keyed tombstones, ~20 pages of WAL."""
    db = tmp_path / "node.db"
    with Store.open(db) as store:
        store.enqueue([env(n) for n in range(1, 33)], NOW)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert wal_frames(db) == 0
        assert store.ack(ALICE, up_to_seq=32) == 32
        assert wal_frames(db) <= 2  # the mailbox row (and at most page 1)


def test_acked_rows_are_never_fetched_counted_or_stored_again(store: Store) -> None:
    store.enqueue([env(n) for n in range(1, 6)], NOW)
    assert store.ack(ALICE, up_to_seq=3) == 3
    assert store.ack(ALICE, up_to_seq=3) == 0  # twice: nothing new
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW).messages] == [4, 5]
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW, after_seq=1).messages] == [4, 5]
    assert store.depth(ALICE).messages == 2
    assert store.depth(ALICE).bytes == 2 * 1280
    retry = store.enqueue([env(2), env(6)], NOW)  # the next write reclaims 1..3 first
    assert [(r.seq, r.duplicate) for r in retry] == [(2, True), (6, False)]
    rows = store.conn.execute("SELECT seq FROM messages ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == [4, 5, 6]
    assert store.enqueue([env(1), env(3)], NOW)[0].duplicate  # via the log's mirror


def test_an_ack_never_covers_mail_stored_after_it(store: Store) -> None:
    store.enqueue([env(1)], NOW)
    assert store.ack(ALICE, up_to_seq=10**12) == 1
    store.enqueue([env(2)], NOW)
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW).messages] == [2]
    assert store.depth(ALICE).messages == 1


def test_ack_and_tombstones_survive_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    store = Store.open(db)
    store.enqueue([env(n) for n in range(1, 11)], NOW)
    store.ack(ALICE, up_to_seq=4)
    store.enqueue([env(11)], NOW)  # reclaims 1..4: their tombstones are in the log
    store.ack(ALICE, up_to_seq=7)  # 5..7 acked, rows still there
    crash(store)
    with Store.open(db) as again:
        assert [m.seq for m in again.fetch(ALICE, now_ms=NOW).messages] == [8, 9, 10, 11]
        assert again.depth(ALICE).messages == 4
        results = again.enqueue([env(n) for n in range(1, 12)], NOW)
        assert [(r.seq, r.duplicate) for r in results] == [(n, True) for n in range(1, 12)]
        assert again.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 4


def test_the_log_moves_into_delivered_in_bulk(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mailbox, "MERGE_ROWS", 8)
    store.enqueue([env(n) for n in range(1, 11)], NOW)
    store.ack(ALICE, up_to_seq=10)
    store.enqueue([env(11)], NOW)  # reclaims 10 rows: past MERGE_ROWS, merged at commit
    count = "SELECT (SELECT count(*) FROM delivered), (SELECT count(*) FROM delivered_log)"
    assert store.conn.execute(count).fetchone() == (10, 0)
    assert len(store.tombstones) == 0
    assert all(r.duplicate for r in store.enqueue([env(n) for n in range(1, 11)], NOW))


def test_a_rolled_back_write_leaves_no_tombstone_in_memory(store: Store) -> None:
    store.enqueue([env(1), env(2)], NOW)
    store.ack(ALICE, up_to_seq=2)
    with pytest.raises(sqlite3.OperationalError), store.write() as conn:
        conn.execute("SELECT * FROM no_such_table")  # after the reclaim ran in it
    assert store.tombstones.seq_of(ALICE, env(1).msg_id) is None
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
    assert store.reclaim_due  # still waiting, and the next write does it
    assert [r.duplicate for r in store.enqueue([env(1), env(3)], NOW)] == [True, False]
    assert store.tombstones.seq_of(ALICE, env(1).msg_id) == 1


def test_expiry_of_acked_rows_and_logged_tombstones_keeps_counters(store: Store) -> None:
    stranger = SenderKey.local(BOB)
    store.enqueue([env(1, expiry=NOW + 10), env(2, expiry=NOW + 10)], NOW, sender=stranger)
    store.enqueue([env(3)], NOW, sender=stranger)
    store.ack(ALICE, up_to_seq=1)  # row 1 acked, not reclaimed, expires with row 2
    swept = store.expire_messages(NOW + 10)
    assert swept.expired == 1  # row 2 only: row 1 gave its room back at the ack
    depth = store.depth(ALICE)
    assert (depth.messages, depth.stranger_messages) == (1, 1)
    store.ack(ALICE, up_to_seq=3)
    store.enqueue([env(4, expiry=NOW + 2 * HOUR)], NOW + 10)  # reclaims 3 into the log
    assert store.expire_messages(NOW + HOUR).tombstones == 1  # merged, then swept
    assert store.depth(ALICE).messages == 1
    assert store.conn.execute("SELECT count(*) FROM delivered_log").fetchone()[0] == 0


def test_an_ack_reclaims_a_large_backlog_itself(store: Store) -> None:
    from qpc_node.store import store as store_module

    n = store_module.RECLAIM_MAX_ROWS + 1
    store.enqueue([env(i, size=10) for i in range(1, n + 1)], NOW)
    store.ack(ALICE, up_to_seq=n - 1)
    assert store.reclaim_due
    store.ack(ALICE, up_to_seq=n)  # past the bound: this ack's commit reclaims
    rows = store.conn.execute("SELECT seq FROM messages").fetchall()
    assert rows == [(n,)]


def test_close_reclaims(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    with Store.open(db) as store:
        store.enqueue([env(1), env(2)], NOW)
        store.ack(ALICE, up_to_seq=1)
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT seq FROM messages").fetchall() == [(2,)]
    conn.close()


def test_stranger_mail_leaves_at_its_ack(store: Store) -> None:
    """Its row carries the sender's tag: gone in the ack's own commit."""
    store.enqueue([env(1)], NOW)
    store.enqueue([env(2)], NOW, sender=SenderKey.local(BOB))  # bob: a stranger to alice
    store.ack(ALICE, up_to_seq=2)
    tags = store.conn.execute("SELECT count(*) FROM messages WHERE sender IS NOT NULL")
    assert tags.fetchone()[0] == 0
    assert store.tombstones.seq_of(ALICE, env(2).msg_id) == 2
    assert store.enqueue([env(2)], NOW, sender=SenderKey.local(BOB))[0].duplicate


async def test_an_idle_worker_reclaims_what_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio

    from qpc_node.store import AsyncStore, async_store

    monkeypatch.setattr(async_store, "RECLAIM_IDLE_SECONDS", 0.05)
    store = await AsyncStore.open(tmp_path / "node.db")
    try:
        await store.enqueue([env(1, BOB), env(1)], NOW)  # bob's row blocks the prefix
        await store.ack(ALICE, up_to_seq=1)
        for _ in range(100):  # each look is a job: poll slower than the idle timeout
            await trio.sleep(0.2)
            if not await store.run(lambda s: s.reclaim_due):
                break
        rows = await store.run(
            lambda s: s.conn.execute("SELECT recipient FROM messages").fetchall()
        )
        assert rows == [(BOB,)]
    finally:
        await store.aclose()
