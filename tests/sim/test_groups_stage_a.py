"""Stage A over the real Rust MLS core (qpc_sim/groups.py, docs/groups.md).

Seeded, virtual clock; deliveries are shuffled (delays up to seconds) and a share
arrives twice. What must hold: no application message a member should read is
lost, every member ends on the same epoch authenticator, any member's request is
applied, a late message of an old epoch still decrypts, missing commits are
pulled, and the next committer takes over from a silent one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from qpc_node.groups.core import GroupConfig, IntentKind
from qpc_node.wire.gen.qpc.v1 import client_pb2
from qpc_sim.groups import MAX_HELD_TRIES, GroupSim, SimConfig, SimMember

MINUTE = 60_000


@pytest.fixture
def sims() -> Iterator[list[GroupSim]]:
    made: list[GroupSim] = []
    yield made
    for s in made:
        s.close()


def make(sims: list[GroupSim], **kw: object) -> GroupSim:
    sim = GroupSim(SimConfig(**kw))  # type: ignore[arg-type]
    sims.append(sim)
    sim.setup()
    return sim


def converged(sim: GroupSim, members: list[SimMember]) -> bool:
    auths = {m.group.epoch_authenticator() for m in members if m.group is not None}
    return len(auths) == 1


@pytest.mark.parametrize("seed", [1, 2])
def test_fifty_members_chat_through_ten_changes_from_ten_members(
    sims: list[GroupSim], seed: int
) -> None:
    sim = make(sims, members=50, seed=seed, dup_rate=0.1, max_delay_ms=3_000)
    rng = random.Random(seed)
    joiners = [sim.new_member() for _ in range(4)]
    # Ten different requesters (never the first committer: it would just commit);
    # targets of removals are neither requesters nor joiners.
    requesters = rng.sample(range(3, 50), 10)
    others = [i for i in range(3, 50) if i not in requesters]
    removed = rng.sample(others, 3)
    plan: list[tuple[int, IntentKind, str]] = []
    for r, j in zip(requesters[:4], joiners, strict=True):
        plan.append((r, IntentKind.ADD, j.fpr))
    for r, v in zip(requesters[4:7], removed, strict=True):
        plan.append((r, IntentKind.REMOVE, sim.members[v].fpr))
    plan += [(requesters[7], IntentKind.UPDATE, ""), (requesters[8], IntentKind.UPDATE, "")]
    plan.append((requesters[9], IntentKind.LEAVE, ""))
    for r, kind, target in plan:
        t = rng.randint(0, 2 * MINUTE)
        sim.at(t, lambda r=r, kind=kind, target=target: sim.request(r, kind, target))  # type: ignore[misc]
    # Every member (and each joiner once in) sends texts throughout.
    for i in range(len(sim.members)):
        for _ in range(2):
            sim.at(rng.randint(0, 3 * MINUTE), lambda i=i: sim.send_text(i))  # type: ignore[misc]
    sim.run(until_ms=10 * MINUTE)

    rep = sim.report()
    active = sim.active()
    fprs = {m.fpr for m in active}
    assert rep.undecryptable == 0, rep
    assert rep.authenticators == 1 and len(rep.epochs) == 1, rep
    assert all(j.fpr in fprs for j in joiners)
    assert all(sim.members[v].fpr not in fprs for v in removed)
    assert sim.members[requesters[9]].fpr not in fprs
    assert len(active) == 50 + 4 - 3 - 1
    assert all(not m.core.intents() for m in active if m.core is not None)
    assert rep.texts_sent >= 80 and rep.deliveries_expected > 3_500


def test_message_from_epoch_n_decrypts_after_three_later_commits(sims: list[GroupSim]) -> None:
    sim = make(sims, members=4, seed=3, dup_rate=0.0, max_delay_ms=10)
    a, b = sim.members[1], sim.members[2]
    assert a.group is not None and b.group is not None
    epoch_n = a.group.epoch
    app_id = os.urandom(8)
    old = a.group.encrypt(client_pb2.AppMessage(text=app_id.hex()).SerializeToString())
    for _ in range(3):  # three commits (the first committer's key updates)
        sim.request(0, IntentKind.UPDATE)
        sim.run(until_ms=sim.now + MINUTE)
    assert b.group.epoch == epoch_n + 3
    assert converged(sim, sim.active())
    sim.deliver_mls(b, a.index, b"late", old, app_id)
    assert app_id in b.read


def test_lost_commits_are_pulled_from_another_member(sims: list[GroupSim]) -> None:
    sim = make(sims, members=12, seed=4, commit_loss=0.3, dup_rate=0.0, max_delay_ms=500)
    rng = random.Random(4)
    for k in range(6):
        sim.at(k * 5_000, lambda k=k: sim.request(1 + k, IntentKind.UPDATE))  # type: ignore[misc]
    for i in range(12):
        for _ in range(3):
            sim.at(rng.randint(0, MINUTE), lambda i=i: sim.send_text(i))  # type: ignore[misc]
    sim.run(until_ms=10 * MINUTE)
    rep = sim.report()
    assert rep.pulls > 0, rep
    assert rep.undecryptable == 0 and rep.authenticators == 1, rep


def test_a_commit_given_up_is_pulled_again(sims: list[GroupSim]) -> None:
    """A busy member gives up a commit whose proposal is late (held, retried after every
    message it reads); the pull answer must still be processed, although the member saw
    that commit before. (The 100-member partition bench ended on two authenticators this
    way: the answers were dropped as duplicates of the given-up delivery.)"""
    sim = make(sims, members=4, seed=6, dup_rate=0.0, max_delay_ms=10)
    p, x, other = sim.members[1], sim.members[2], sim.members[3]
    assert p.group is not None and x.group is not None
    epoch_n = x.group.epoch
    hold_back = True
    sim.blocked = lambda s, d, _t: hold_back and (s, d) == (p.index, x.index)
    # Texts p sends in epoch n, read by x while the commit waits for p's proposal.
    busy = [
        p.group.encrypt(client_pb2.AppMessage(text=f"{k:016x}").SerializeToString())
        for k in range(MAX_HELD_TRIES + 1)
    ]
    sim.request(p.index, IntentKind.UPDATE)
    sim.run(until_ms=sim.now + 10_000)
    assert other.group is not None and other.group.epoch == epoch_n + 1
    assert x.group.epoch == epoch_n and len(x.held) == 1  # the commit, missing the proposal
    for k, ct in enumerate(busy):
        sim.deliver_mls(x, p.index, b"busy%d" % k, ct, None)
    assert not x.held and sim.stale == 1  # given up
    hold_back = False
    sim.send_text(other.index)  # an epoch n + 1 message: x pulls the commit
    sim.run(until_ms=sim.now + 2 * MINUTE)
    assert x.group.epoch == epoch_n + 1
    assert converged(sim, sim.active())
    assert sim.report().undecryptable == 0


def test_next_committer_takes_over_from_a_silent_one(sims: list[GroupSim]) -> None:
    cfg = GroupConfig(committer_timeout_ms=30_000, quiescence_ms=500, pull_after_ms=4_000)
    sim = make(sims, members=8, seed=5, dup_rate=0.0, max_delay_ms=500, group=cfg)
    c0 = sim.members[0]
    sim.blocked = lambda s, d, _t: c0.index in (s, d)  # c0's node is unreachable
    joiner = sim.new_member()
    sim.request(5, IntentKind.ADD, joiner.fpr)
    sim.request(6, IntentKind.REMOVE, sim.members[7].fpr)
    sim.run(until_ms=sim.now + 29_000)
    assert sim.members[5].group is not None and sim.members[5].group.epoch == 1  # not yet
    sim.run(until_ms=sim.now + 2 * MINUTE)
    rest = [m for m in sim.active() if m is not c0]
    assert joiner in rest and sim.members[7] not in rest
    assert converged(sim, rest)
    # The stand-in rotated the list: the silent committer is last now.
    core = sim.members[1].core
    assert core is not None
    assert core.committers[0] == sim.members[1].fpr and core.committers[-1] == c0.fpr
    assert core.statistics(sim.now).failovers == 1
    other = sim.members[3].core
    assert other is not None and other.statistics(sim.now).off_list_commits == 1
    # Chat goes on without c0.
    app = sim.send_text(3)
    sim.run(until_ms=sim.now + MINUTE)
    assert app is not None and all(app in m.read for m in rest if m is not sim.members[3])
