"""Stage B of issue 14 at the MLS core: group-scoped snapshots and rollback, read-only use
of a retained (losing-branch) snapshot, sibling commits after a rollback, and rejoin by
external commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node.crypto import (
    MAX_SNAPSHOTS,
    Group,
    Identity,
    SnapshotLimit,
    UnknownSnapshot,
    WrongEpoch,
)

STORE = "store.qpc"


def members(root: Path, n: int) -> tuple[list[Identity], list[Group], list[bytes]]:
    """n identities in one group (created by the first), with their secrets."""
    secrets = [os.urandom(32) for _ in range(n)]
    ids = [Identity.create(root / f"m{i}", s, durable=False) for i, s in enumerate(secrets)]
    g0 = ids[0].create_group(b"chat")
    _commit, welcome = g0.add([m.key_package() for m in ids[1:]])
    g0.merge_pending_commit()
    return ids, [g0, *(m.join(welcome) for m in ids[1:])], secrets


def commit_update(committer: Group, others: list[Group]) -> bytes:
    c = committer.update()
    committer.merge_pending_commit()
    for g in others:
        g.process(c)
    return c


def test_snapshot_rollback_restores_the_epoch_and_survives_reopen(tmp_path: Path) -> None:
    ids, (ga, gb), secrets = members(tmp_path, 2)
    b = ids[1]
    snap = b.snapshot(b"chat")
    assert b.snapshots(b"chat") == [(snap, 1)]
    assert b.snapshot_bytes(b"chat") > 1000
    commit_update(ga, [gb])
    assert gb.process(ga.encrypt(b"epoch 2")).data == b"epoch 2"
    auth2 = gb.export_secret("t", b"", 16)
    assert b.rollback(b"chat", snap) == 1
    assert gb.epoch == 1
    # The snapshot stays, and the old handle sees the restored state.
    assert b.snapshots(b"chat") == [(snap, 1)]
    del b, gb
    b2 = Identity.open(tmp_path / "m1", secrets[1], durable=False)
    gb2 = b2.group(b"chat")
    assert gb2.epoch == 1
    assert b2.snapshots(b"chat") == [(snap, 1)]
    assert auth2 != gb2.export_secret("t", b"", 16)
    b2.release(b"chat", snap)
    assert b2.snapshots(b"chat") == []
    assert b2.snapshot_bytes(b"chat") == 0


def test_sibling_commit_processes_after_rollback(tmp_path: Path) -> None:
    """Both sides of a partition committed on epoch 1; b, on a's branch, switches to c's."""
    _ids, (ga, gb, gc), _ = members(tmp_path, 3)
    b = _ids[1]
    snap = b.snapshot(b"chat")
    commit_update(ga, [gb])
    c_commit = gc.update()
    gc.merge_pending_commit()
    with pytest.raises(WrongEpoch):
        gb.process(c_commit)
    b.rollback(b"chat", snap)
    ev = gb.process(c_commit)
    assert (ev.kind, ev.epoch) == ("commit", 2)
    assert gb.export_secret("x", b"", 16) == gc.export_secret("x", b"", 16)
    assert gb.process(gc.encrypt(b"on c's branch")).data == b"on c's branch"
    assert gc.process(gb.encrypt(b"and back")).data == b"and back"


def test_crash_mid_rollback_leaves_old_or_new_state(tmp_path: Path) -> None:
    """The rollback is one record of the log: cut inside it, reopen has the pre-rollback
    state; whole, the snapshot's state."""
    ids, (ga, gb), secrets = members(tmp_path, 2)
    b = ids[1]
    snap = b.snapshot(b"chat")
    commit_update(ga, [gb])
    store = tmp_path / "m1" / STORE
    before = store.read_bytes()
    b.rollback(b"chat", snap)
    after = store.read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    for name, cut, epoch in (
        ("torn", (len(before) + len(after)) // 2, 2),
        ("whole", len(after), 1),
    ):
        d = tmp_path / name
        d.mkdir()
        (d / STORE).write_bytes(after[:cut])
        g = Identity.open(d, secrets[1], durable=False).group(b"chat")
        assert g.epoch == epoch, name
        # Either state is usable: on epoch 2 it reads a's message, on 1 it takes a's commit.
        if epoch == 2:
            assert g.process(ga.encrypt(b"x")).data == b"x"


def test_snapshot_errors_are_typed(tmp_path: Path) -> None:
    a = Identity.create(tmp_path / "a", os.urandom(32), durable=False)
    a.create_group(b"g")
    with pytest.raises(UnknownSnapshot):
        a.rollback(b"g", 1)
    with pytest.raises(UnknownSnapshot):
        a.release(b"g", 1)
    ids = [a.snapshot(b"g") for _ in range(MAX_SNAPSHOTS)]
    with pytest.raises(SnapshotLimit):
        a.snapshot(b"g")
    assert [s for s, _ in a.snapshots(b"g")] == ids
    a.release(b"g", ids[0])
    assert a.snapshot(b"g") > ids[-1]
