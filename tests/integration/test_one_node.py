"""Issue 4 must-shows: users on one node over real QUIC and SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from node_harness import running_node

from qpc_node.client.agent import Agent, Incoming
from qpc_node.client.connect import open_agent
from qpc_node.node import NodeInfo
from qpc_node.ops.clock import ManualWallClock

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def users(
    tmp: Path, info: NodeInfo, wall: ManualWallClock, *names: str
) -> AsyncIterator[list[Agent]]:
    async with AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(
                open_agent(tmp / n, info.host, info.port, pin=info.cert_fingerprint, wall_ms=wall)
            )
            for n in names
        ]
        yield agents


async def texts(agent: Agent, want: int, wait: float = 5.0) -> list[Incoming]:
    """Receive until ``want`` texts arrived or ``wait`` seconds passed (bounded)."""
    got: list[Incoming] = []
    with trio.move_on_after(wait):
        for _ in range(50):
            got += await agent.receive(wait=1.0)
            if len(got) >= want:
                break
    return got


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
