"""Fork resolution decisions (qpc_node/groups/fork.py) on synthetic commit trees.

A model member holds only a current branch tag and a table of snapshots (id -> tag), so
the resolver's decisions are checked without MLS: every member that saw the same commits,
in any order and with duplicates, must end on the chain that greedy lowest-key descent
picks from the common root.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import pytest

from qpc_node.groups.fork import (
    Apply,
    EpochInfo,
    ForkCommit,
    ForkError,
    ForkResolver,
    Hold,
    Ignore,
    IgnoreReason,
    OrderKey,
    RouteKind,
    Switch,
    order_key,
)

NOW = 1_000_000


def tag_of(seed: bytes) -> bytes:
    return hashlib.sha256(b"tag" + seed).digest()[:16]


def rank_of(tag: bytes) -> bytes:
    return hashlib.sha256(b"rank" + tag).digest()


MEMBERS = frozenset(f"m{i}" for i in range(8))


def epoch(tag: bytes, n: int, members: frozenset[str] = MEMBERS) -> EpochInfo:
    return EpochInfo(tag=tag, epoch=n, rank_secret=rank_of(tag), members=members)


@dataclass
class World:
    """A commit tree: every commit's child epoch is known to the world (not to members)."""

    root: EpochInfo
    child: dict[bytes, EpochInfo] = field(default_factory=dict)  # commit digest -> epoch
    commits: list[ForkCommit] = field(default_factory=list)
    epochs: dict[bytes, EpochInfo] = field(default_factory=dict)

    def commit(
        self,
        parent: EpochInfo,
        leaf: int,
        membership: bool = False,
        *,
        added: tuple[str, ...] = (),
        removed: tuple[str, ...] = (),
        covered: tuple[bytes, ...] = (),
        salt: bytes = b"",
    ) -> tuple[ForkCommit, EpochInfo]:
        body = parent.tag + bytes([leaf]) + salt + random.randbytes(8)
        c = ForkCommit(parent.tag, body, leaf, membership, added, removed, covered)
        members = (parent.members | set(added)) - set(removed)
        e = epoch(tag_of(body), parent.epoch + 1, frozenset(members))
        self.child[c.digest] = e
        self.commits.append(c)
        self.epochs[e.tag] = e
        return c, e

    def canonical_tip(self) -> bytes:
        """Greedy lowest-key descent from the root: the chain everyone must agree on."""
        tag = self.root.tag
        while True:
            kids = [c for c in self.commits if c.parent_tag == tag]
            if not kids:
                return tag
            rank = self.epochs.get(tag, self.root).rank_secret
            best = min(
                kids,
                key=lambda c: order_key(rank, c.committer_leaf, c.commit, c.changes_membership),
            )
            tag = self.child[best.digest].tag


class ModelMember:
    """Carries out the resolver's decisions on a toy state (a tag + snapshots)."""

    def __init__(self, world: World, window: int = 8) -> None:
        self.world = world
        self.r = ForkResolver(window=window, retain_ms=10_000)
        self.r.start(world.root, NOW)
        self.state = world.root.tag
        self.snaps: dict[int, bytes] = {}
        self.next_snap = 1
        self.held: list[ForkCommit] = []
        self.plans: list[Switch] = []

    def snapshot(self) -> int:
        sid = self.next_snap
        self.next_snap += 1
        self.snaps[sid] = self.state
        return sid

    def deliver(self, c: ForkCommit) -> None:
        self.held.append(c)
        progress = True
        while progress:
            progress = False
            for h in list(self.held):
                if self.r.route(h.parent_tag, NOW).kind is RouteKind.UNKNOWN:
                    continue
                self.held.remove(h)
                self.decide(h)
                progress = True

    def decide(self, c: ForkCommit) -> None:
        d = self.r.on_commit(c)
        child = self.world.child[c.digest]
        if isinstance(d, Apply):
            assert self.state == c.parent_tag
            sid = self.snapshot()
            self.state = child.tag
            self.r.entered(c, child, sid, NOW)
        elif isinstance(d, Switch):
            self.plans.append(d)
            self.r.begin_switch(d, self.snapshot())
            self.state = self.snaps[d.rollback_to]
            assert self.state == c.parent_tag
            self.state = child.tag
            self.r.entered(c, child, d.rollback_to, NOW)
        else:
            assert isinstance(d, Ignore), d


def test_order_key_components_and_lowest_wins() -> None:
    rank = b"r" * 32
    a = order_key(rank, 3, b"commit-a", True)
    b = order_key(rank, 3, b"commit-a", False)
    assert a.kind == 0 and b.kind == 1 and a < b  # membership change first
    assert a.rank == hashlib.sha256(rank + (3).to_bytes(4, "big")).digest()
    assert a.digest == hashlib.sha256(b"commit-a").digest()
    with pytest.raises(ForkError):
        order_key(b"short", 0, b"", False)
    with pytest.raises(ForkError):
        order_key(rank, -1, b"", False)


def test_grinding_the_update_path_never_changes_the_winner() -> None:
    """A committer who re-randomises its commit 200 times only moves the digest; the
    winner against another member's commit on the same parent stays the same."""
    rank = hashlib.sha256(b"parent").digest()
    honest = order_key(rank, 1, b"honest commit", False)
    outcomes = {order_key(rank, 2, random.randbytes(64), False) < honest for _ in range(200)}
    assert len(outcomes) == 1
    # In another epoch (another rank secret) the same leaves may rank the other way round:
    flips = {
        order_key(hashlib.sha256(bytes([e])).digest(), 2, b"x", False)
        < order_key(hashlib.sha256(bytes([e])).digest(), 1, b"y", False)
        for e in range(64)
    }
    assert flips == {True, False}


def test_linear_chain_applies_and_duplicates_are_ignored() -> None:
    w = World(epoch(tag_of(b"root"), 0))
    c1, e1 = w.commit(w.root, 1)
    c2, e2 = w.commit(e1, 2)
    m = ModelMember(w)
    m.deliver(c2)  # parent unknown yet: held
    assert m.state == w.root.tag and m.held == [c2]
    m.deliver(c1)
    assert m.state == e2.tag and m.r.live_path() == [w.root.tag, e1.tag, e2.tag]
    assert m.r.on_commit(c1) == Ignore(IgnoreReason.DUPLICATE)
    assert m.r.on_commit(c2) == Ignore(IgnoreReason.DUPLICATE)
    unknown = ForkCommit(tag_of(b"elsewhere"), b"x", 0, False)
    assert m.r.on_commit(unknown) == Hold(unknown.parent_tag)


def two_branches(w: World, depth_a: int, depth_b: int) -> tuple[list[ForkCommit], list[ForkCommit]]:
    """Two branches from the root, by leaves 1 and 2 (fork at the first commit)."""
    out = []
    for leaf, depth in ((1, depth_a), (2, depth_b)):
        parent, chain = w.root, []
        for _ in range(depth):
            c, parent = w.commit(parent, leaf)
            chain.append(c)
        out.append(chain)
    return out[0], out[1]


def test_first_divergent_commit_decides_not_length() -> None:
    """A branch of 5 commits loses to a single commit that ranks lower at the fork."""
    for seed in range(40):
        random.seed(seed)
        w = World(epoch(tag_of(b"root%d" % seed), 0))
        long, short = two_branches(w, 5, 1)
        rank = w.root.rank_secret
        long_wins = order_key(rank, 1, long[0].commit, False) < order_key(
            rank, 2, short[0].commit, False
        )
        m = ModelMember(w)
        for c in long + short:
            m.deliver(c)
        expected = w.child[long[-1].digest].tag if long_wins else w.child[short[0].digest].tag
        assert m.state == expected == m.r.tip.tag
        assert m.state == w.canonical_tip()


def test_switch_plan_lists_resends_reissues_and_removals() -> None:
    random.seed(7)
    w = World(epoch(tag_of(b"root-plan"), 0))
    # Make the losing branch the one by leaf 1: pick a root whose rank puts leaf 2 first.
    while (
        order_key(w.root.rank_secret, 2, b"", True).rank
        > order_key(w.root.rank_secret, 1, b"", True).rank
    ):
        w = World(epoch(tag_of(random.randbytes(8)), 0))
    lose1, le1 = w.commit(w.root, 1, True, removed=("m5",), covered=(b"i-remove-m5",))
    lose2, le2 = w.commit(le1, 1, True, added=("n1",), covered=(b"i-add-n1", b"i-both"))
    win1, we1 = w.commit(w.root, 2, True, removed=("m6",), covered=(b"i-both",))
    m = ModelMember(w)
    m.deliver(lose1)
    m.r.note_sent(le1.tag, b"app-1")
    m.deliver(lose2)
    m.r.note_sent(le2.tag, b"app-2")
    m.r.note_sent(w.root.tag, b"app-0")  # on the common epoch: not resent
    assert m.state == le2.tag
    m.deliver(win1)
    assert m.state == we1.tag
    (plan,) = m.plans
    assert plan.parent_tag == w.root.tag and plan.parent_epoch == 0
    assert plan.losing_tags == (le1.tag, le2.tag)
    assert plan.resend == (b"app-1", b"app-2")
    assert plan.reissue == (b"i-remove-m5", b"i-add-n1")
    assert plan.readd == ("n1",)
    assert plan.reremove == ("m5",)
    # m5 is still a member on the winning branch: the resolver says it must go.
    assert m.r.outstanding_removals(we1.members) == ["m5"]
    assert not m.r.may_rejoin("m5", w.root.tag) and not m.r.may_rejoin("m6", w.root.tag)
    assert m.r.may_rejoin("m1", w.root.tag) and not m.r.may_rejoin("n1", w.root.tag)
    # Late messages of the losing branch decrypt read-only until their expiry.
    for t in (le1.tag, le2.tag):
        r = m.r.route(t, NOW + 10_000)
        assert r.kind is RouteKind.READONLY and r.snapshot is not None
        assert m.snaps[r.snapshot] == le2.tag  # the losing tip's state
        assert m.r.route(t, NOW + 10_001).kind is RouteKind.UNKNOWN
    # A later commit on the losing branch is ignored; the loser again too.
    c3, _ = w.commit(le2, 1)
    assert m.r.on_commit(c3) == Ignore(IgnoreReason.LOST_BRANCH)
    assert m.r.on_commit(lose1) == Ignore(IgnoreReason.LOSES)


@pytest.mark.parametrize("seed", range(100))
def test_random_trees_converge_in_any_delivery_order(seed: int) -> None:
    """Random forks (up to 3 siblings, nested forks, depth <= window) delivered to 6
    members in independent shuffled orders with duplicates: all end on the canonical tip."""
    random.seed(seed)
    w = World(epoch(tag_of(b"root-%d" % seed), 0))
    frontier = [w.root]
    for _ in range(random.randint(2, 12)):
        parent = random.choice(frontier)
        if parent.epoch >= 5:
            continue
        _, e = w.commit(parent, random.randrange(8), random.random() < 0.5)
        frontier.append(e)
    members = [ModelMember(w) for _ in range(6)]
    for m in members:
        order = w.commits + random.sample(w.commits, k=len(w.commits) // 2)
        random.shuffle(order)
        for c in order:
            m.deliver(c)
    tip = w.canonical_tip()
    assert {m.state for m in members} == {tip}
    assert {m.r.tip.tag for m in members} == {tip}


def test_crash_between_rollback_and_merge_resumes_the_journalled_switch() -> None:
    random.seed(11)
    w = World(epoch(tag_of(b"root-crash"), 0))
    a, b = two_branches(w, 2, 1)
    rank = w.root.rank_secret
    first, second = (a, b)
    if order_key(rank, 1, a[0].commit, False) < order_key(rank, 2, b[0].commit, False):
        first, second = b, a  # deliver the loser first so the winner forces a switch
    m = ModelMember(w)
    for c in first:
        m.deliver(c)
    d = m.r.on_commit(second[0])
    assert isinstance(d, Switch)
    m.r.begin_switch(d, m.snapshot())
    m.state = m.snaps[d.rollback_to]  # rolled back ... then the process dies
    plan = m.r.resume()
    assert plan == d
    with pytest.raises(ForkError):
        m.r.begin_switch(d, 99)
    with pytest.raises(ForkError):  # merging anything but the winner is refused
        m.r.entered(first[0], w.child[first[0].digest], d.rollback_to, NOW)
    m.state = w.child[second[0].digest].tag
    m.r.entered(second[0], w.child[second[0].digest], d.rollback_to, NOW)
    assert m.r.resume() is None
    for c in second[1:] + first:
        m.deliver(c)
    assert m.state == w.canonical_tip()


def test_prune_keeps_the_window_and_releases_snapshots() -> None:
    random.seed(3)
    w = World(epoch(tag_of(b"root-prune"), 0))
    parent = w.root
    chain = []
    for _ in range(9):
        c, parent = w.commit(parent, 1)
        chain.append(c)
    m = ModelMember(w, window=3)
    for c in chain:
        m.deliver(c)
    in_use = m.r.snapshots_in_use()
    released = m.r.prune(NOW)
    assert len(m.r.live_path()) == 4
    assert set(released) == in_use - m.r.snapshots_in_use() and len(released) == 6
    # A sibling at a pruned epoch cannot be placed: held, never applied.
    old, _ = w.commit(w.epochs[w.child[chain[2].digest].tag], 0, True)
    assert isinstance(m.r.on_commit(old), Hold)


def test_bad_inputs_are_typed_errors() -> None:
    r = ForkResolver()
    with pytest.raises(ForkError):
        _ = r.tip
    with pytest.raises(ForkError):
        r.start(EpochInfo(b"short", 0, b"r" * 32, MEMBERS), NOW)
    with pytest.raises(ForkError):
        r.start(EpochInfo(b"t" * 16, 0, b"r", MEMBERS), NOW)
    with pytest.raises(ForkError):
        ForkResolver(window=0)
    r.start(epoch(b"t" * 16, 0), NOW)
    with pytest.raises(ForkError):
        r.note_sent(b"u" * 16, b"id")
    stray = ForkCommit(b"u" * 16, b"c", 0, False)
    with pytest.raises(ForkError):
        r.entered(stray, epoch(b"v" * 16, 1), 1, NOW)
    assert isinstance(OrderKey(0, b"", b""), OrderKey)


def test_dump_load_keeps_decisions_and_the_journal() -> None:
    """A member that crashed mid-switch reloads its resolver and resumes the same plan;
    a reloaded resolver makes the same later decisions as the one that never stopped."""
    random.seed(21)
    w = World(epoch(tag_of(b"root-dump"), 0))
    a, b = two_branches(w, 3, 2)
    rank = w.root.rank_secret
    first, second = (a, b)
    if order_key(rank, 1, a[0].commit, False) < order_key(rank, 2, b[0].commit, False):
        first, second = b, a
    m = ModelMember(w)
    for c in first:
        m.deliver(c)
    m.r.note_sent(m.state, b"app-x")
    d = m.r.on_commit(second[0])
    assert isinstance(d, Switch) and d.resend == (b"app-x",)
    m.r.begin_switch(d, m.snapshot())
    reloaded = ForkResolver.load(m.r.dump())
    assert reloaded.resume() == d
    assert reloaded.live_path() == m.r.live_path()
    assert reloaded.snapshots_in_use() == m.r.snapshots_in_use()
    m.r = reloaded
    m.state = w.child[second[0].digest].tag
    m.r.entered(second[0], w.child[second[0].digest], d.rollback_to, NOW)
    again = ForkResolver.load(m.r.dump())
    assert again.resume() is None
    for c in second[1:] + first:
        assert again.on_commit(c) == m.r.on_commit(c)
    assert again.dump() == m.r.dump()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"v": 2}',
        b'{"v": 1, "window": 5}',
        b'{"v":1,"window":"5","retain_ms":1,"epochs":[],"commits":[],"live":[]}',
        b'{"v":1,"window":5,"retain_ms":1,"epochs":[],"commits":[],"live":[],'
        b'"must_remove":[],"removed_anywhere":[],"released":[],"switches":0,"pending":null}',
        b"[" * 100_000,
    ],
)
def test_load_of_malformed_state_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(ForkError):
        ForkResolver.load(data)
