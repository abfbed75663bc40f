"""Issue 4 must-shows: users on one node over real QUIC and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_harness import flush_inbox, running_node, texts, users

from qpc_node import crypto
from qpc_node.client.agent import Agent
from qpc_node.ops.clock import ManualWallClock

pytestmark = pytest.mark.timeout(120)


async def test_dm_both_ways(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        await a.dm(b.ident.fingerprint, "hello bob")
        (m,) = await texts(b, 1)
        assert (m.text, m.sender) == ("hello bob", a.ident.fingerprint)
        await b.dm(a.ident.fingerprint, "hi alice")
        (r,) = await texts(a, 1)
        assert r.text == "hi alice" and r.sender == b.ident.fingerprint
        # Both sides reuse the one pairwise group.
        await a.dm(b.ident.fingerprint, "again")
        assert [x.text for x in await texts(b, 1)] == ["again"]


async def test_group_of_three_invite_late_and_remove(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        await a.group_create("team")
        await a.group_invite("team", b.ident.fingerprint)
        await a.group_send("team", "before carol")
        assert [m.text for m in await texts(b, 1)] == ["before carol"]
        await b.group_send("team", "bob here")  # b learned the name from a's GroupInfo
        assert [m.text for m in await texts(a, 1)] == ["bob here"]

        await a.group_invite("team", c.ident.fingerprint)
        await a.group_send("team", "welcome carol")
        got_c = await texts(c, 1)
        # Carol joined after "before carol": she only ever sees what came later.
        assert [m.text for m in got_c] == ["welcome carol"]
        assert got_c[0].conversation == "team"
        assert sorted(await c.group_members("team")) == sorted(
            [a.ident.fingerprint, b.ident.fingerprint, c.ident.fingerprint]
        )
        assert [m.text for m in await texts(b, 1)] == ["welcome carol"]

        # Carol asks to leave; the committer (a) removes her on receipt.
        await c.group_leave("team")
        assert c.ident.fingerprint in await a.group_members("team")
        assert await flush_inbox(a) == []  # the request carries no text
        assert c.ident.fingerprint not in await a.group_members("team")
        await a.group_send("team", "after carol left")
        assert [m.text for m in await texts(b, 1)] == ["after carol left"]
        assert await flush_inbox(b) == []  # and nothing else
        assert await flush_inbox(c) == []  # only the commit that removed her

        # Remove b: b stops being able to read the group.
        g_b = b.ident.group(_gid(b, "team"))
        await a.group_remove("team", b.ident.fingerprint)
        assert await flush_inbox(b) == []  # b processes the commit that removes it
        assert "you were removed from 'team'" in b.stats.warnings[-1]
        later = a.ident.group(_gid(a, "team")).encrypt(b"secret after removal")
        with pytest.raises(crypto.MlsError):
            g_b.process(later)


def _gid(agent: Agent, name: str) -> bytes:
    conv = agent._st.conversation(name)
    assert conv is not None
    return conv.group_id
