"""Audit trail, node-state kv, statistics and verified backups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_node.store import (
    AuditEvent,
    BackupFailed,
    Envelope,
    InvalidRecord,
    Store,
    verify_file,
)
from qpc_node.store.store import WAL_AUTOCHECKPOINT_BYTES

NOW = 1_700_000_000_000
DAY = 86_400_000
ALICE = b"A" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db") as s:
        yield s


def test_audit_append_query_and_filters(store: Store) -> None:
    store.audit_append(
        [
            AuditEvent(NOW, "auth.ok", "ab12", {"ip": "10.0.0.1"}),
            AuditEvent(NOW + 1, "auth.fail", "cd34", {"reason": "bad signature"}),
            AuditEvent(NOW + 2, "auth.ok", "cd34"),
        ]
    )
    newest = store.audit_query(limit=2)
    assert [e.event.ts_ms for e in newest] == [NOW + 2, NOW + 1]
    older = store.audit_query(before_id=newest[-1].id)
    assert [e.event for e in older] == [AuditEvent(NOW, "auth.ok", "ab12", {"ip": "10.0.0.1"})]
    assert [e.event.ts_ms for e in store.audit_query(kind="auth.ok", subject="cd34")] == [NOW + 2]
    assert len(store.audit_query(since_ms=NOW + 1)) == 2
    with pytest.raises(InvalidRecord):
        store.audit_append([AuditEvent(NOW, "", "x")])


def test_audit_rotation_by_age_and_count(store: Store) -> None:
    store.audit_append([AuditEvent(NOW + i * DAY, "tick", str(i)) for i in range(10)])
    now = NOW + 9 * DAY
    assert store.audit_rotate(now_ms=now, keep_last=100, max_age_ms=5 * DAY) == 4
    assert store.audit_rotate(now_ms=now, keep_last=3, max_age_ms=5 * DAY) == 3
    assert [e.event.subject for e in store.audit_query()] == ["9", "8", "7"]


def test_meta_roundtrip(store: Store) -> None:
    assert store.meta_get("node.id") is None
    store.meta_put("node.id", b"\x01")
    store.meta_put("node.id", b"\x02")
    assert store.meta_get("node.id") == b"\x02"
    assert store.meta_delete("node.id") and not store.meta_delete("node.id")


def test_backup_is_verified_and_complete(store: Store, tmp_path: Path) -> None:
    store.enqueue([Envelope(bytes(16), ALICE, NOW + DAY, 3, b"hello")], NOW)
    store.meta_put("k", b"v")
    seen: list[Path] = []

    def finalize(plain: Path, destination: Path) -> None:  # where encryption will go
        seen.append(plain)
        destination.write_bytes(plain.read_bytes())

    info = store.backup(tmp_path / "backup.db", finalize=finalize)
    assert info.bytes > 0 and seen and not seen[0].exists()  # plain temp copy removed
    with Store.open(tmp_path / "backup.db") as restored:
        assert restored.fetch(ALICE, now_ms=NOW).messages[0].envelope.ciphertext == b"hello"
        assert restored.meta_get("k") == b"v"


def test_verify_rejects_a_damaged_file(store: Store, tmp_path: Path) -> None:
    store.audit_append([AuditEvent(NOW, "x", "y", {"pad": "z" * 3000}) for _ in range(50)])
    path = tmp_path / "b.db"
    store.backup(path)
    data = bytearray(path.read_bytes())
    data[4096 * 2 : 4096 * 2 + 512] = b"\xff" * 512  # trash a b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(BackupFailed):
        verify_file(path)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(BackupFailed):
        verify_file(tmp_path / "junk.db")


def test_statistics_count_work(store: Store) -> None:
    envelope = Envelope(bytes(16), ALICE, NOW + DAY, 3, b"x")
    store.enqueue([envelope], NOW)
    store.enqueue([envelope], NOW)
    store.fetch(ALICE, now_ms=NOW)
    store.ack(ALICE, up_to_seq=1)
    stats = store.statistics()
    assert (stats.enqueued, stats.duplicates, stats.fetched, stats.acked) == (1, 1, 1, 1)


def test_the_wal_is_checkpointed_at_the_store_interval_not_sqlites(tmp_path: Path) -> None:
    """SQLite's own interval (1,000 frames) would copy the hot pages into the file twice
    as often (flash writes, docs/performance.md): a WAL of ~1,400 frames stays whole."""
    with Store.open(tmp_path / "node.db", synchronous="NORMAL") as store:
        page = int(store.conn.execute("PRAGMA page_size").fetchone()[0])
        store.meta_put("big", bytes(1_400 * page))  # one commit of ~1,400 frames
        store.meta_put("small", b"x")  # a writer after a checkpoint would restart the WAL
        _busy, frames, _copied = store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert 1_000 < frames < WAL_AUTOCHECKPOINT_BYTES // page
