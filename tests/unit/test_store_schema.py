"""Migrations: old files are upgraded in place, newer files are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from qpc_node.errors import StatusCode
from qpc_node.store import SCHEMA_VERSION, Envelope, SchemaTooNew, Store
from qpc_node.store.schema import migrate, schema_version

NOW = 1_700_000_000_000
ALICE = b"A" * 32


def test_new_file_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as store:
        conn = store.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert schema_version(conn) == SCHEMA_VERSION
        with pytest.raises(sqlite3.IntegrityError):  # messages need their mailbox row
            conn.execute(
                "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit,"
                " enqueued_ms, size, ciphertext) VALUES (?, 1, ?, 1, 1, 1, 1, x'00')",
                (ALICE, bytes(16)),
            )


def test_old_version_file_is_migrated_keeping_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, target=1) == 1
        conn.execute("INSERT INTO mailboxes VALUES (?, 1, 1, 3)", (ALICE,))
        conn.execute(
            "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit, enqueued_ms,"
            " size, ciphertext) VALUES (?, 1, ?, ?, 4, ?, 3, x'616263')",
            (ALICE, bytes(16), NOW + 1000, NOW),
        )
    finally:
        conn.close()
    with Store.open(path) as store:
        assert schema_version(store.conn) == SCHEMA_VERSION
        page = store.fetch(ALICE, now_ms=NOW)
        assert page.messages[0].envelope == Envelope(bytes(16), ALICE, NOW + 1000, 4, b"abc")
        assert store.count_keypackages(ALICE, NOW).normal == 0  # table from migration 2


def test_newer_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with Store.open(path):
        pass
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        conn.close()
    with pytest.raises(SchemaTooNew) as info:
        Store.open(path)
    assert info.value.code is StatusCode.FAILED_PRECONDITION
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)


def test_migration_is_atomic(tmp_path: Path) -> None:
    """A failing migration leaves the previous version and none of its tables."""
    conn = sqlite3.connect(tmp_path / "n.db", isolation_level=None)
    try:
        migrate(conn, target=1)
        conn.execute("CREATE TABLE keypackages (x)")  # make migration 2 collide
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn)
        assert schema_version(conn) == 1
        indexes = conn.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE 'keypackages_by%'"
        ).fetchall()
        assert indexes == []
    finally:
        conn.close()


def test_v11_tombstones_move_to_delivered_and_stay_duplicates(tmp_path: Path) -> None:
    """Migration 12: an acked row (ciphertext NULL) becomes a ``delivered`` tombstone,
    so a late retry of it is still a duplicate with its first seq; live mail stays."""
    path = tmp_path / "v11.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, target=11) == 11
        conn.execute(
            "INSERT INTO mailboxes (recipient, last_seq, depth, bytes) VALUES (?, 2, 1, 3)",
            (ALICE,),
        )
        insert = (
            "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit, enqueued_ms,"
            " size, ciphertext) VALUES (?, ?, ?, ?, 4, ?, 3, ?)"
        )
        conn.execute(insert, (ALICE, 1, bytes(16), NOW + 1000, NOW, None))  # acked
        conn.execute(insert, (ALICE, 2, b"\x01" * 16, NOW + 1000, NOW, b"abc"))
    finally:
        conn.close()
    with Store.open(path) as store:
        assert schema_version(store.conn) == SCHEMA_VERSION
        assert [m.seq for m in store.fetch(ALICE, now_ms=NOW).messages] == [2]
        retry = Envelope(bytes(16), ALICE, NOW + 1000, 4, b"abc")
        (again,) = store.enqueue([retry], NOW)
        assert (again.seq, again.duplicate) == (1, True)
        assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
        assert store.depth(ALICE).messages == 1
        swept = store.expire_messages(NOW + 1000)
        assert (swept.expired, swept.tombstones) == (1, 1)
