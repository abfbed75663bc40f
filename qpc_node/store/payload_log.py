"""Mailbox ciphertexts in append-only segment files beside the database.

Why (docs/performance.md, flash): in SQLite a 1,280 B ciphertext costs its overflow page
and a 330 B cell in a leaf that the next reclaim rewrites, both once in the WAL and once
more when the checkpoint copies them into the file: ~2.7 x the payload written per
delivered message. Here the payload is written once, sequentially, and the message row
(``messages.seg``, ``messages.off``, ``messages.size``) shrinks to ~100 B.

Durability is SQLite's, unchanged: :meth:`PayloadLog.sync` writes and ``fdatasync``\\ s
the transaction's payloads (and the directory, for a new segment) *before* the store
commits the rows that point at them, so a row that survived a crash or power loss never
points at bytes that did not. Bytes whose transaction then failed or was cut by a crash
are garbage no row points at; they go with their segment.

A segment is never written again once the next one is started, and it is deleted whole
(:meth:`PayloadLog.collect`) once no row points into it -- acked, expired or handed over.
A segment kept alive by a few messages nobody fetches is compacted: those payloads are
copied into the current segment (the store does it in a transaction of its own) once the
sealed segments hold more than :data:`SLACK_FACTOR` times the live bytes plus
:data:`SLACK_BYTES`. A segment file without rows at open (a crash between a commit and
the unlink, or a tail that never committed) is deleted then.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from qpc_node.store.errors import StoreError
from qpc_node.store.sql import transaction

SEGMENT_BYTES = 1 << 20
"""A segment is sealed once it holds this much; the next transaction starts another."""

SLACK_FACTOR = 4
SLACK_BYTES = 4 << 20
"""Sealed segments may hold up to ``SLACK_FACTOR`` x their live bytes + ``SLACK_BYTES``
before the most wasteful are compacted (a router's flash is 16-32 MB)."""

_SUFFIX = ".seg"
_READ_FDS = 8


class PayloadMissing(StoreError):
    """A message row points at payload bytes that are not there (a removed data file)."""


def directory_of(db: Path) -> Path:
    return db.with_name(db.name + ".payloads")


def _name(seg: int) -> str:
    return f"{seg:010d}{_SUFFIX}"


class PayloadLog:
    """The segment files of one store. Not thread-safe: the store's thread owns it."""

    __slots__ = ("_dir", "_fd", "_new", "_readers", "_seg", "_sizes", "_staged", "_staged_len")

    def __init__(self, directory: Path, seg: int, sizes: dict[int, int]) -> None:
        self._dir = directory
        self._seg = seg  # the segment appends go to (created at its first sync)
        self._fd: int | None = None
        self._new = True  # its directory entry is not synced yet
        self._sizes = sizes  # segment -> bytes in the file (the current one included)
        self._sizes.setdefault(seg, 0)
        self._staged: list[bytes] = []
        self._staged_len = 0
        self._readers: dict[int, int] = {}

    @classmethod
    def open(cls, db: Path, conn: sqlite3.Connection) -> PayloadLog:
        """Open ``db``'s log: delete segments no row points at, start a new segment."""
        directory = directory_of(db)
        directory.mkdir(mode=0o700, exist_ok=True)
        live = set(_live(conn))
        sizes: dict[int, int] = {}
        for path in directory.iterdir():
            if path.suffix != _SUFFIX or not path.stem.isdigit():
                continue
            seg = int(path.stem)
            if seg in live:
                sizes[seg] = path.stat().st_size
            else:
                path.unlink()
        last = max([*sizes, *live], default=0)
        return cls(directory, last + 1, sizes)

    @property
    def directory(self) -> Path:
        return self._dir

    def append(self, data: bytes) -> tuple[int, int]:
        """Stage ``data`` for this transaction; return (segment, offset) for its row."""
        off = self._sizes[self._seg] + self._staged_len
        self._staged.append(data)
        self._staged_len += len(data)
        return self._seg, off

    def sync(self) -> None:
        """Write and fdatasync what this transaction staged: call before its COMMIT."""
        if not self._staged:
            return
        data = b"".join(self._staged)
        self._staged.clear()
        self._staged_len = 0
        try:
            if self._fd is None:
                path = self._dir / _name(self._seg)
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                self._fd = os.open(path, flags, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._sizes[self._seg] += len(data)
            os.fdatasync(self._fd)
            if self._new:  # the file's name must be as durable as its bytes
                dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
                self._new = False
        except OSError:
            # What reached the file is garbage no row will point at. After a failed
            # fsync the kernel may have dropped the dirty pages: never rely on this
            # segment again, start the next one.
            self._seal()
            raise

    def rolled_back(self) -> None:
        """The transaction rolled back: drop what it staged (synced bytes are garbage)."""
        self._staged.clear()
        self._staged_len = 0

    def committed(self) -> bool:
        """The transaction committed; seal the segment if it is full. True if sealed."""
        if self._sizes[self._seg] < SEGMENT_BYTES:
            return False
        self._seal()
        return True

    def _seal(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._sizes.get(self._seg, 0) == 0:
            self._sizes.pop(self._seg, None)
            with contextlib.suppress(FileNotFoundError):
                (self._dir / _name(self._seg)).unlink()
        self._seg += 1
        self._sizes[self._seg] = 0
        self._new = True
        self._staged.clear()
        self._staged_len = 0

    def read(self, seg: int, off: int, size: int) -> bytes:
        fd = self._readers.get(seg)
        try:
            if fd is None:
                fd = os.open(self._dir / _name(seg), os.O_RDONLY | os.O_CLOEXEC)
                if len(self._readers) >= _READ_FDS:
                    os.close(self._readers.pop(next(iter(self._readers))))
                self._readers[seg] = fd
            data = os.pread(fd, size, off)
        except FileNotFoundError:
            data = b""
        if len(data) != size:
            raise PayloadMissing(f"payload of {size} B at segment {seg} offset {off} is missing")
        return data

    def collect(self, conn: sqlite3.Connection) -> list[int]:
        """Delete sealed segments no committed row points at; return the segments worth
        compacting (most wasteful first), if the sealed ones hold too much dead space.
        Call outside a write transaction: it must see committed rows only."""
        live = _live(conn)
        for seg in [s for s in self._sizes if s != self._seg and s not in live]:
            self._drop(seg)
        sealed = {s: n for s, n in self._sizes.items() if s != self._seg}
        held = sum(sealed.values())
        used = sum(live[s][1] for s in sealed)
        if held <= SLACK_FACTOR * used + SLACK_BYTES:
            return []
        wanted: list[int] = []
        for seg in sorted(sealed, key=lambda s: live[s][1] / max(1, sealed[s])):
            if held <= SLACK_FACTOR * used + SLACK_BYTES:
                break
            wanted.append(seg)
            held -= sealed[seg]  # its live bytes move to the current segment
        return wanted

    def _drop(self, seg: int) -> None:
        fd = self._readers.pop(seg, None)
        if fd is not None:
            os.close(fd)
        self._sizes.pop(seg, None)
        with contextlib.suppress(FileNotFoundError):
            (self._dir / _name(seg)).unlink()

    def bytes_on_disk(self) -> int:
        return sum(self._sizes.values())

    def close(self) -> None:
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Snapshot:
    """The segments of a log as they are now, for a copy of the database made through
    another connection (a backup, possibly from another process): every segment file
    present is opened at once, so one the node deletes meanwhile stays readable."""

    __slots__ = ("_dir", "_fds")

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._fds: dict[int, int] = {}
        if directory.is_dir():
            for path in directory.iterdir():
                if path.suffix == _SUFFIX and path.stem.isdigit():
                    with contextlib.suppress(FileNotFoundError):
                        self._fds[int(path.stem)] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, seg: int, off: int, size: int) -> bytes:
        fd = self._fds.get(seg)
        data = b""
        try:
            if fd is None:  # started after the snapshot
                fd = self._fds[seg] = os.open(self._dir / _name(seg), os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, size, off)
        except FileNotFoundError:
            pass
        if len(data) != size:
            raise PayloadMissing(f"payload of {size} B at segment {seg} offset {off} is missing")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inline(copy: sqlite3.Connection, segments: Snapshot) -> int:
    """Put the log's ciphertexts into a database copy's rows (a backup is one file);
    return how many. ``copy`` must not be in a transaction; a file from before schema
    v15 (no ``seg`` column) has every ciphertext inline already."""
    columns = {str(r[1]) for r in copy.execute("PRAGMA table_info(messages)")}
    if "seg" not in columns:
        return 0
    rows = copy.execute("SELECT id, seg, off, size FROM messages WHERE seg IS NOT NULL")
    moved = [(segments.read(s, o, n), i) for i, s, o, n in rows.fetchall()]
    with transaction(copy):
        copy.executemany(
            "UPDATE messages SET ciphertext = ?, seg = NULL, off = NULL WHERE id = ?", moved
        )
    return len(moved)


def _live(conn: sqlite3.Connection) -> dict[int, tuple[int, int]]:
    """Segment -> (rows, payload bytes) of the committed rows that point into it. A scan
    of the message rows (small: their ciphertexts are in the log); no index on ``seg``,
    which every enqueue would write."""
    rows = conn.execute(
        "SELECT seg, count(*), sum(size) FROM messages WHERE seg IS NOT NULL GROUP BY seg"
    )
    return {int(s): (int(n), int(b)) for s, n, b in rows}
