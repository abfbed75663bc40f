"""MLS core for groups on a partitioned mesh (issue 14, Stage A): the sender ratchet
window, kept past-epoch secrets, epoch authenticators, proposals by any member with
their refs, commit facts in Events, and the committer list extension."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node.crypto import (
    COMMITTERS_EXTENSION,
    MAX_PAST_EPOCHS,
    RATCHET_MAX_FORWARD,
    RATCHET_OUT_OF_ORDER,
    DuplicateMessage,
    Group,
    Identity,
    InvalidMessage,
    MlsArgumentError,
    NotAMember,
    PendingCommit,
    RatchetWindowError,
    WrongEpoch,
)

Member = tuple[Identity, Group]


def new_identity(root: Path, name: str) -> Identity:
    return Identity.create(root / name, os.urandom(32), durable=False)


def build_group(root: Path, n: int) -> list[Member]:
    creator = new_identity(root, "m0")
    g0 = creator.create_group()
    members: list[Member] = [(creator, g0)]
    others = [new_identity(root, f"m{i}") for i in range(1, n)]
    if others:
        _commit, welcome = g0.add([o.key_package() for o in others])
        g0.merge_pending_commit()
        members += [(o, o.join(welcome)) for o in others]
    return members


def commit_update(members: list[Member], committer: int) -> bytes:
    """One self-update commit by `committer`, merged there and processed by the rest."""
    g = members[committer][1]
    commit = g.update()
    g.merge_pending_commit()
    for i, (_ident, other) in enumerate(members):
        if i != committer:
            assert other.process(commit).kind == "commit"
    return commit


def test_constants() -> None:
    assert RATCHET_OUT_OF_ORDER >= 100
    assert RATCHET_MAX_FORWARD == 1000
    assert MAX_PAST_EPOCHS == 32
    assert COMMITTERS_EXTENSION == 0xF0A1


# --- 1. sender ratchet window ---------------------------------------------------------


def test_hundred_messages_of_one_sender_in_reverse_all_decrypt(tmp_path: Path) -> None:
    (_a, ga), (_b, gb) = build_group(tmp_path, 2)
    sent = [ga.encrypt(b"m%d" % i) for i in range(100)]
    for i in reversed(range(100)):
        ev = gb.process(sent[i])
        assert (ev.kind, ev.data) == ("application", b"m%d" % i)
    # A second delivery of any of them is a typed duplicate, not junk.
    with pytest.raises(DuplicateMessage) as info:
        gb.process(sent[50])
    assert isinstance(info.value, InvalidMessage)


def test_beyond_the_out_of_order_window_is_typed(tmp_path: Path) -> None:
    (_a, ga), (_b, gb) = build_group(tmp_path, 2)
    sent = [ga.encrypt(b"m%d" % i) for i in range(RATCHET_OUT_OF_ORDER + 2)]
    gb.process(sent[-1])
    # The newest RATCHET_OUT_OF_ORDER generations decrypt in any order; older ones do not.
    oldest_in_window = len(sent) - RATCHET_OUT_OF_ORDER
    assert gb.process(sent[oldest_in_window]).data == b"m%d" % oldest_in_window
    with pytest.raises(RatchetWindowError):
        gb.process(sent[oldest_in_window - 1])


def test_max_forward_distance(tmp_path: Path) -> None:
    (_a, ga), (_b, gb), (_c, gc) = build_group(tmp_path, 3)
    sent = [ga.encrypt(b"m%d" % i) for i in range(RATCHET_MAX_FORWARD + 2)]
    # Generation 1000: 1000 skipped, the furthest ahead that decrypts.
    assert gb.process(sent[RATCHET_MAX_FORWARD]).data == b"m%d" % RATCHET_MAX_FORWARD
    # Generation 1001 at a member that has seen nothing from the sender: too far.
    with pytest.raises(RatchetWindowError):
        gc.process(sent[RATCHET_MAX_FORWARD + 1])
    # ... and the refusal changed nothing: the next in-window message still decrypts.
    assert gc.process(sent[5]).data == b"m5"


# --- 2. past epochs ------------------------------------------------------------------


def test_message_from_epoch_n_decrypts_after_three_commits(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    (_a, ga), (b, gb), (_c, gc) = members
    n = ga.epoch
    late = gb.encrypt(b"sent in epoch n")
    for committer in (0, 2, 1):
        commit_update(members, committer)
    assert ga.epoch == gc.epoch == n + 3
    for g in (ga, gc):  # a created the group, c joined it: both keep past epochs
        assert g.past_epochs()[-3:] == [n, n + 1, n + 2]
        ev = g.process(late)
        assert (ev.kind, ev.data, ev.sender) == ("application", b"sent in epoch n", b.fingerprint)
        assert (ev.epoch, ev.message_epoch) == (n + 3, n)
    # Pruning to the newest two drops epoch n: now it is a typed WrongEpoch.
    kept = len(gc.past_epochs())
    assert gc.prune_past_epochs(2) == kept - 2
    assert gc.past_epochs() == [n + 1, n + 2]
    with pytest.raises(WrongEpoch):
        gc.process(late)
    assert gc.process(gb.encrypt(b"current epoch")).data == b"current epoch"


def test_prune_counts_and_zero_deletes_all(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    (_a, ga), (_b, gb) = members
    old = ga.encrypt(b"epoch 1")
    for _ in range(3):
        commit_update(members, 0)
    assert gb.past_epochs() == [1, 2, 3]
    assert gb.prune_past_epochs(5) == 0
    assert gb.prune_past_epochs(1) == 2
    assert gb.past_epochs() == [3]
    assert gb.prune_past_epochs(0) == 1
    assert gb.past_epochs() == []
    with pytest.raises(WrongEpoch):
        gb.process(old)


def test_past_epochs_are_capped(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    for _ in range(MAX_PAST_EPOCHS + 3):
        commit_update(members, 1)
    for _ident, g in members:
        kept = g.past_epochs()
        assert len(kept) == MAX_PAST_EPOCHS
        assert kept[-1] == g.epoch - 1


def test_past_epochs_survive_reopen(tmp_path: Path) -> None:
    secret = os.urandom(32)
    a = new_identity(tmp_path, "a")
    b = Identity.create(tmp_path / "b", secret, durable=False)
    ga = a.create_group()
    _c, welcome = ga.add([b.key_package()])
    ga.merge_pending_commit()
    gb = b.join(welcome)
    early = ga.encrypt(b"epoch 1")
    for _ in range(2):
        commit = ga.update()
        ga.merge_pending_commit()
        gb.process(commit)
    del gb, b
    gb2 = Identity.open(tmp_path / "b", secret, durable=False).group(ga.group_id)
    assert gb2.past_epochs() == [1, 2]
    assert gb2.process(early).data == b"epoch 1"


# --- 3. epoch authenticator ------------------------------------------------------------


def test_epoch_authenticator_agrees_and_changes(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    auths = {g.epoch_authenticator() for _i, g in members}
    assert len(auths) == 1
    first = auths.pop()
    assert len(first) == 32
    commit_update(members, 1)
    auths = {g.epoch_authenticator() for _i, g in members}
    assert len(auths) == 1
    assert auths.pop() != first


# --- 4./5. proposals by any member, Event facts ---------------------------------------


def test_member_proposes_add_committer_covers_it(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    (a, ga), (b, gb), (_c, gc) = members
    d = new_identity(tmp_path, "d")
    proposal, ref = gb.propose_add(d.key_package())
    assert gb.pending_proposals() == [ref]
    for g in (ga, gc):
        ev = g.process(proposal)
        assert (ev.kind, ev.proposal_ref, ev.sender) == ("proposal", ref, b.fingerprint)
        assert g.pending_proposals() == [ref]
    commit, welcome = ga.commit_pending()
    assert welcome is not None
    mine = ga.merge_pending_commit()
    assert (mine.kind, mine.sender, mine.covered, mine.added) == (
        "commit",
        a.fingerprint,
        [ref],
        [d.fingerprint],
    )
    assert not mine.self_update_only
    assert mine.authenticator == ga.epoch_authenticator()
    for g in (gb, gc):
        ev = g.process(commit)
        assert (ev.kind, ev.covered, ev.added, ev.removed_members) == (
            "commit",
            [ref],
            [d.fingerprint],
            [],
        )
        assert ev.sender_leaf == mine.sender_leaf == 0
        assert ev.authenticator == mine.authenticator
        assert not ev.committers_changed
        assert g.pending_proposals() == []
    gd = d.join(welcome)
    assert gd.epoch_authenticator() == ga.epoch_authenticator()


def test_member_proposes_remove_update_and_leave(tmp_path: Path) -> None:
    members = build_group(tmp_path, 4)
    (_a, ga), (_b, gb), (c, gc), (_d, gd) = members
    p_rm, r_rm = gb.propose_remove(c.fingerprint)
    p_up, r_up = gd.propose_update()
    ga.process(p_rm)
    ga.process(p_up)
    gb.process(p_up)
    gc.process(p_rm)
    gc.process(p_up)
    gd.process(p_rm)
    for g in (ga, gb, gc, gd):
        assert sorted(g.pending_proposals()) == sorted([r_rm, r_up])
    commit, welcome = ga.commit_pending()
    assert welcome is None
    mine = ga.merge_pending_commit()
    assert sorted(mine.covered) == sorted([r_rm, r_up])
    assert mine.removed_members == [c.fingerprint]
    assert not mine.self_update_only
    assert gc.process(commit).removed
    for g in (gb, gd):
        ev = g.process(commit)
        assert ev.removed_members == [c.fingerprint] and not ev.removed
    assert c.fingerprint not in ga.members()
    # An update alone is a self-update-only commit.
    p_up2, r_up2 = gb.propose_update()
    ga.process(p_up2)
    gd.process(p_up2)
    commit, _w = ga.commit_pending()
    ev_a = ga.merge_pending_commit()
    assert ev_a.covered == [r_up2] and ev_a.self_update_only
    assert gd.process(commit).self_update_only
    gb.process(commit)
    # Leave is a proposal of our own removal, committed by another member.
    p_leave, r_leave = gd.propose_leave()
    assert gd.pending_proposals() == [r_leave]
    ga.process(p_leave)
    gb.process(p_leave)
    commit, _w = gb.commit_pending()
    ev_b = gb.merge_pending_commit()
    assert ev_b.covered == [r_leave]
    assert ev_b.removed_members == [members[3][0].fingerprint]
    assert gd.process(commit).removed
    ga.process(commit)
    assert ga.epoch_authenticator() == gb.epoch_authenticator()


def test_proposal_not_covered_leaves_the_store(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    (_a, ga), (_b, gb), (c, gc) = members
    _p, ref = gb.propose_remove(c.fingerprint)  # a never receives it
    commit = ga.update()
    ga.merge_pending_commit()
    ev = gb.process(commit)
    assert ev.covered == [] and ev.self_update_only
    # The proposal was for the old epoch: gone, the proposer must propose again.
    assert gb.pending_proposals() == []
    gc.process(commit)
    _p2, ref2 = gb.propose_remove(c.fingerprint)
    assert ref2 != ref and gb.pending_proposals() == [ref2]
    gb.clear_proposals()
    assert gb.pending_proposals() == []


def test_a_request_proposed_again_after_a_restart_gets_its_queued_ref(tmp_path: Path) -> None:
    """A proposal made just before the process died stays in our store; the request is
    proposed again after the restart. Ed25519 signs the same content the same way, so the
    new proposal has the same ref: the call returns it (before: 'proposal was not queued
    in our own store', and the request was given up)."""
    secret = os.urandom(32)
    a = new_identity(tmp_path, "a")
    b = Identity.create(tmp_path / "b", secret, durable=False)
    c, d, e = (new_identity(tmp_path, n) for n in "cde")
    ga = a.create_group()
    _c, welcome = ga.add([b.key_package(), c.key_package(), d.key_package()])
    ga.merge_pending_commit()
    gb = b.join(welcome)
    kp_e = e.key_package()
    _p_rm, r_rm = gb.propose_remove(c.fingerprint)
    _p_add, r_add = gb.propose_add(kp_e)
    del gb, b  # a crash: the proposals were never sent
    b2 = Identity.open(tmp_path / "b", secret, durable=False)
    gb2 = b2.group(ga.group_id)
    assert sorted(gb2.pending_proposals()) == sorted([r_rm, r_add])
    p_rm2, r_rm2 = gb2.propose_remove(c.fingerprint)
    p_add2, r_add2 = gb2.propose_add(kp_e)
    assert (r_rm2, r_add2) == (r_rm, r_add)
    assert sorted(gb2.pending_proposals()) == sorted([r_rm, r_add])
    # The re-sent proposals are the ones a committer covers.
    ga.process(p_rm2)
    ga.process(p_add2)
    commit, welcome2 = ga.commit_pending()
    mine = ga.merge_pending_commit()
    assert sorted(mine.covered) == sorted([r_rm, r_add])
    assert welcome2 is not None and mine.removed_members == [c.fingerprint]
    assert gb2.process(commit).authenticator == ga.epoch_authenticator()
    # A self-update is never the same twice; a different removal is a new ref.
    _p, r_up = gb2.propose_update()
    _p, r_up2 = gb2.propose_update()
    assert r_up != r_up2
    _p, r_d = gb2.propose_remove(d.fingerprint)
    assert r_d not in (r_up, r_up2) and len(gb2.pending_proposals()) == 3


def test_proposal_errors_are_typed(tmp_path: Path) -> None:
    (a, ga), (_b, gb) = build_group(tmp_path, 2)
    with pytest.raises(NotAMember):
        gb.propose_remove("00" * 32)
    with pytest.raises(MlsArgumentError):
        gb.propose_remove("zz")
    with pytest.raises(MlsArgumentError):
        gb.propose_remove(gb.members()[1] if gb.members()[0] == a.fingerprint else a.fingerprint)
    with pytest.raises(InvalidMessage):
        gb.propose_add(b"not a key package")
    ga.update()
    with pytest.raises(PendingCommit):
        ga.propose_update()


# --- 6. committer list -----------------------------------------------------------------


def test_committer_list_starts_with_the_creator_and_changes_by_commit(tmp_path: Path) -> None:
    members = build_group(tmp_path, 3)
    (a, ga), (b, gb), (c, gc) = members
    for _i, g in members:
        assert g.committers() == [a.fingerprint]
    new = [b.fingerprint, c.fingerprint, a.fingerprint]
    p_up, r_up = gc.propose_update()
    ga.process(p_up)
    gb.process(p_up)
    commit, _w = ga.commit_pending(committers=new)
    mine = ga.merge_pending_commit()
    assert mine.committers_changed and mine.covered == [r_up]
    assert not mine.self_update_only  # the list change is a GroupContextExtensions
    for g in (gb, gc):
        ev = g.process(commit)
        assert ev.committers_changed
    for _i, g in members:
        assert g.committers() == new
    # The new first committer commits an add, setting the list again in the same commit.
    d = new_identity(tmp_path, "d")
    commit, welcome = gb.add([d.key_package()], committers=[c.fingerprint, b.fingerprint])
    assert gb.merge_pending_commit().added == [d.fingerprint]
    for g in (ga, gc):
        assert g.process(commit).committers_changed
    gd = d.join(welcome)
    assert gd.committers() == [c.fingerprint, b.fingerprint]
    # A leaf that self-updated (new leaf node) still supports the extension.
    commit = gd.update()
    gd.merge_pending_commit()
    for g in (ga, gb, gc):
        g.process(commit)
    commit = gc.remove([a.fingerprint], committers=[d.fingerprint])
    ev = gc.merge_pending_commit()
    assert ev.removed_members == [a.fingerprint] and ev.committers_changed
    assert ga.process(commit).removed
    for g in (gb, gd):
        g.process(commit)
        assert g.committers() == [d.fingerprint]
    assert gb.epoch_authenticator() == gc.epoch_authenticator() == gd.epoch_authenticator()


def test_commit_without_list_change_reports_none(tmp_path: Path) -> None:
    members = build_group(tmp_path, 2)
    commit = members[1][1].update()
    ev = members[1][1].merge_pending_commit()
    assert not ev.committers_changed and ev.self_update_only and ev.covered == []
    assert not members[0][1].process(commit).committers_changed


@pytest.mark.parametrize(
    "bad",
    [[], ["zz"], ["ab" * 31], ["ab" * 32, "AB" * 32], ["cd" * 32] * 256],
)
def test_bad_committer_lists_are_argument_errors(tmp_path: Path, bad: list[str]) -> None:
    (_a, ga), _b = build_group(tmp_path, 2)
    with pytest.raises(MlsArgumentError):
        ga.commit_pending(committers=bad)
    assert not ga.has_pending_commit()


def test_kept_past_epochs_do_not_grow_the_bytes_written_per_message(tmp_path: Path) -> None:
    """OpenMLS rewrites all message secrets, past epochs included, on every message; the
    store keeps each past epoch in its own record, so only the current one is logged."""
    members = build_group(tmp_path, 8)
    (a, ga), (b, gb) = members[0], members[1]

    def per_message() -> int:
        before = b.storage_stats()["bytes_written"]
        for _ in range(5):
            gb.process(ga.encrypt(b"x" * 100))
        return (b.storage_stats()["bytes_written"] - before) // 5

    base = per_message()
    for _ in range(10):
        commit_update(members, 0)
    assert len(gb.past_epochs()) == 10
    assert per_message() < 2 * base
    assert a.fingerprint in gb.members()


def test_committer_skips_its_own_removal_and_own_update(tmp_path: Path) -> None:
    """A committer holding a proposal to remove itself (its own leave, or another
    member's request) still commits the rest; before, every commit failed with
    CannotRemoveSelf. Its own Update is renewed by the commit's path, not covered."""
    members = build_group(tmp_path, 4)
    (_a, ga), (b, gb), (_c, gc), (d, gd) = members
    p_leave, r_leave = gb.propose_leave()
    p_up, r_up = gb.propose_update()
    p_rm, r_rm = gc.propose_remove(d.fingerprint)
    for g in (ga, gc, gd):
        g.process(p_leave)
        g.process(p_up)
    for g in (ga, gb, gd):
        g.process(p_rm)
    commit, _w = gb.commit_pending()
    ev = gb.merge_pending_commit()
    assert ev.covered == [r_rm]
    assert ev.removed_members == [d.fingerprint]
    assert gd.process(commit).removed
    for g in (ga, gc):
        assert g.process(commit).covered == [r_rm]
    # b's leave is committed by another member in the next epoch.
    p_leave2, r_leave2 = gb.propose_leave()
    ga.process(p_leave2)
    gc.process(p_leave2)
    commit, _w = ga.commit_pending()
    assert ga.merge_pending_commit().removed_members == [b.fingerprint]
    assert gb.process(commit).removed
    gc.process(commit)
    assert ga.epoch_authenticator() == gc.epoch_authenticator()
    assert r_leave != r_leave2 and r_up
