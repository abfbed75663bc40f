"""Real nodes on loopback: QUIC with pinned certificates, SQLite, the MLS core."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import trio

from qpc_node.client.agent import Agent
from qpc_node.node import Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.ops.config import Config, load_config

OpenUser = Callable[[str], AbstractAsyncContextManager[Agent]]


def node_config(tmp: Path, **limits: str) -> Config:
    return load_config(
        env={},
        overrides={
            "node": {"listen": "127.0.0.1:0", "data_dir": str(tmp / "node")},
            "limits": dict(limits),
            "metrics": {"listen": ""},
        },
    )


@asynccontextmanager
async def running_node(
    tmp: Path, wall: ManualWallClock | None = None, **limits: str
) -> AsyncIterator[tuple[Node, NodeInfo]]:
    node = Node(
        node_config(tmp, **limits),
        default_data=tmp / "node",
        wall_ms=wall or ManualWallClock(system_wall_ms()),
    )
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield node, info
        nursery.cancel_scope.cancel()
