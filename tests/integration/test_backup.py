"""Backup during load restores to a node that serves every message acknowledged
before the backup began; a flipped byte, a wrong passphrase or a foreign node's
backup is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from node_harness import accept, mailbox_ids, running_node, users

from qpc_node.ops.backup import BackupCorrupt, ForeignBackup, create_backup, restore_backup
from qpc_node.ops.clock import ManualWallClock
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(180)
PW = "correct horse battery"


async def test_backup_under_load_and_restore(tmp_path: Path, wall: ManualWallClock) -> None:
    fast = {"rate_per_second": "100000", "rate_burst": "100000"}
    backup = tmp_path / "node.qpcbk"
    acked_before: list[bytes] = []
    async with (
        running_node(tmp_path, wall, limits=fast) as (node, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        bme = b.me
        await accept(b, a, wall)  # b's contact: not bound by a stranger's share
        started = trio.Event()
        done = trio.Event()

        async def load() -> None:
            for i in range(400):
                env = Envelope(
                    os.urandom(16), bme, wall() + 86_400_000, 4, i.to_bytes(4, "big") * 64
                )
                await a._rpc.call(
                    "qpc.v1.Delivery/Enqueue",
                    service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
                    service_pb2.EnqueueResponse,
                )
                if not started.is_set():
                    acked_before.append(env.msg_id)
                if i == 150:
                    started.set()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await started.wait()
            snapshot = list(acked_before)
            await trio.to_thread.run_sync(create_backup, node.data_dir, node.key_dir, backup, PW)
            await done.wait()
    assert len(snapshot) >= 150

    # Restore into a fresh place and serve from it.
    fresh = tmp_path / "restored"
    restore_backup(backup, fresh / "node", fresh / "node" / "node-keys", PW)
    async with running_node(fresh, wall) as (_, info2), users(tmp_path, info2, wall, "b") as (b2,):
        assert info2.cert_fingerprint == info.cert_fingerprint  # same node identity
        seen = set(await mailbox_ids(b2))
    assert set(snapshot) <= seen

    # Refusals.
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped = tmp_path / "flipped.qpcbk"
    flipped.write_bytes(bytes(data))
    target = tmp_path / "t"
    with pytest.raises(BackupCorrupt):
        restore_backup(flipped, target / "node", target / "keys", PW)
    with pytest.raises(BackupCorrupt):
        restore_backup(backup, target / "node", target / "keys", "wrong passphrase")
    truncated = tmp_path / "trunc.qpcbk"
    truncated.write_bytes(backup.read_bytes()[:-100])
    with pytest.raises(BackupCorrupt):
        restore_backup(truncated, target / "node", target / "keys", PW)
    assert not (target / "node").exists()
    # Another node's keys in place: refused unless forced.
    async with running_node(tmp_path / "other", wall):
        pass
    other_keys = tmp_path / "other" / "node" / "node-keys"
    with pytest.raises(ForeignBackup):
        restore_backup(backup, tmp_path / "other" / "node", other_keys, PW)
