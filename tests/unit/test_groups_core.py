"""The sans-IO Stage A group core (qpc_node/groups/core.py), on synthetic inputs.

The harness over the real MLS core is tests/sim/test_groups_stage_a.py; these pin
the decisions: who commits when, what is re-proposed, what is pulled and served,
what past epochs are kept.
"""

from __future__ import annotations

import pytest

from qpc_node.groups.core import (
    DAY_MS,
    Commit,
    CommitInfo,
    Done,
    GroupConfig,
    GroupCore,
    IntentError,
    IntentKind,
    Propose,
    Prune,
    Resend,
    SendIntent,
    SendPull,
    Warn,
    effective_committers,
    topped_up,
)

A, B, C, D, E = (c * 64 for c in "abcde")
ABC = (A, B, C)
CFG = GroupConfig(
    committer_timeout_ms=10_000,
    quiescence_ms=100,
    max_commit_delay_ms=1_000,
    pull_after_ms=500,
    pull_retry_ms=2_000,
    max_expiry_ms=DAY_MS,
    max_past_epochs=4,
    max_attempts=3,
)


def core(
    me: str,
    members: tuple[str, ...] = (A, B, C, D),
    committers: tuple[str, ...] = ABC,
    epoch: int = 1,
    now: int = 0,
) -> GroupCore:
    return GroupCore(me, epoch, members, committers, now, CFG)


def commit_info(
    g: GroupCore,
    sender: str,
    *,
    covered: tuple[bytes, ...] = (),
    members: tuple[str, ...] | None = None,
    committers: tuple[str, ...] | None = None,
    message: bytes | None = None,
) -> CommitInfo:
    ms = members if members is not None else g.members
    return CommitInfo(
        parent_epoch=g.epoch,
        sender=sender,
        covered=covered,
        added=tuple(m for m in ms if m not in g.members),
        removed=tuple(m for m in g.members if m not in ms),
        committers=committers if committers is not None else g.stored_committers,
        members=ms,
        authenticator=b"auth%d" % g.epoch,
        message=message if message is not None else b"commit-%d" % g.epoch,
    )


def test_effective_committers_drop_departed_and_fall_back_to_the_first_member() -> None:
    assert effective_committers([B, E, A], [A, B, C, D]) == (B, A)
    assert effective_committers([E], [C, A, B]) == (C,)
    assert effective_committers([], [C, A, B]) == (C,)
    assert effective_committers([A, A, B], [A, B]) == (A, B)
    assert topped_up([B, A], [A, B, C, D], 3) == (B, A, C)
    assert topped_up([E, B], [A, B, C], 2) == (B, A)
    assert topped_up([A, B], [A, B, C, D], 3, exclude=A) == (B, C, D)


def test_member_request_is_a_proposal_then_a_note_and_the_committer_commits_after_quiet() -> None:
    b, a = core(D), core(A)
    iid, acts = b.request(IntentKind.ADD, E, 0)
    assert acts == [Propose(iid, IntentKind.ADD, E)]
    acts = b.proposed(iid, b"ref1", 10)
    assert len(acts) == 1 and isinstance(acts[0], SendIntent)
    assert acts[0].note.proposal_ref == b"ref1" and acts[0].note.epoch == 1
    # b is not the committer: nothing to commit, whatever the time.
    assert b.tick(50_000) == []
    a.on_proposal(D, b"ref1", 1, 20)
    assert a.next_deadline() == 120
    assert a.tick(119) == []
    assert a.tick(120) == [Commit(None)]
    assert a.tick(121) == []  # one commit in flight at a time


def test_a_stream_of_proposals_is_committed_by_max_commit_delay() -> None:
    a = core(A)
    for t in range(0, 1_000, 50):
        a.on_proposal(B, b"r%d" % t, 1, t)
        assert a.tick(t) == []
    assert a.tick(1_000) == [Commit(None)]


def test_covered_intent_completes_uncovered_one_is_reproposed_then_given_up() -> None:
    b = core(B)
    i1, _ = b.request(IntentKind.UPDATE, "", 0)
    b.proposed(i1, b"u1", 0)
    i2, _ = b.request(IntentKind.REMOVE, D, 0)
    b.proposed(i2, b"r1", 0)
    acts = b.on_commit(commit_info(b, A, covered=(b"u1",)), 10)
    assert [i.intent_id for i in b.intents()] == [i2]
    assert acts == [Done(i1, applied=True), Propose(i2, IntentKind.REMOVE, D)]
    assert b.statistics(10).reproposals == 1
    for n in range(2, CFG.max_attempts + 1):
        b.proposed(i2, b"r%d" % n, 20)
        acts = b.on_commit(commit_info(b, A), 30)
    assert b.intents() == []
    assert len(acts) == 2 and isinstance(acts[0], Warn)
    assert acts[1] == Done(i2, applied=False)
    assert b.statistics(30).intents_given_up == 1


def test_remove_intent_completes_when_target_is_gone_whoever_removed_it() -> None:
    b = core(B)
    iid, _ = b.request(IntentKind.REMOVE, D, 0)
    b.proposed(iid, b"r", 0)
    assert b.on_commit(commit_info(b, A, members=(A, B, C)), 5) == [Done(iid, applied=True)]
    assert b.intents() == []


def test_bad_requests_are_typed_errors() -> None:
    b = core(D, members=(A, B, C, D))
    with pytest.raises(IntentError):
        b.request(IntentKind.ADD, C, 0)  # already a member
    with pytest.raises(IntentError):
        b.request(IntentKind.REMOVE, E, 0)  # not a member
    with pytest.raises(IntentError):
        b.request(IntentKind.ADD, "", 0)
    b.request(IntentKind.ADD, E, 0)
    with pytest.raises(IntentError):
        b.request(IntentKind.ADD, E, 0)  # already pending
    iid, acts = b.request(IntentKind.REMOVE, D, 0)  # removing oneself is leaving
    assert acts == [Propose(iid, IntentKind.LEAVE, "")]


def test_failover_next_committer_commits_after_timeout_and_rotates_the_list() -> None:
    b = core(B, committers=(A, B, C))
    c = core(C, committers=(A, B, C))
    for g in (b, c):
        g.on_proposal(D, b"p", 1, 1_000)
    assert b.next_deadline() == 11_000
    assert b.tick(10_999) == []
    assert b.tick(11_000) == [Commit((B, C, A))]
    assert c.tick(11_000) == []
    assert c.tick(21_000) == [Commit((C, A, B))]
    # c sees b's commit first: nothing left to do for it.
    c2 = core(C, committers=(A, B, C))
    c2.on_proposal(D, b"p", 1, 1_000)
    c2.on_commit(commit_info(c2, B, covered=(b"p",), committers=(B, C, A)), 11_100)
    assert c2.committers == (B, C, A)
    assert c2.tick(30_000) == []
    assert c2.statistics(30_000).off_list_commits == 1


def test_committer_leaving_hands_over_first_then_proposes_its_leave() -> None:
    a = core(A)
    iid, acts = a.request(IntentKind.LEAVE, "", 0)
    assert acts == [Commit((B, C, D))]
    acts = a.on_commit(commit_info(a, A, committers=(B, C, D)), 10)
    assert acts == [Propose(iid, IntentKind.LEAVE, "")]
    a.proposed(iid, b"leave", 10)
    assert a.tick(100_000) == []  # no longer a committer
    # B (now first) commits it; A is gone afterwards.
    acts = a.on_commit(
        commit_info(a, B, covered=(b"leave",), members=(B, C, D), committers=(B, C, D)), 20
    )
    assert a.removed and acts == [Done(iid, applied=True)]


def test_committer_own_update_is_a_commit() -> None:
    a = core(A)
    iid, acts = a.request(IntentKind.UPDATE, "", 0)
    assert acts == [Commit(None)]
    assert a.on_commit(commit_info(a, A), 5) == [Done(iid, applied=True)]
    assert a.intents() == []


def test_committers_own_commit_lost_to_another_is_made_again() -> None:
    a = core(A, committers=(A, B))
    a.request(IntentKind.UPDATE, "", 0)
    a.commit_superseded()
    acts = a.on_commit(commit_info(a, B, committers=(B, A)), 5)
    # a is now second: its update becomes a proposal for B to commit.
    assert len(acts) == 1 and isinstance(acts[0], Propose)


def test_failed_commit_is_retried_after_the_retry_delay() -> None:
    a = core(A)
    a.on_proposal(B, b"p", 1, 0)
    assert a.tick(200) == [Commit(None)]
    a.commit_failed(300)
    assert a.tick(300) == []
    assert a.tick(301) == []
    assert a.next_deadline() == 300 + CFG.commit_retry_ms
    assert a.tick(300 + CFG.commit_retry_ms) == [Commit(None)]


def test_future_messages_trigger_pulls_rotating_over_candidates() -> None:
    d = core(D, committers=(A, B))
    assert d.tick(10_000) == []
    assert d.committers == (A, B)
    d.on_future(3, 1_000)
    assert d.tick(1_499) == []
    assert d.tick(1_500) == [SendPull(A, 1)]
    assert d.tick(2_000) == []  # retry interval
    assert d.tick(3_500) == [SendPull(B, 1)]
    assert d.tick(5_500) == [SendPull(C, 1)]
    # Commits arrive up to the held epoch: no more pulls.
    d.on_commit(commit_info(d, A), 5_600)
    d.on_commit(commit_info(d, A), 5_700)
    assert d.epoch == 3
    assert d.tick(60_000) == []
    assert d.statistics(60_000).pulls_sent == 3


def test_pull_is_answered_from_the_commit_log_deduplicated_and_bounded() -> None:
    a = core(A)
    for e in range(1, 6):
        a.on_commit(commit_info(a, A, message=b"c%d" % e), e)
    a.on_commit(commit_info(a, A, message=b"c5"), 6)  # same bytes: logged once
    assert a.on_pull(D, 3, 10) == [Resend(D, (b"c3", b"c4", b"c5"))]
    assert a.on_pull(D, 3, 11) == []  # asked again right away: once is enough
    assert a.on_pull(D, 3, 10 + CFG.pull_retry_ms) == [Resend(D, (b"c3", b"c4", b"c5"))]
    assert a.on_pull(D, 7, 10) == []  # nothing newer than its epoch
    assert a.on_pull(A, 1, 10) == []
    cfg = GroupConfig(commit_log_len=2, max_pull_answer=1)
    small = GroupCore(A, 1, (A, B), (A,), 0, cfg)
    for e in range(1, 5):
        small.on_commit(commit_info(small, A, message=b"c%d" % e), e)
    assert small.on_pull(B, 1, 10) == [Resend(B, (b"c3",))]


def test_past_epochs_are_pruned_by_age_and_count_and_exposure_is_reported() -> None:
    a = core(A)
    hour = 3600 * 1000
    for e in range(6):
        a.on_commit(commit_info(a, A), e * hour)
    st = a.statistics(5 * hour)
    assert st.past_epochs_kept == 6 and st.fs_exposure_ms == 5 * hour
    # Count cap (4) applies on the next tick.
    assert a.tick(5 * hour) == [Prune(4)]
    assert a.statistics(5 * hour).fs_exposure_ms == 3 * hour
    # Age: epochs that ended more than a day ago go.
    assert a.next_deadline() == 2 * hour + DAY_MS
    assert a.tick(2 * hour + DAY_MS) == [Prune(3)]
    assert a.tick(6 * hour + DAY_MS) == [Prune(0)]
    assert a.statistics(6 * hour + DAY_MS).fs_exposure_ms == 0


def test_removed_member_stops() -> None:
    d = core(D)
    d.request(IntentKind.UPDATE, "", 0)
    d.on_commit(commit_info(d, A, members=(A, B, C)), 5)
    assert d.removed and d.intents() == []
    assert d.tick(10**9) == []
    with pytest.raises(IntentError):
        d.request(IntentKind.UPDATE, "", 6)


def test_intent_notes_of_others_are_listed_for_this_epoch_only() -> None:
    a, b = core(A), core(B)
    iid, _ = b.request(IntentKind.ADD, E, 0)
    (note,) = (x.note for x in b.proposed(iid, b"r", 0) if isinstance(x, SendIntent))
    a.on_intent(B, note, 1)
    assert a.others_intents() == [(B, note)]
    a.on_commit(commit_info(a, A), 2)
    assert a.others_intents() == []


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        GroupConfig(quiescence_ms=-1)
    with pytest.raises(ValueError):
        GroupConfig(max_committers=0)


def test_restored_intent_is_proposed_again() -> None:
    b = core(D)
    iid, _ = b.request(IntentKind.ADD, E, 0)
    b.proposed(iid, b"r", 0)
    (saved,) = b.intents()
    fresh = core(D, epoch=4)
    assert fresh.restore(saved, 10) == [Propose(iid, IntentKind.ADD, E)]
    assert fresh.restore(saved, 10) == []  # known already
    (back,) = fresh.intents()
    assert back.epoch == -1 and back.attempts == 0
