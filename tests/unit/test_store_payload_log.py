"""The mailbox's payload log (store/payload_log.py, schema v15): a ciphertext is written
once to an append-only segment file, synced before the commit of the row that points at
it; segments go whole when no row needs them, stragglers are compacted forward. Every
guarantee of the store must hold across it: an enqueue that returned survives a crash
with its bytes, a backup is one self-contained file, rows stored before v15 still read."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_store_flash import ALICE, BOB, NOW, crash, env, wal_frames

from qpc_node.store import Envelope, Store, StoreError, payload_log
from qpc_node.store.backup import backup_to
from qpc_node.store.payload_log import PayloadMissing, directory_of
from qpc_node.store.schema import migrate
from qpc_node.store.sql import connect, transaction


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db") as s:
        yield s


def segments(db: Path) -> list[Path]:
    return sorted(directory_of(db).glob("*.seg"))


def test_a_payload_is_written_once_to_the_log_not_to_the_wal(tmp_path: Path) -> None:
    """Fails before schema v15: the 32 ciphertexts went into the WAL, 32 overflow pages
    plus their cells (~45 frames), and there was no log."""
    db = tmp_path / "node.db"
    with Store.open(db) as store:
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.enqueue([env(n) for n in range(1, 33)], NOW)
        assert wal_frames(db) <= 20  # rows of ~100 B, three indexes, the mailbox row
        assert sum(p.stat().st_size for p in segments(db)) == 32 * 1280
        fetched = store.fetch(ALICE, now_ms=NOW, limit=100).messages
        assert [m.envelope for m in fetched] == [env(n) for n in range(1, 33)]


def test_the_log_is_synced_before_the_rows_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power loss after the COMMIT must not leave a row pointing at lost bytes."""
    events: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        events.append("fdatasync")
        real(fd)

    monkeypatch.setattr(payload_log.os, "fdatasync", fdatasync)
    store.conn.set_trace_callback(lambda sql: events.append(sql.split()[0].upper()))
    store.enqueue([env(1), env(2)], NOW)
    store.conn.set_trace_callback(None)
    assert events.count("fdatasync") == 1
    assert events.index("fdatasync") < events.index("COMMIT")
    assert events[-1] == "COMMIT"


def test_a_failed_log_sync_rolls_the_enqueue_back_and_leaves_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write reached the file, its fdatasync failed: the rows roll back, the bytes
    are garbage, and the segment (whose dirty pages the kernel may have dropped) is
    never appended to again."""
    db = tmp_path / "node.db"
    store = Store.open(db)
    store.enqueue([env(1)], NOW)

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(payload_log.os, "fdatasync", fail)
    with pytest.raises(OSError):
        store.enqueue([env(2)], NOW)
    monkeypatch.undo()
    assert [p.stat().st_size for p in segments(db)] == [2 * 1280]  # env(2)'s: garbage
    store.enqueue([env(3)], NOW)  # into the next segment
    assert [m.envelope for m in store.fetch(ALICE, now_ms=NOW).messages] == [env(1), env(3)]
    assert [p.stat().st_size for p in segments(db)] == [2 * 1280, 1280]
    crash(store)
    with Store.open(db) as again:
        assert [m.envelope for m in again.fetch(ALICE, now_ms=NOW).messages] == [env(1), env(3)]
        assert not again.enqueue([env(2)], NOW)[0].duplicate  # never stored


def test_dead_segments_go_and_stragglers_are_compacted(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's mail is acked, Bob's (one per segment) never fetched: the sealed segments
    may hold only SLACK_FACTOR x Bob's bytes + SLACK_BYTES; Bob's mail stays intact."""
    segment = 16 * 1280
    monkeypatch.setattr(payload_log, "SEGMENT_BYTES", segment)
    monkeypatch.setattr(payload_log, "SLACK_BYTES", segment)
    db = store.path
    bobs = []
    for round_ in range(40):
        batch = [env(1000 * round_ + n) for n in range(15)] + [env(1000 * round_ + 15, BOB)]
        store.enqueue(batch, NOW)
        bobs.append(batch[-1])
        store.ack(ALICE, up_to_seq=store.depth(ALICE).last_seq)
    store.reclaim()
    held = sum(p.stat().st_size for p in segments(db))
    live = 40 * 1280
    assert held <= payload_log.SLACK_FACTOR * live + 3 * segment  # + slack, current one
    assert held < 40 * segment / 2  # without compaction every segment stays
    page = store.fetch(BOB, now_ms=NOW, limit=100, max_bytes=1 << 30).messages
    assert [m.envelope for m in page] == bobs
    store.ack(BOB, up_to_seq=40)
    store.reclaim()
    assert len(segments(db)) <= 1  # the current one at most


def test_a_segment_no_row_points_at_is_deleted_at_open(tmp_path: Path) -> None:
    """A crash between the commit that freed a segment and its unlink, or a tail that
    never committed: nothing else would ever delete it."""
    db = tmp_path / "node.db"
    store = Store.open(db)
    store.enqueue([env(1), env(2)], NOW)
    store.ack(ALICE, up_to_seq=2)
    store.enqueue([env(3, BOB)], NOW)  # reclaims 1, 2
    crash(store)
    stray = directory_of(db) / "0000000099.seg"
    stray.write_bytes(b"x" * 100)
    with Store.open(db) as again:
        assert not stray.exists()
        assert [m.envelope for m in again.fetch(BOB, now_ms=NOW).messages] == [env(3, BOB)]
        again.enqueue([env(4)], NOW)  # a new segment, numbered past the stray
        assert [m.seq for m in again.fetch(ALICE, now_ms=NOW).messages] == [3]


def test_a_missing_payload_is_a_typed_error(store: Store) -> None:
    store.enqueue([env(1)], NOW)
    for path in segments(store.path):
        path.unlink()
    store.payloads.close()  # no cached descriptor keeps the unlinked file readable
    with pytest.raises(PayloadMissing) as raised:
        store.fetch(ALICE, now_ms=NOW)
    assert isinstance(raised.value, StoreError)


def test_a_backup_is_one_file_with_the_payloads(store: Store, tmp_path: Path) -> None:
    store.enqueue([env(n) for n in range(1, 5)], NOW)
    store.ack(ALICE, up_to_seq=1)
    copy = tmp_path / "elsewhere" / "backup.db"
    copy.parent.mkdir()
    store.backup(copy)
    assert not directory_of(copy).exists()
    with Store.open(copy) as restored:
        assert [m.envelope for m in restored.fetch(ALICE, now_ms=NOW).messages] == [
            env(n) for n in range(2, 5)
        ]
        inline = "SELECT count(*) FROM messages WHERE seg IS NULL AND ciphertext IS NOT NULL"
        assert restored.conn.execute(inline).fetchone()[0] == 4  # acked row 1 included
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW).messages] == [2, 3, 4]  # live: as is


def test_rows_stored_before_v15_keep_their_inline_ciphertext(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    conn = connect(db)
    try:
        migrate(conn, target=14)
        with transaction(conn):  # as the v14 code stored them: ciphertext in the row
            conn.execute(
                "INSERT INTO mailboxes (recipient, last_seq, depth, bytes) VALUES (?, 2, 2, ?)",
                (ALICE, 2 * 1280),
            )
            for n in (1, 2):
                e = env(n)
                conn.execute(
                    "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit,"
                    " enqueued_ms, size, ciphertext) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (ALICE, n, e.msg_id, e.expiry_ms, e.hop_limit, NOW, 1280, e.ciphertext),
                )
    finally:
        conn.close()
    with Store.open(db) as store:
        assert [m.envelope for m in store.fetch(ALICE, now_ms=NOW).messages] == [env(1), env(2)]
        store.enqueue([env(3)], NOW)  # into the log
        assert [m.envelope for m in store.fetch(ALICE, now_ms=NOW).messages] == [
            env(1),
            env(2),
            env(3),
        ]
        assert store.ack(ALICE, up_to_seq=3) == 3
        assert store.enqueue([env(2)], NOW)[0].duplicate


def test_a_backup_through_another_connection_carries_the_payloads(
    store: Store, tmp_path: Path
) -> None:
    """``qpc backup`` on a running node copies node.db through its own read-only
    connection (ops/backup.py); the copy must not point into the node's log."""
    store.enqueue([env(n) for n in range(1, 4)], NOW)
    other = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        (tmp_path / "copy").mkdir()
        backup_to(other, tmp_path / "copy" / "node.db")
    finally:
        other.close()
    with Store.open(tmp_path / "copy" / "node.db") as restored:
        got = restored.fetch(ALICE, now_ms=NOW).messages
        assert [m.envelope for m in got] == [env(n) for n in range(1, 4)]


def test_a_segment_deleted_during_a_backup_stays_readable_to_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payload_log, "SEGMENT_BYTES", 1280)
    seg, off = 1, 0
    store.enqueue([env(1)], NOW)  # fills and seals segment 1
    with payload_log.Snapshot(directory_of(store.path)) as segments:
        store.ack(ALICE, up_to_seq=1)
        store.reclaim()  # deletes segment 1
        assert not (directory_of(store.path) / "0000000001.seg").exists()
        assert segments.read(seg, off, 1280) == env(1).ciphertext


def test_duplicates_without_a_msg_id_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v15 drops the (recipient, msg_id) index: the candidate row comes from memory and
    is confirmed by (recipient, seq). A retry is a duplicate with its first seq whether
    the row is unacked, acked or reclaimed, across a restart (the map is rebuilt at
    open); an entry left by a rolled-back enqueue is no duplicate; the same msg_id to
    another recipient is another message."""
    db = tmp_path / "node.db"
    store = Store.open(db)
    store.enqueue([env(n) for n in range(1, 5)], NOW)
    assert [(r.seq, r.duplicate) for r in store.enqueue([env(2), env(2, BOB)], NOW)] == [
        (2, True),
        (1, False),
    ]

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(payload_log.os, "fdatasync", fail)
    with pytest.raises(OSError):
        store.enqueue([env(5)], NOW)  # rolled back: its entry stays, unconfirmed
    monkeypatch.undo()
    assert store.tombstones.candidate(ALICE, env(5).msg_id) == 5
    assert [(r.seq, r.duplicate) for r in store.enqueue([env(5)], NOW)] == [(5, False)]
    store.ack(ALICE, up_to_seq=2)
    assert store.enqueue([env(1)], NOW)[0].duplicate  # acked, then reclaimed by this write
    assert store.tombstones.candidate(ALICE, env(1).msg_id) is None  # gone at the commit
    crash(store)
    with Store.open(db) as again:
        results = again.enqueue([env(n) for n in range(1, 7)], NOW)
        assert [(r.seq, r.duplicate) for r in results] == [(n, n < 6) for n in range(1, 7)]
        assert again.enqueue([env(2, BOB)], NOW)[0].duplicate
        index = "SELECT count(*) FROM sqlite_schema WHERE name = 'messages_by_msg_id'"
        assert again.conn.execute(index).fetchone()[0] == 0


def test_expiry_drops_the_rows_entries(store: Store) -> None:
    """The map holds stored rows only: what the sweep deletes leaves it at its commit."""
    store.enqueue([env(1), Envelope(bytes(15) + b"\x09", ALICE, NOW + 10, 8, b"x")], NOW)
    store.expire_messages(NOW + 10)
    assert store.tombstones.candidate(ALICE, bytes(15) + b"\x09") is None
    assert store.tombstones.candidate(ALICE, env(1).msg_id) == 1
