"""Issue 11.6: a node's data dir is 0700 and its files 0600, checked at start.

node.db holds ciphertext and routing metadata (who gets how much, when), the
key dir the node's private key: other local users must read none of it. The
node fixes a lax dir it owns (and logs each fix) and refuses one it does not.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import trio
from abuse_rpc import store_to_self, user
from node_harness import start_node_process

from qpc_node.errors import ConfigError
from qpc_node.ops.lockfile import secure_private_dir
from tests.ci_needs import unavailable

pytestmark = pytest.mark.timeout(90)

ENV = {"QPC_LIMITS_RATE_PER_SECOND": "100000", "QPC_LIMITS_RATE_BURST": "100000"}
NODE_FILES = ("node.db", "node.db-wal", "node.db-shm", "node.lock")
KEY_FILES = ("node.key", "node.crt")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(data: Path) -> dict[str, int]:
    out = {".": mode(data), "node-keys": mode(data / "node-keys")}
    out.update({name: mode(data / name) for name in NODE_FILES})
    out.update({f"node-keys/{n}": mode(data / "node-keys" / n) for n in KEY_FILES})
    return out


PRIVATE = {".": 0o700, "node-keys": 0o700} | {
    n: 0o600 for n in (*NODE_FILES, *(f"node-keys/{k}" for k in KEY_FILES))
}


async def run_node_and_write(tmp: Path, data: Path, log: Path) -> dict[str, int]:
    """Start a node process (umask 022, as a service manager would), store a
    message (so the WAL is written), read the modes while it runs, stop it."""
    old = os.umask(0o022)
    try:
        proc, info = await start_node_process(data, ENV, log)
    finally:
        os.umask(old)
    try:
        async with user(tmp, info.host, info.port, info.cert_fingerprint, source="127.0.0.1") as u:
            await store_to_self(u, 1000)
        return modes(data)
    finally:
        proc.terminate()
        await proc.wait()


async def test_fresh_data_dir_is_private(tmp_path: Path) -> None:
    data = tmp_path / "node"
    got = await run_node_and_write(tmp_path, data, tmp_path / "node.log")
    assert {k: oct(v) for k, v in got.items()} == {k: oct(v) for k, v in PRIVATE.items()}
    # and it made them so: nothing of its own needed fixing (no warning on a first start)
    assert "readable by other users" not in (tmp_path / "node.log").read_text()


async def test_lax_data_dir_is_fixed_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "node"
    await run_node_and_write(tmp_path, data, tmp_path / "first.log")
    # What an older version (or `mkdir` + a package script under umask 022) left.
    data.chmod(0o755)
    (data / "node-keys").chmod(0o755)
    for name in ("node.db", "node.lock"):
        (data / name).chmod(0o644)
    (data / "node-keys" / "node.crt").chmod(0o644)
    log = tmp_path / "second.log"
    got = await run_node_and_write(tmp_path, data, log)
    assert {k: oct(v) for k, v in got.items()} == {k: oct(v) for k, v in PRIVATE.items()}
    text = log.read_text()
    assert "readable by other users; fixed" in text
    for fixed in (f"{data}: mode 0755 -> 0700", f"{data / 'node.db'}: mode 0644 -> 0600"):
        assert fixed in text


async def test_lax_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("the other-user refusal test", "needs root to give a file to another user")
    data = tmp_path / "node"
    data.mkdir(mode=0o700)
    db = data / "node.db"
    db.touch(mode=0o644)
    db.chmod(0o644)
    os.chown(db, 4242, 4242)
    argv = [sys.executable, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0"]
    done = None
    with trio.move_on_after(30):  # a node that starts anyway is killed, not waited on
        done = await trio.run_process(
            [*argv, "--data", str(data)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "QPC_METRICS_LISTEN": ""},
        )
    assert done is not None, "the node started on a data dir other users can read"
    assert done.returncode != 0
    assert b"owned by uid 4242" in done.stderr
    assert mode(db) == 0o644  # not ours: left alone


def test_symlinked_dir_and_db_are_checked_at_their_targets(tmp_path: Path) -> None:
    """A router keeping its mailbox on a USB disk: the targets get 0700/0600."""
    usb = tmp_path / "usb"
    (usb / "qpc").mkdir(parents=True, mode=0o755)
    (usb / "qpc").chmod(0o755)
    (usb / "node.db").write_bytes(b"")
    (usb / "node.db").chmod(0o644)
    data = tmp_path / "data"
    data.symlink_to(usb / "qpc")
    (data / "node.db").symlink_to(usb / "node.db")
    (data / "elsewhere").symlink_to(usb)  # not a node file: not followed
    fixed = secure_private_dir(data, ("node.db",))
    assert mode(usb / "qpc") == 0o700 and mode(usb / "node.db") == 0o600
    assert mode(usb) == 0o755 and len(fixed) == 2


def test_a_non_file_where_node_db_belongs_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node.db").mkdir()
    with pytest.raises(ConfigError, match="expected a regular file"):
        secure_private_dir(tmp_path, ("node.db",))
    (tmp_path / "node.db").rmdir()
    (tmp_path / "node.db").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"node\.db: No such file"):
        secure_private_dir(tmp_path, ("node.db",))
