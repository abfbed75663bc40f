"""Stage B gaps in the real client (docs/groups.md, "Rejoin"): a member added only on the
losing branch ends in the group, and a partition longer than the rollback window heals
by an external commit of the losing side onto the winning branch.

Real node on loopback, real Agents; relays are "paused" by members not reading their
mail, as in test_groups_partition_client.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from node_harness import flush_inbox, running_node, users
from test_client_switch_crash import Crashed, Fault, Host, arm
from test_groups_partition_client import QUIET_MS, _gid, settle

from qpc_node.client.agent import Agent
from qpc_node.client.branches import OFFER_INTERVAL_MS
from qpc_node.groups.core import GroupConfig
from qpc_node.ops.clock import ManualWallClock


async def _group_of(wall: ManualWallClock, agents: list[Agent]) -> tuple[Agent, Agent, bytes]:
    """agents[0] creates "team" with all of agents[:4]; returns its two committers."""
    a = agents[0]
    await a.group_create("team")
    for x in agents[1:4]:
        assert await a.group_invite("team", x.ident.fingerprint) == "invited"
    await settle(wall, *agents[:4])
    committers = (await a.group_info("team")).committers
    by_fpr = {x.ident.fingerprint: x for x in agents}
    return by_fpr[committers[0]], by_fpr[committers[1]], _gid(a, "team")


def _all_in_one_group(agents: list[Agent], gid: bytes) -> None:
    """Every agent holds the group with all of them in it, on one epoch authenticator,
    and could decrypt everything it got."""
    everyone = {x.ident.fingerprint for x in agents}
    auths = set()
    for x in agents:
        g = x.ident.group(gid)
        assert set(g.members()) == everyone, (x.ident.fingerprint[:8], g.members())
        auths.add(g.epoch_authenticator())
        assert x.stats.undecryptable == 0, (x.ident.fingerprint[:8], x.stats.warnings)
    assert len(auths) == 1


async def _failover_commit(wall: ManualWallClock, c1: Agent) -> None:
    """c1 (second committer) commits its own request: the first one stays silent."""
    wall.advance(GroupConfig().committer_timeout_ms + QUIET_MS)
    await c1._groups.timers()


async def test_member_added_only_on_the_losing_branch_is_added_again(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """Both sides of a partition add a new member on the same epoch; one add loses the
    fork. Its committer asks again on the winning branch, so both new members end in
    the group (the loser's joiner by a Welcome of the winning branch)."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c", "d", "e", "f") as agents,
    ):
        c0, c1, gid = await _group_of(wall, agents)
        e, f = agents[4], agents[5]
        epoch = c0.ident.group(gid).epoch
        # Side X: the first committer adds e. Side Y: c1 adds f itself after the timeout.
        assert await c0.group_invite("team", e.ident.fingerprint) == "invited"
        assert await c1.group_invite("team", f.ident.fingerprint) == "requested"
        await _failover_commit(wall, c1)
        assert c0.ident.group(gid).epoch == c1.ident.group(gid).epoch == epoch + 1
        assert c0._branches.tag(c0.ident.group(gid)) != c1._branches.tag(c1.ident.group(gid))
        await c0.group_send("team", "from c0 on x")  # to e, not f
        await c1.group_send("team", "from c1 on y")  # to f, not e

        shown = await settle(wall, *agents, rounds=12)
        # Each text shows once to each of its recipients on either branch (the joiner of
        # the losing branch keeps what it read there, or gets the resend once it is back),
        # never twice; the other joiner sees it only if the text was re-sent on its branch.
        for x in agents:
            got = shown[x.ident.fingerprint]
            for text, sender, other in (("from c0 on x", c0, f), ("from c1 on y", c1, e)):
                if x is sender:
                    assert got.count(text) == 0, got
                elif x is other:
                    assert got.count(text) <= 1, got
                else:
                    assert got.count(text) == 1, (text, got)
        assert sum(x._branches.stats.switches for x in agents) >= 1
        _all_in_one_group(agents, gid)
        # Both joiners read and write on the group everyone is in.
        await e.group_send("team", "hello from e")
        await f.group_send("team", "hello from f")
        shown = await settle(wall, *agents, rounds=2)
        for x in agents:
            got = shown[x.ident.fingerprint]
            for who, text in ((e, "hello from e"), (f, "hello from f")):
                assert got.count(text) == (0 if x is who else 1), (text, got)


async def _update(x: Agent, gid: bytes) -> None:
    """x, its branch's first committer, refreshes its leaf: a commit at once."""
    before = x.ident.group(gid).epoch
    await x.group_update("team")
    assert x.ident.group(gid).epoch == before + 1


async def _cut_off_beyond_the_window(
    wall: ManualWallClock, agents: list[Agent]
) -> tuple[Agent, Agent, bytes]:
    """Both committers commit one epoch more than the rollback window while cut off
    from each other (nobody reads mail), each sending a text on its branch in the
    second epoch. c1's fork commit changes the committer list (the failover rotates
    it), c0's is a self-update: c1's side (Y) wins at the fork whichever ranks come
    out. Returns (c0, c1, group id)."""
    c0, c1, gid = await _group_of(wall, agents)
    q = next(x for x in agents if x not in (c0, c1))
    # Side Y: q asks for an update and c1 reads it before the cable is pulled; c0
    # stays silent, so c1 commits it and becomes its side's first committer.
    await q.group_update("team")
    await flush_inbox(c1)
    epoch = c1.ident.group(gid).epoch
    await _failover_commit(wall, c1)
    assert c1.ident.group(gid).epoch == epoch + 1
    for k in range(c0._branches.window + 1):
        await _update(c0, gid)
        await _update(c1, gid)
        if k == 1:
            await c0.group_send("team", "from c0 on x")
            await c1.group_send("team", "from c1 on y")
    assert c0._branches.tag(c0.ident.group(gid)) != c1._branches.tag(c1.ident.group(gid))
    return c0, c1, gid


@pytest.mark.parametrize("winner_moves_on", [False, True])
async def test_partition_longer_than_the_window_heals_by_external_commit(
    tmp_path: Path, wall: ManualWallClock, winner_moves_on: bool
) -> None:
    """Both committers commit more epochs than the rollback window while cut off from
    each other (nobody reads mail once the cable is pulled), then everyone reads.
    Neither side can stage the other's commit at the fork any more; the losing committer
    gets the winner's offer, rejoins by external commit, and its text of the losing
    branch is shown once.

    ``winner_moves_on``: the winner reads first (and offers), then commits again before
    the loser's external commit reaches it; that commit then arrives on an older epoch
    of the winner and is judged there like any sibling commit, and all still converge."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c", "d") as agents,
    ):
        c0, c1, gid = await _cut_off_beyond_the_window(wall, agents)
        if winner_moves_on:
            await flush_inbox(c1)  # Y wins at the fork (see the helper)
            await c1._groups.timers()
            assert c1._branches.stats.offers_sent == 1
            await _update(c1, gid)

        shown = await settle(wall, *agents, rounds=12)
        rejoined = [x for x in (c0, c1) if x._branches.stats.rejoins]
        assert len(rejoined) == 1, [x._branches.stats for x in (c0, c1)]
        (loser,) = rejoined
        winner = c1 if loser is c0 else c0
        assert winner._branches.stats.offers_sent >= 1
        _all_in_one_group(agents, gid)
        # The loser's text of its branch was sent again on the winner: shown once.
        mine = "from c0 on x" if loser is c0 else "from c1 on y"
        for x in agents:
            if x is not loser:
                assert shown[x.ident.fingerprint].count(mine) == 1, shown[x.ident.fingerprint]
        # The rejoined member sends and receives on the common branch.
        await loser.group_send("team", "back")
        await winner.group_send("team", "welcome back")
        shown = await settle(wall, *agents, rounds=2)
        for x in agents:
            got = shown[x.ident.fingerprint]
            assert got.count("back") == (0 if x is loser else 1), got
            assert got.count("welcome back") == (0 if x is winner else 1), got


async def test_a_member_removed_on_the_winning_branch_does_not_rejoin(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """As above, but side Y's first commit removes c0 (q asked for it). A membership
    change beats c0's self-update at the fork, so Y wins; c0 gets Y's offer, and since
    Y removed it, it must not come back by external commit: it stays out."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c", "d") as agents,
    ):
        c0, c1, gid = await _group_of(wall, agents)
        p, q = (x for x in agents if x not in (c0, c1))
        assert await q.group_remove("team", c0.ident.fingerprint) == "requested"
        await flush_inbox(c1)
        await _failover_commit(wall, c1)
        assert c0.ident.fingerprint not in c1.ident.group(gid).members()
        for _ in range(c0._branches.window + 1):
            await _update(c0, gid)
            await _update(c1, gid)

        await settle(wall, *agents, rounds=12)
        assert c0._branches.stats.rejoins == 0
        assert c0._branches.stats.rejoins_refused >= 1
        assert c1._branches.stats.offers_sent >= 1
        auths = {x.ident.group(gid).epoch_authenticator() for x in (c1, p, q)}
        assert len(auths) == 1
        for x in (c1, p, q):
            assert c0.ident.fingerprint not in x.ident.group(gid).members()
        assert c0.ident.group(gid).epoch_authenticator() not in auths
        # c0 keeps holding Y's messages (retried on every receive) and stays out: its
        # offers back off instead of going out every OFFER_INTERVAL_MS until they expire.
        before = c0._branches.stats.offers_sent
        for _ in range(10):
            wall.advance(OFFER_INTERVAL_MS)
            await flush_inbox(c0)
            await c0._groups.timers()
        assert c0._branches.stats.offers_sent - before <= 3
        assert c0._branches.stats.rejoins == 0


async def test_a_long_partition_heals_after_both_committers_restarted(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """As the partition above, but both committers' processes restart after the
    partition and before the heal: the rejoin history (the epochs of each branch, their
    rejoin secrets and the ordering key of the commit taken there) comes back from
    client.db, so the winner's offer still opens at the fork on the loser and the loser
    rejoins. Without it each side keeps only its current epoch after the restart, shares
    none with the other, and the group stays split."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        trio.open_nursery() as nursery,
    ):
        host = Host(nursery, tmp_path, info, wall)
        agents = [await host.open(n) for n in "abcd"]
        names = {x.ident.fingerprint: n for n, x in zip("abcd", agents, strict=True)}
        c0, c1, gid = await _cut_off_beyond_the_window(wall, agents)
        for c in (c0, c1):  # the processes restart; their files stay
            n = names[c.ident.fingerprint]
            await host.close(n)
            agents["abcd".index(n)] = await host.open(n)
        by_name = dict(zip("abcd", agents, strict=True))
        c0, c1 = by_name[names[c0.ident.fingerprint]], by_name[names[c1.ident.fingerprint]]
        assert c0._branches.stats.restored == c1._branches.stats.restored == 1

        shown = await settle(wall, *agents, rounds=12)
        rejoined = [x for x in (c0, c1) if x._branches.stats.rejoins]
        assert len(rejoined) == 1, [x._branches.stats for x in (c0, c1)]
        (loser,) = rejoined
        _all_in_one_group(agents, gid)
        mine = "from c0 on x" if loser is c0 else "from c1 on y"
        for x in agents:
            if x is not loser:
                assert shown[x.ident.fingerprint].count(mine) == 1, shown[x.ident.fingerprint]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("restart", [False, True])
async def test_a_rejoin_resends_texts_older_than_the_window_and_catches_the_rejoiner_up(
    tmp_path: Path, wall: ManualWallClock, restart: bool
) -> None:
    """Both committers send a text right after the fork, then commit more epochs than the
    rollback window. The loser's text is re-sent on the winner after its rejoin (its
    body is kept for every epoch of the rejoin history, not only the window), and the
    rejoiner gets the winner's text, which it could never decrypt (sent in an epoch of
    the winner's branch it was not in): the winner re-sends it to the rejoiner alone
    when the rejoiner asks for the texts since the fork (a CatchUp). Each shows once.
    ``restart``: both committers restart before the heal (the history, the texts' ids
    and bodies come back from client.db)."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        trio.open_nursery() as nursery,
    ):
        host = Host(nursery, tmp_path, info, wall)
        agents = [await host.open(n) for n in "abcd"]
        c0, c1, gid = await _group_of(wall, agents)
        q = next(x for x in agents if x not in (c0, c1))
        await q.group_update("team")
        await flush_inbox(c1)
        await _failover_commit(wall, c1)
        await _update(c0, gid)  # both sides are one epoch past the fork
        await c0.group_send("team", "from c0 on x")
        await c1.group_send("team", "from c1 on y")
        for _ in range(c0._branches.window + 1):
            await _update(c0, gid)
            await _update(c1, gid)
        if restart:
            i0, i1 = agents.index(c0), agents.index(c1)
            for i in (i0, i1):
                await host.close("abcd"[i])
                agents[i] = await host.open("abcd"[i])
            c0, c1 = agents[i0], agents[i1]
            assert c0._branches.stats.restored == c1._branches.stats.restored == 1

        shown = await settle(wall, *agents, rounds=12)
        rejoined = [x for x in (c0, c1) if x._branches.stats.rejoins]
        assert len(rejoined) == 1, [x._branches.stats for x in (c0, c1)]
        (loser,) = rejoined
        winner = c1 if loser is c0 else c0
        auths = {x.ident.group(gid).epoch_authenticator() for x in agents}
        assert len(auths) == 1
        mine, theirs = ("from c0 on x", "from c1 on y")[:: 1 if loser is c0 else -1]
        for x in agents:
            got = shown[x.ident.fingerprint]
            assert got.count(mine) == (0 if x is loser else 1), ("resend", got)
            assert x.stats.undecryptable == 0
        for x in agents:
            got = shown[x.ident.fingerprint]
            assert got.count(theirs) == (0 if x is winner else 1), ("catch-up", got)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("step", ["after_join_external", "after_rejoin_saved"])
async def test_a_crash_in_the_middle_of_a_rejoin_recovers(
    tmp_path: Path, wall: ManualWallClock, step: str
) -> None:
    """The loser dies in the middle of its rejoin.

    ``after_join_external``: right after ``join_external`` wrote the rejoined group
    (Rust store), before client.db recorded the rejoin. At start the group goes back on
    the branch it left (the trial journalled before the external commit), with its
    history and texts; the offer was not acknowledged, so it comes again and the loser
    rejoins. Before, the record no longer fit the group and was dropped at start: no
    history, no rejoin, the group stayed split.

    ``after_rejoin_saved``: the rejoin is recorded (its texts pending resends), the
    external commit not yet sent. The commit was queued in that same transaction, so
    it goes out at start, before the resends can. Before, it was queued only after:
    the resends went out in an epoch nobody else entered and the text was lost."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        trio.open_nursery() as nursery,
    ):
        host = Host(nursery, tmp_path, info, wall)
        agents = [await host.open(n) for n in "abcd"]
        names = {x.ident.fingerprint: n for n, x in zip("abcd", agents, strict=True)}
        c0, c1, gid = await _cut_off_beyond_the_window(wall, agents)  # Y (c1) wins
        await flush_inbox(c1)
        await c1._groups.timers()
        assert c1._branches.stats.offers_sent == 1
        n0 = names[c0.ident.fingerprint]
        if step == "after_join_external":
            fault = Fault("join_external", after=True)
        else:  # the first snapshot released after the rejoin's record (resends pending)
            st0 = c0._st
            fault = Fault("release", after=False, when=lambda _f, _r: bool(st0.branch_resends()))
        arm(c0, fault)
        with pytest.raises(Crashed):
            for _ in range(5):
                await c0._inbox.receive(0)
        assert fault.fired
        await host.close(n0)  # the process is gone; its files stay
        c0 = await host.open(n0)
        agents["abcd".index(n0)] = c0
        assert c0._branches.stats.dropped_records == 0
        back = step == "after_join_external"
        assert c0._branches.stats.rolled_back == back

        shown = await settle(wall, *agents, rounds=12)
        assert c0._branches.stats.rejoins == back, c0._branches.stats
        _all_in_one_group(agents, gid)
        for x in agents:
            if x is not c0:
                got = shown[x.ident.fingerprint]
                assert got.count("from c0 on x") == 1, (names[x.ident.fingerprint], got)
        nursery.cancel_scope.cancel()
