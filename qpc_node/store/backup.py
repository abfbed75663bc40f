"""Online backup (sqlite3 backup API) verified with ``PRAGMA integrity_check``.

Seam for encryption (operations issue): :func:`backup_to` produces a verified plain
file at a temporary path and then hands it to ``finalize`` (default: rename into place).
An encrypting finalizer reads the temp file, writes the sealed backup, and the plain
copy is removed afterwards either way.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import msgspec

from qpc_node.store.errors import BackupFailed, SchemaTooNew
from qpc_node.store.payload_log import PayloadMissing, Snapshot, directory_of, inline
from qpc_node.store.schema import SCHEMA_VERSION, schema_version

Finalizer = Callable[[Path, Path], None]
"""``finalize(verified_plain_copy, destination)``; must leave ``destination`` complete."""


class BackupInfo(msgspec.Struct, frozen=True):
    path: str
    bytes: int
    schema_version: int


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def backup_to(
    conn: sqlite3.Connection, destination: Path, *, finalize: Finalizer = _rename
) -> BackupInfo:
    """Copy the live database page by page (readers and writers are not blocked long),
    with the mailbox's payload log (store/payload_log.py) put into the copy's rows: the
    backup is one self-contained file. ``conn`` may be the store's own or another
    process's (``qpc backup`` on a running node)."""
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".partial")
    tmp.unlink(missing_ok=True)
    source = Path(conn.execute("PRAGMA database_list").fetchone()[2])
    try:
        for attempt in range(3):
            tmp.unlink(missing_ok=True)
            target = sqlite3.connect(tmp, isolation_level=None)
            try:
                with Snapshot(directory_of(source)) as segments:
                    conn.backup(target, pages=1024)
                    target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
                    inline(target, segments)
                break
            except PayloadMissing:
                # A segment started during the copy and already deleted by the node
                # (all its mail acked meanwhile): copy again.
                if attempt == 2:
                    raise
            finally:
                target.close()
        info = verify_file(tmp)
        finalize(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return BackupInfo(str(destination), destination.stat().st_size, info.schema_version)


def verify_file(path: Path) -> BackupInfo:
    """Integrity-check a database file (a backup before restore, or after writing it)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BackupFailed(f"cannot open {path}: {exc}") from exc
    try:
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
            version = schema_version(conn)
        except sqlite3.DatabaseError as exc:
            raise BackupFailed(f"{path} is not a usable database: {exc}") from exc
    finally:
        conn.close()
    if rows != ["ok"]:
        raise BackupFailed(f"integrity_check of {path} failed: {'; '.join(rows[:5])}")
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(version, SCHEMA_VERSION)
    return BackupInfo(str(path), Path(path).stat().st_size, version)
