"""Connection setup and the transaction helper every multi-row change goes through."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]

BUSY_TIMEOUT_MS = 5_000

PAGE_SIZE = 1024
"""Page size of a new database file (an existing file keeps its own: SQLite changes it
only by VACUUM outside WAL mode). Why not SQLite's 4,096: a 1,280 B ciphertext (a
padded 1 KiB message) then takes a 330 B cell in its leaf plus exactly one overflow
page, an ack's delete frees that overflow page without writing it again, and every
page a commit touches besides the payload (index leaves, the mailbox row, the
tombstone log's tail) costs 1 KiB of WAL instead of 4. bench/node_bench.py: 4,844 ->
3,424 B written per delivered message (docs/performance.md)."""


def connect(path: Path, *, synchronous: Synchronous = "FULL") -> sqlite3.Connection:
    """Open ``path`` in WAL mode with the pragmas the store relies on.

    ``isolation_level=None`` turns off the sqlite3 module's implicit transactions: the
    store opens them explicitly (``BEGIN IMMEDIATE``) so it knows exactly what is
    atomic. ``check_same_thread`` stays on: one thread owns a connection.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    with contextlib.ExitStack() as on_error:
        on_error.callback(conn.close)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE:d}")  # before WAL: new files only
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot enable WAL on {path} (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Zero deleted content when it costs no extra page writes (FAST): ciphertext of
        # delivered messages should not linger, but flash writes are what we save.
        conn.execute("PRAGMA secure_delete = FAST")
        on_error.pop_all()  # set up: the caller owns (and closes) it now
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` if the body raises.

    IMMEDIATE takes the write lock up front so a transaction never fails half-way with
    SQLITE_BUSY on its first write.
    """
    conn.execute("BEGIN IMMEDIATE")
    committed = False
    try:
        yield conn
        conn.execute("COMMIT")
        committed = True
    finally:
        if not committed and conn.in_transaction:
            conn.execute("ROLLBACK")


@contextmanager
def savepoint(conn: sqlite3.Connection, name: str) -> Iterator[None]:
    """A nested unit inside a transaction: undone alone if its body raises."""
    conn.execute(f"SAVEPOINT {name}")
    released = False
    try:
        yield
        conn.execute(f"RELEASE {name}")
        released = True
    finally:
        if not released:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
