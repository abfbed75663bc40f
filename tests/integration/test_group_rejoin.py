"""Stage B gaps in the real client (docs/groups.md): a member added only on the losing
branch ends in the group.

Real node on loopback, real Agents; relays are "paused" by members not reading their
mail, as in test_groups_partition_client.py.
"""

from __future__ import annotations

from pathlib import Path

from node_harness import running_node, users
from test_groups_partition_client import QUIET_MS, _gid, settle

from qpc_node.client.agent import Agent
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

        await settle(wall, *agents, rounds=12)
        assert sum(x._branches.stats.switches for x in agents) >= 1
        everyone = {x.ident.fingerprint for x in agents}
        auths = set()
        for x in agents:
            g = x.ident.group(gid)
            assert set(g.members()) == everyone, (x.ident.fingerprint[:8], g.members())
            auths.add(g.epoch_authenticator())
            assert x.stats.undecryptable == 0
        assert len(auths) == 1
        # Both joiners read and write on the group everyone is in.
        await e.group_send("team", "hello from e")
        await f.group_send("team", "hello from f")
        shown = await settle(wall, *agents, rounds=2)
        for x in agents:
            got = shown[x.ident.fingerprint]
            for who, text in ((e, "hello from e"), (f, "hello from f")):
                assert got.count(text) == (0 if x is who else 1), (text, got)
