"""One node per data dir: an advisory lock held while the node runs; and the
data dir's permissions, checked (and fixed) before anything is opened in it.

Two nodes on one SQLite file and one set of keys would fight; a restore under
a running node would be undone by it. ``flock`` is released by the kernel when
the process dies, even by SIGKILL, so a crash never leaves a stale lock.

The data dir holds ciphertext, routing metadata (who receives how much, when)
and the node's private key: other local users of a router or a shared box must
read none of it. Directories are 0700, files 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from qpc_node.errors import ConfigError, QpcError, StatusCode

LOCK_FILE = "node.lock"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def secure_private_dir(directory: Path, create_files: Iterable[str] = ()) -> list[str]:
    """Make ``directory`` 0700 and the files in it 0600; return what had to be fixed.

    Fix rather than refuse: a dir made by an older version, a package script or
    ``mkdir`` under umask 022 is the common case and the fix is safe, so the node
    starts and the caller logs each fix as a warning. Refused (ConfigError) only
    what we cannot fix: a dir or file owned by another user, or a non-regular
    entry where a node file belongs. ``create_files`` are created empty with
    0600 when missing, so that e.g. SQLite (which gives its WAL and
    shared-memory files the database file's mode) never creates them 0644.
    The dir and ``create_files`` may be symlinks (a mailbox on a USB disk of a
    router): their targets are checked. Other symlinks at the top level are
    not followed. Only the top level is touched: the node keeps nothing deeper.
    """
    fixed: list[str] = []
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    _fix_mode(directory, PRIVATE_DIR_MODE, fixed, want_dir=True)
    for name in create_files:
        path = directory / name
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        _fix_mode(path, PRIVATE_FILE_MODE, fixed, want_dir=False)
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                _fix_mode(Path(entry.path), PRIVATE_FILE_MODE, fixed, want_dir=False)
    return fixed


def _fix_mode(path: Path, mode: int, fixed: list[str], *, want_dir: bool) -> None:
    try:
        st = path.stat()  # callers pass no symlinks they have not chosen to follow
    except OSError as exc:  # e.g. a dangling symlink where node.db belongs
        raise ConfigError(f"{path}: {exc.strerror}") from None
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise ConfigError(f"{path}: expected a {'directory' if want_dir else 'regular file'}")
    current = stat.S_IMODE(st.st_mode)
    if not current & 0o077:
        return
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} is mode {current:04o} and owned by uid {st.st_uid}, not us: "
            f"other local users can read it; fix its owner and mode ({mode:04o})"
        )
    os.chmod(path, (current & ~0o077) | (mode & 0o700))
    fixed.append(f"{path}: mode {current:04o} -> {(current & ~0o077) | (mode & 0o700):04o}")


class NodeBusy(QpcError):
    code = StatusCode.FAILED_PRECONDITION


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeBusy(f"a node is running on {self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
