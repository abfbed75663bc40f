"""Stage A end to end on a real node (docs/groups.md): any member asks for membership
changes, the first committer applies them, the first committer leaving hands over.

The wall clock is manual: the committer's quiescence delay passes by advancing it, and
``Agent.receive`` runs the group timers.
"""

from __future__ import annotations

from pathlib import Path

from node_harness import flush_inbox, running_node, texts, users

from qpc_node.client.agent import Agent
from qpc_node.ops.clock import ManualWallClock
from qpc_node.repl.runner import describe_group

QUIET_MS = 2_000  # above the default quiescence (1 s)


async def settle(wall: ManualWallClock, *agents: Agent, rounds: int = 4) -> None:
    """Let every agent handle its mail and run its timers, with time passing between."""
    for _ in range(rounds):
        for a in agents:
            await flush_inbox(a)
        wall.advance(QUIET_MS)


async def test_any_member_invites_and_removes_the_committer_applies(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c", "d") as (a, b, c, d),
    ):
        await a.group_create("team")
        assert await a.group_invite("team", b.ident.fingerprint) == "invited"
        assert await a.group_invite("team", c.ident.fingerprint) == "invited"
        await settle(wall, a, b, c)
        # b is not the first committer: its invite is a request.
        assert await b.group_invite("team", d.ident.fingerprint) == "requested"
        view = await b.group_info("team")
        assert [i.kind.value for i in view.mine] == ["add"]
        await settle(wall, a, b, c, d)
        members = sorted(await a.group_members("team"))
        assert d.ident.fingerprint in members
        assert (await b.group_info("team")).mine == ()  # applied: the request is done
        assert d._st.conversation("team") is not None  # named by the GroupInfo
        await d.group_send("team", "hi, d here")
        assert [m.text for m in await texts(c, 1)] == ["hi, d here"]

        # c asks to remove b.
        assert await c.group_remove("team", b.ident.fingerprint) == "requested"
        await settle(wall, a, b, c, d)
        assert b.ident.fingerprint not in await a.group_members("team")
        assert any("you were removed from 'team'" in w for w in b.stats.warnings)
        views = [await x.group_info("team") for x in (a, c, d)]
        assert len({v.epoch for v in views}) == 1
        auths = {x.ident.group(_gid(x, "team")).epoch_authenticator() for x in (a, c, d)}
        assert len(auths) == 1
        for x in (a, c, d):
            assert (x.stats.undecryptable, x.stats.held) == (0, 0)


async def test_first_committer_leaves_after_handing_over(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        await a.group_create("team")
        await a.group_invite("team", b.ident.fingerprint)
        await a.group_invite("team", c.ident.fingerprint)
        await settle(wall, a, b, c)
        assert (await b.group_info("team")).committers[0] == a.ident.fingerprint
        await a.group_leave("team")
        assert a._st.conversation("team") is None
        await settle(wall, b, c)
        for x in (b, c):
            view = await x.group_info("team")
            assert a.ident.fingerprint not in view.committers
            assert a.ident.fingerprint not in await x.group_members("team")
        assert (await b.group_info("team")).committers[0] == b.ident.fingerprint
        # b commits now: its invite is immediate.
        await b.group_send("team", "a left")
        assert [m.text for m in await texts(c, 1)] == ["a left"]


def _gid(agent: Agent, name: str) -> bytes:
    conv = agent._st.conversation(name)
    assert conv is not None
    return conv.group_id


async def test_group_info_describes_epoch_committers_and_requests(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "d") as (a, b, d),
    ):
        await a.group_create("team")
        await a.group_invite("team", b.ident.fingerprint)
        await settle(wall, a, b)
        await b.group_invite("team", d.ident.fingerprint)
        await flush_inbox(a)  # a sees b's proposal and note (not yet committed)
        lines = describe_group(await a.group_info("team"), a.ident.fingerprint)
        assert lines[0] == "team: epoch 1, 2 members"
        assert lines[1].startswith("  committers: ") and "(you)" in lines[1]
        auth = a.ident.group(_gid(a, "team")).epoch_authenticator()[:8].hex()
        assert lines[2] == f"  authenticator: {auth}"
        theirs = describe_group(await b.group_info("team"), b.ident.fingerprint)
        assert f"  authenticator: {auth}" in theirs  # same epoch, same branch
        assert any(line.startswith("  request by ") and "add" in line for line in lines)
        assert lines[-1].startswith("  past epochs kept: ")
        mine = describe_group(await b.group_info("team"), b.ident.fingerprint)
        assert any("your request: add" in line for line in mine)
