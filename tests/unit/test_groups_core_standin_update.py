"""A stand-in committer's own update request (found by the partition harness).

Member C asks for a self-update (an Update proposal) while A is the first committer; A
is away, so C commits as a stand-in and becomes the first committer. Its Update proposal
cannot be in its own commit, so the request is re-started: as the first committer, its
update is simply its next commit. That commit must complete the request. Before the fix
the request kept its old epoch, was re-started after every commit of C's, and each
re-start made another commit: a commit storm (thousands of epochs in the simulation).
"""

from __future__ import annotations

from qpc_node.groups.core import Commit, CommitInfo, GroupConfig, GroupCore, IntentKind, Propose

A, B, C, D = (c * 64 for c in "abcd")
CFG = GroupConfig(committer_timeout_ms=10_000, quiescence_ms=100, max_commit_delay_ms=1_000)


def own_commit(g: GroupCore, committers: tuple[str, ...], n: int) -> CommitInfo:
    return CommitInfo(
        parent_epoch=g.epoch,
        sender=g.me,
        covered=(),
        added=(),
        removed=(),
        committers=committers,
        members=g.members,
        authenticator=b"auth%d" % n,
        message=b"commit-%d" % n,
    )


def test_standin_update_request_completes_with_its_next_commit() -> None:
    g = GroupCore(C, 1, (A, B, C, D), (A, B, C), 0, CFG)
    iid, actions = g.request(IntentKind.UPDATE, "", 0)
    assert actions == [Propose(iid, IntentKind.UPDATE, "")]
    g.proposed(iid, b"ref-update", 0)
    # A and B stay silent: C's turn comes (rank 2) and it commits as a stand-in.
    actions = g.tick(2 * CFG.committer_timeout_ms)
    assert [type(a) for a in actions] == [Commit]
    rotated = (C, A, B)
    actions = g.on_commit(own_commit(g, rotated, 1), 2 * CFG.committer_timeout_ms + 50)
    # Its Update proposal was not in its own commit: as first committer now, it commits.
    assert [type(a) for a in actions] == [Commit]
    now = 2 * CFG.committer_timeout_ms + 100
    actions = g.on_commit(own_commit(g, rotated, 2), now)
    assert not [a for a in actions if isinstance(a, Commit)]
    assert g.intents() == []
    assert g.tick(now + 60_000) == []  # and nothing more to commit
