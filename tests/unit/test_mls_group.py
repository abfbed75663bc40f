"""MLS group behaviour: membership changes, both-way messaging, typed failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node.crypto import (
    DEFAULT_CIPHERSUITE,
    Group,
    Identity,
    InvalidKeyPackage,
    InvalidMessage,
    InvalidSignature,
    MlsError,
    NoPendingCommit,
    NotAMember,
    PendingCommit,
    UnknownGroup,
    WelcomeNotForUs,
    WrongEpoch,
    fingerprint_of,
    inspect_key_package,
    key_package_ciphersuite,
    key_package_identity,
    verify,
)
from qpc_node.errors import QpcError, StatusCode

Member = tuple[Identity, Group]


def new_identity(root: Path, name: str) -> Identity:
    # Tests do not need fsync per operation; durability is tested in test_mls_persist.
    return Identity.create(root / name, os.urandom(32), durable=False)


def build_group(root: Path, n: int) -> list[Member]:
    """Creator plus n-1 members added by one commit, each joining from the Welcome."""
    creator = new_identity(root, "m0")
    g0 = creator.create_group()
    members: list[Member] = [(creator, g0)]
    others = [new_identity(root, f"m{i}") for i in range(1, n)]
    if others:
        _commit, welcome = g0.add([o.key_package() for o in others])
        g0.merge_pending_commit()
        members += [(o, o.join(welcome)) for o in others]
    return members


def broadcast(members: list[Member], sender: int, payload: bytes) -> None:
    ct = members[sender][1].encrypt(payload)
    for i, (_ident, g) in enumerate(members):
        if i == sender:
            continue
        ev = g.process(ct)
        assert ev.kind == "application"
        assert ev.data == payload
        assert ev.sender == members[sender][0].fingerprint


def deliver_commit(members: list[Member], committer: int, commit: bytes) -> None:
    for i, (_ident, g) in enumerate(members):
        if i != committer:
            ev = g.process(commit)
            assert ev.kind == "commit"
            assert ev.sender == members[committer][0].fingerprint


@pytest.mark.parametrize("n", [2, 8, 64])
def test_group_add_join_and_message_both_ways(tmp_path: Path, n: int) -> None:
    members = build_group(tmp_path, n)
    expected = sorted(ident.fingerprint for ident, _ in members)
    for _ident, g in members:
        assert sorted(g.members()) == expected
        assert g.epoch == 1
        assert g.ciphersuite == DEFAULT_CIPHERSUITE == 0x0001
    broadcast(members, 0, os.urandom(1024))
    broadcast(members, n - 1, b"reply from the last member")


def test_add_one_by_one_then_remove(tmp_path: Path) -> None:
    members = build_group(tmp_path, 1)
    for i in range(1, 4):
        newcomer = new_identity(tmp_path, f"late{i}")
        commit, welcome = members[0][1].add([newcomer.key_package()])
        members[0][1].merge_pending_commit()
        deliver_commit(members, 0, commit)
        members.append((newcomer, newcomer.join(welcome)))
    assert {g.epoch for _, g in members} == {3}
    broadcast(members, 2, b"four of us")


def test_removed_member_cannot_decrypt_after_removal(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    victim_ident, victim = members[2]
    commit = members[0][1].remove([victim_ident.fingerprint])
    members[0][1].merge_pending_commit()
    assert members[1][1].process(commit).removed is False
    assert victim.process(commit).removed is True
    assert victim.is_active is False
    remaining = members[:2]
    assert sorted(remaining[1][1].members()) == sorted(i.fingerprint for i, _ in remaining)
    ct = members[0][1].encrypt(b"after the removal")
    assert members[1][1].process(ct).data == b"after the removal"
    with pytest.raises(MlsError):
        victim.process(ct)
    with pytest.raises(NotAMember):
        victim.encrypt(b"still here?")


def test_remove_unknown_member_is_typed(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    with pytest.raises(NotAMember):
        members[0][1].remove(["00" * 32])
    with pytest.raises(MlsError):
        members[0][1].remove(["not hex"])


def test_update_advances_epoch_for_all(tmp_path: Path) -> None:
    members = build_group(tmp_path, 4)
    before = members[0][1].epoch
    commit = members[1][1].update()
    members[1][1].merge_pending_commit()
    deliver_commit(members, 1, commit)
    assert {g.epoch for _, g in members} == {before + 1}
    secrets = {g.export_secret("qpc test", b"ctx", 32) for _, g in members}
    assert len(secrets) == 1
    broadcast(members, 3, b"after update")


def test_old_epoch_message_is_rejected(tmp_path: Path) -> None:
    """A message of an epoch whose secrets are deleted is WrongEpoch (past epochs are kept
    for in-flight messages, see test_mls_robust.py; pruning deletes them)."""
    members = build_group(tmp_path, 2)
    (_a, ga), (_b, gb) = members
    stale = ga.encrypt(b"sent in epoch 1")
    commit = ga.update()
    ga.merge_pending_commit()
    gb.process(commit)
    assert gb.prune_past_epochs(0) == 1
    with pytest.raises(WrongEpoch) as info:
        gb.process(stale)
    assert isinstance(info.value, InvalidMessage)
    assert isinstance(info.value, QpcError)


def test_tampered_ciphertext_is_rejected(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    (_a, ga), (_b, gb) = members
    ct = bytearray(ga.encrypt(b"integrity matters"))
    ct[-1] ^= 0x01  # inside the AEAD tag
    with pytest.raises(InvalidMessage):
        gb.process(bytes(ct))
    with pytest.raises(InvalidMessage):
        gb.process(b"")
    # The group still works after the rejected message.
    assert gb.process(ga.encrypt(b"ok")).data == b"ok"


def test_welcome_for_someone_else(tmp_path: Path) -> None:
    members = build_group(tmp_path, 1)
    bob = new_identity(tmp_path, "bob")
    carol = new_identity(tmp_path, "carol")
    carol.key_package()  # carol has key material, just not the one in this Welcome
    _commit, welcome = members[0][1].add([bob.key_package()])
    with pytest.raises(WelcomeNotForUs):
        carol.join(welcome)
    with pytest.raises(InvalidMessage):
        carol.join(b"\x00\x01garbage")
    assert bob.join(welcome).epoch == 1


def test_leave_by_self_remove_proposal(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    leaver_ident, leaver = members[2]
    proposal = leaver.leave()
    ev = members[0][1].process(proposal)
    assert ev.kind == "proposal"
    assert ev.sender == leaver_ident.fingerprint
    assert members[1][1].process(proposal).kind == "proposal"
    commit, welcome = members[0][1].commit_pending()
    members[0][1].merge_pending_commit()
    assert welcome is None
    assert members[1][1].process(commit).kind == "commit"
    assert leaver.process(commit).removed is True
    assert leaver_ident.fingerprint not in members[0][1].members()
    assert len(members[1][1].members()) == 2


def test_groups_listing_and_unknown_group(tmp_path: Path) -> None:
    ident = new_identity(tmp_path, "solo")
    g1 = ident.create_group(b"group-one")
    g2 = ident.create_group()
    assert sorted(ident.groups()) == sorted([g1.group_id, g2.group_id])
    assert ident.group(b"group-one").epoch == 0
    with pytest.raises(UnknownGroup):
        ident.group(b"no such group")
    with pytest.raises(MlsError):
        ident.create_group(b"group-one")


def test_sign_and_verify(tmp_path: Path) -> None:
    ident = new_identity(tmp_path, "signer")
    assert len(ident.public_key) == 32
    assert fingerprint_of(ident.public_key) == ident.fingerprint
    assert len(ident.fingerprint) == 64
    sig = ident.sign(b"challenge-123")
    verify(ident.public_key, b"challenge-123", sig)
    with pytest.raises(InvalidSignature):
        verify(ident.public_key, b"challenge-124", sig)
    with pytest.raises(InvalidSignature):
        verify(b"short", b"challenge-123", sig)
    with pytest.raises(InvalidSignature):
        verify(ident.public_key, b"challenge-123", sig[:10])


def test_key_package_inspection_without_identity(tmp_path: Path) -> None:
    ident = new_identity(tmp_path, "kp")
    kp = ident.key_package()
    info = inspect_key_package(kp)
    assert info.ciphersuite == 0x0001 == key_package_ciphersuite(kp)
    assert info.fingerprint == ident.fingerprint == key_package_identity(kp)
    assert info.signature_key == ident.public_key
    assert info.not_after > info.not_before
    assert info.last_resort is False
    assert len(info.hash_ref) == 32
    assert inspect_key_package(ident.key_package(last_resort=True)).last_resort is True
    tampered = bytearray(kp)
    tampered[len(tampered) // 2] ^= 0xFF
    with pytest.raises(InvalidKeyPackage):
        inspect_key_package(bytes(tampered))
    with pytest.raises(InvalidKeyPackage):
        inspect_key_package(b"")


def test_add_rejects_bad_key_package(tmp_path: Path) -> None:
    members = build_group(tmp_path, 1)
    with pytest.raises(InvalidKeyPackage):
        members[0][1].add([b"not a key package"])
    with pytest.raises(MlsError):
        members[0][1].add([])
    assert members[0][1].epoch == 0


# --- Own commits stay pending until the caller merges them (issue 10: no fork from a failed
# send). The agent merges only after the node stored the fan-out, and clears on failure.


def test_add_leaves_commit_pending_and_clear_keeps_the_old_epoch(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    (_a, ga), (_b, gb) = members
    carol = new_identity(tmp_path, "carol")
    _commit, _welcome = ga.add([carol.key_package()])
    # The send of this commit "failed": nobody else has it.
    assert ga.has_pending_commit() is True
    assert ga.epoch == gb.epoch == 1
    assert len(ga.members()) == 2
    ga.clear_pending_commit()
    assert ga.has_pending_commit() is False
    assert ga.epoch == 1
    # Usable on the old epoch, both ways, for everyone.
    broadcast(members, 0, b"still epoch 1")
    broadcast(members, 1, b"and back")
    # A new commit after the cleared one works normally.
    commit, welcome = ga.add([carol.key_package()])
    ga.merge_pending_commit()
    deliver_commit(members, 0, commit)
    members.append((carol, carol.join(welcome)))
    broadcast(members, 2, b"carol is in")


def test_pending_commit_refuses_encrypt_and_further_commits(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    ga = members[0][1]
    ga.update()
    with pytest.raises(PendingCommit) as info:
        ga.encrypt(b"would be for an epoch that is about to end")
    assert isinstance(info.value, MlsError)
    assert info.value.code == StatusCode.FAILED_PRECONDITION
    carol = new_identity(tmp_path, "carol")
    with pytest.raises(PendingCommit):
        ga.add([carol.key_package()])
    with pytest.raises(PendingCommit):
        ga.remove([members[2][0].fingerprint])
    with pytest.raises(PendingCommit):
        ga.update()
    with pytest.raises(PendingCommit):
        ga.commit_pending()
    with pytest.raises(PendingCommit):
        ga.leave()
    # Reading the group still works meanwhile.
    assert ga.epoch == 1
    assert members[0][1].process(members[1][1].encrypt(b"incoming")).data == b"incoming"


def test_merge_advances_epoch_and_the_welcomed_member_reads(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    ga = members[0][1]
    carol = new_identity(tmp_path, "carol")
    commit, welcome = ga.add([carol.key_package()])
    assert ga.epoch == 1
    ga.merge_pending_commit()
    assert ga.has_pending_commit() is False
    assert ga.epoch == 2
    deliver_commit(members, 0, commit)
    members.append((carol, carol.join(welcome)))
    assert {g.epoch for _, g in members} == {2}
    broadcast(members, 0, b"welcome, carol")
    broadcast(members, 2, b"thanks")


def test_merge_or_clear_without_pending_commit(tmp_path: Path) -> None:
    """merge with nothing pending is an error (a change did not happen); clear is a no-op."""
    members = build_group(tmp_path, 2)
    ga = members[0][1]
    with pytest.raises(NoPendingCommit) as info:
        ga.merge_pending_commit()
    assert info.value.code == StatusCode.FAILED_PRECONDITION
    ga.clear_pending_commit()
    assert ga.epoch == 1
    broadcast(members, 0, b"unchanged")


def test_commit_superseded_by_another_members_commit(tmp_path: Path) -> None:
    """Another member's commit for the same epoch wins; ours is gone and merge says so."""
    members = build_group(tmp_path, 2)
    (_a, ga), (_b, gb) = members
    ga.update()
    theirs = gb.update()
    gb.merge_pending_commit()
    assert ga.process(theirs).kind == "commit"
    assert ga.has_pending_commit() is False
    with pytest.raises(NoPendingCommit):
        ga.merge_pending_commit()
    assert ga.epoch == gb.epoch == 2
    broadcast(members, 0, b"on their epoch")


@pytest.mark.parametrize("then", ["merge", "clear"])
def test_pending_commit_survives_reopen(tmp_path: Path, then: str) -> None:
    secret = os.urandom(32)
    a = Identity.create(tmp_path / "a", secret)
    b = new_identity(tmp_path, "b")
    ga = a.create_group(b"chat")
    _c, welcome = ga.add([b.key_package()])
    ga.merge_pending_commit()
    gb = b.join(welcome)
    commit = ga.update()
    del a, ga
    a2 = Identity.open(tmp_path / "a", secret)
    ga2 = a2.group(b"chat")
    assert ga2.has_pending_commit() is True
    assert ga2.epoch == 1
    with pytest.raises(PendingCommit):
        ga2.encrypt(b"not yet")
    if then == "merge":
        ga2.merge_pending_commit()
        assert gb.process(commit).kind == "commit"
        assert ga2.epoch == gb.epoch == 2
    else:
        ga2.clear_pending_commit()
        assert ga2.epoch == gb.epoch == 1
    assert gb.process(ga2.encrypt(b"after reopen")).data == b"after reopen"
    assert ga2.process(gb.encrypt(b"and back")).data == b"and back"
    # The merge/clear itself was persisted.
    del a2, ga2
    ga3 = Identity.open(tmp_path / "a", secret).group(b"chat")
    assert ga3.has_pending_commit() is False
    assert ga3.epoch == gb.epoch
