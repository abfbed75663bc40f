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
    InvalidMessage,
    NotAMember,
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


def test_late_losing_branch_message_decrypts_readonly(tmp_path: Path) -> None:
    """b follows a's branch, switches to c's (the winner); a message a sent on the losing
    branch arrives afterwards: it decrypts from the retained losing head, read-only."""
    ids, (ga, gb, gc), _ = members(tmp_path, 3)
    b = ids[1]
    fork = b.snapshot(b"chat")
    commit_update(ga, [gb])
    assert gb.process(ga.encrypt(b"early on a's branch")).data == b"early on a's branch"
    late = [ga.encrypt(f"late {i}".encode()) for i in range(3)]
    losing_head = b.snapshot(b"chat")
    c_commit = gc.update()
    gc.merge_pending_commit()
    b.rollback(b"chat", fork)
    gb.process(c_commit)
    on_winner = gb.export_secret("x", b"", 16)
    written = b.storage_stats()["bytes_written"]
    # Out of order, and twice: read-only use consumes nothing.
    for ct in [late[2], late[0], late[1], late[0]]:
        ev = b.process_readonly(b"chat", losing_head, ct)
        assert ev.kind == "application" and ev.data.startswith(b"late ")
        assert (ev.sender, ev.message_epoch) == (ids[0].fingerprint, 2)
    assert b.storage_stats()["bytes_written"] == written, "read-only use persisted something"
    assert gb.epoch == 2 and gb.export_secret("x", b"", 16) == on_winner
    assert b.snapshots(b"chat") == [(fork, 1), (losing_head, 2)]
    # The live group (c's branch) cannot read it, and still works.
    with pytest.raises(InvalidMessage):
        gb.process(late[0])
    assert gb.process(gc.encrypt(b"winner")).data == b"winner"
    with pytest.raises(UnknownSnapshot):
        b.process_readonly(b"chat", 999, late[0])


def test_preview_stages_a_commit_without_merging(tmp_path: Path) -> None:
    _ids, (ga, gb, gc), _ = members(tmp_path, 3)
    b = _ids[1]
    c = gc.update()
    gc.merge_pending_commit()
    written = b.storage_stats()["bytes_written"]
    ev = gb.preview(c)
    assert (ev.kind, ev.epoch, ev.sender) == ("commit", 2, _ids[2].fingerprint)
    assert ev.sender_leaf == 2 and ev.self_update_only
    assert ev.authenticator == gc.epoch_authenticator()
    assert gb.epoch == 1 and b.storage_stats()["bytes_written"] == written
    # The group is untouched: an epoch-1 message still decrypts, then the commit applies.
    assert gb.process(ga.encrypt(b"epoch 1")).data == b"epoch 1"
    assert gb.process(c).epoch == 2
    assert gb.export_secret("x", b"", 16) == gc.export_secret("x", b"", 16)
    with pytest.raises(InvalidMessage):
        gb.preview(b"junk")


def rejoin_and_check(stale: Identity, sync: list[Group]) -> Group:
    """`stale` rejoins from sync[0]'s GroupInfo; every member processes its commit."""
    g, commit = stale.join_external(sync[0].group_info())
    for m in sync:
        ev = m.process(commit)
        # An external commit: no leaf sent it; the sender is named by its credential.
        assert (ev.kind, ev.sender, ev.added) == ("commit", stale.fingerprint, [stale.fingerprint])
        assert ev.sender_leaf == 2**32 - 1
        assert ev.authenticator == g.epoch_authenticator()
    auths = {m.epoch_authenticator() for m in [*sync, g]}
    assert len(auths) == 1, "members disagree on the epoch after the rejoin"
    assert g.committers() == sync[0].committers()
    assert {g.epoch} == {m.epoch for m in sync}
    assert sorted(g.members()) == sorted(sync[0].members())
    assert g.members().count(stale.fingerprint) == 1
    for m in sync:
        assert g.process(m.encrypt(b"hi")).data == b"hi"
        assert m.process(g.encrypt(b"back")).data == b"back"
    return g


def test_stale_member_rejoins_by_external_commit(tmp_path: Path) -> None:
    """c missed 3 commits (beyond any rollback window): it rejoins and shares the epoch."""
    ids, (ga, gb, gc), _ = members(tmp_path, 3)
    for _ in range(3):
        commit_update(ga, [gb])
    assert (ga.epoch, gc.epoch) == (4, 1)
    g = rejoin_and_check(ids[2], [ga, gb])
    assert g.epoch == 5


def test_member_removed_on_another_branch_rejoins_by_external_commit(tmp_path: Path) -> None:
    """c's own state says it was removed (by a commit of a branch that lost); on b's
    branch it is still a member, so its rejoin from b's GroupInfo replaces its leaf."""
    ids, (ga, gb, gc), _ = members(tmp_path, 3)
    rm = ga.remove([ids[2].fingerprint])
    ga.merge_pending_commit()
    assert gc.process(rm).removed and not gc.is_active
    with pytest.raises(NotAMember):
        gc.group_info()
    rejoin_and_check(ids[2], [gb])


def refused_everywhere(commit: bytes, groups: list[Group]) -> None:
    """Every member refuses `commit` with a typed error and stays as it was."""
    for m in groups:
        before = (m.epoch, m.epoch_authenticator(), sorted(m.members()))
        with pytest.raises(InvalidMessage, match="external commit"):
            m.process(commit)
        with pytest.raises(InvalidMessage, match="external commit"):
            m.preview(commit)
        assert (m.epoch, m.epoch_authenticator(), sorted(m.members())) == before
    for m in groups:  # still one group that talks
        for n in groups:
            if n is not m:
                assert n.process(m.encrypt(b"still here")).data == b"still here"


def test_a_member_removed_on_this_branch_cannot_rejoin_by_external_commit(
    tmp_path: Path,
) -> None:
    """Removals stay removed: c was removed on the branch whose GroupInfo it got (say
    from an offer it kept, or a modified client ignoring the rejoin rule); its external
    commit removes no leaf of its own there, and every member refuses it."""
    ids, (ga, gb, gc), _ = members(tmp_path, 3)
    rm = ga.remove([ids[2].fingerprint])
    ga.merge_pending_commit()
    gb.process(rm)
    gc.process(rm)
    _g, commit = ids[2].join_external(ga.group_info())
    refused_everywhere(commit, [ga, gb])


def test_a_stranger_with_a_group_info_cannot_join_by_external_commit(tmp_path: Path) -> None:
    """A GroupInfo is no invitation: someone who never was a member is refused."""
    _ids, (ga, gb), _ = members(tmp_path, 2)
    stranger = Identity.create(tmp_path / "x", os.urandom(32), durable=False)
    _g, commit = stranger.join_external(ga.group_info())
    refused_everywhere(commit, [ga, gb])


def test_join_external_rejects_bad_group_info(tmp_path: Path) -> None:
    ids, (ga, _gb), _ = members(tmp_path, 2)
    outsider = Identity.create(tmp_path / "x", os.urandom(32), durable=False)
    with pytest.raises(InvalidMessage):
        outsider.join_external(b"\x00\x01junk")
    with pytest.raises(InvalidMessage):
        outsider.join_external(ids[0].key_package())
    gi = bytearray(ga.group_info())
    gi[-5] ^= 1  # inside the signature
    with pytest.raises(InvalidMessage):
        outsider.join_external(bytes(gi))
    assert outsider.groups() == []


def test_losing_branch_of_several_epochs_stays_readable(tmp_path: Path) -> None:
    """A losing branch 2 commits long: a late message of its first epoch decrypts from the
    retained head (kept past-epoch secrets of that branch, not the winner's epoch 2)."""
    ids, (ga, gb, gc), _ = members(tmp_path, 3)
    b = ids[1]
    fork = b.snapshot(b"chat")
    commit_update(ga, [gb])
    late_e2 = ga.encrypt(b"sent in losing epoch 2")
    commit_update(ga, [gb])
    late_e3 = ga.encrypt(b"sent in losing epoch 3")
    head = b.snapshot(b"chat")
    c_commit = gc.update()
    gc.merge_pending_commit()
    b.rollback(b"chat", fork)
    assert gb.process(c_commit).authenticator == gc.epoch_authenticator()
    # The winner moves on: its own epoch 2 becomes a kept past epoch of the live group.
    commit_update(gc, [gb])
    assert gb.epoch == 3
    ev2 = b.process_readonly(b"chat", head, late_e2)
    ev3 = b.process_readonly(b"chat", head, late_e3)
    assert (ev2.data, ev2.message_epoch) == (b"sent in losing epoch 2", 2)
    assert (ev3.data, ev3.message_epoch) == (b"sent in losing epoch 3", 3)
    # The winner's epoch 2 is a different epoch 2: the live group cannot read it.
    with pytest.raises(InvalidMessage):
        gb.process(late_e2)
