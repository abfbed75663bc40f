"""Stage B over the real Rust MLS core: a group splits, both sides change it, it heals.

qpc_sim/group_partition.py drives N members (real ``Identity`` stores in temp dirs,
durable=False) with a ForkResolver each, on a virtual clock with seeded shuffled and
duplicated delivery. Checked after the heal: every member on one epoch authenticator and
one branch, no text undecryptable that a member at the end was owed, and no member that
any branch removed left in a roster.

The 100-seed sweep runs with 10 members so it stays affordable (the 50-member 30/20
scenario runs once per seed listed below).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node import crypto
from qpc_node.groups.fork import order_key, rank_secret
from qpc_sim.group_partition import PartitionConfig, PartitionReport, run_partition


def check(r: PartitionReport) -> None:
    assert r.authenticators == 1, r
    assert len(r.winners) == 1, r
    assert r.undecryptable == 0, r
    assert r.removed_present == (), r
    assert r.out_of_window == 0, r


def test_partition_30_20_converges() -> None:
    r = run_partition(PartitionConfig(members=50, seed=1))
    check(r)
    assert r.switches > 0, "the scenario must fork (both sides commit)"
    assert r.sim.texts_sent >= 150  # 2 per member before and after the heal, less the removed


SEEDS = int(os.environ.get("QPC_PARTITION_SEEDS", "100"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_partition_same_winner_every_seed(seed: int) -> None:
    r = run_partition(PartitionConfig(members=10, seed=seed, texts_per_member=1))
    check(r)
    assert r.switches > 0


@pytest.mark.parametrize("seed", range(5, 10))
def test_crash_in_the_middle_of_a_switch_recovers(seed: int) -> None:
    r = run_partition(PartitionConfig(members=10, seed=seed, crash_mid_rollback=True))
    assert r.crashes_recovered == 1
    check(r)


def test_grinding_the_update_path_cannot_change_the_winner(tmp_path: Path) -> None:
    """A member re-rolls its self-update commit 200 times on the same epoch: against
    another member's commit there, the order never changes (only the digest moves)."""
    ids = [
        crypto.Identity.create(tmp_path / f"i{k}", os.urandom(32), durable=False) for k in range(3)
    ]
    g0 = ids[0].create_group()
    _c, welcome = g0.add([i.key_package() for i in ids[1:]])
    g0.merge_pending_commit()
    g1, g2 = ids[1].join(welcome), ids[2].join(welcome)
    roster = g0.members()
    rank = rank_secret(g0)
    assert rank == rank_secret(g1) == rank_secret(g2)
    honest = g1.update()
    k_honest = order_key(rank, roster.index(ids[1].fingerprint), honest, False)
    outcomes = set()
    digests = set()
    for _ in range(200):
        c = g2.update()
        g2.clear_pending_commit()
        k = order_key(rank, roster.index(ids[2].fingerprint), c, False)
        digests.add(k.digest)
        outcomes.add(k < k_honest)
    assert len(digests) == 200  # every re-roll is a different commit ...
    assert len(outcomes) == 1  # ... and none changes the winner
