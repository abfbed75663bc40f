"""Real nodes on loopback: QUIC with pinned certificates, SQLite, the MLS core."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import trio

from qpc_node.client.agent import Agent, Incoming
from qpc_node.client.connect import open_agent
from qpc_node.node import Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.ops.config import Config, load_config


def node_config(tmp: Path, **sections: dict[str, str]) -> Config:
    overrides: dict[str, dict[str, str]] = {
        "node": {"listen": "127.0.0.1:0", "data_dir": str(tmp / "node")},
        "metrics": {"listen": ""},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(env={}, overrides=overrides)


@asynccontextmanager
async def running_node(
    tmp: Path, wall: ManualWallClock | None = None, **sections: dict[str, str]
) -> AsyncIterator[tuple[Node, NodeInfo]]:
    node = Node(
        node_config(tmp, **sections),
        default_data=tmp / "node",
        wall_ms=wall or ManualWallClock(system_wall_ms()),
    )
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield node, info
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def users(
    tmp: Path, info: NodeInfo, wall: ManualWallClock, *names: str
) -> AsyncIterator[list[Agent]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                open_agent(tmp / n, info.host, info.port, pin=info.cert_fingerprint, wall_ms=wall)
            )
            for n in names
        ]


async def texts(agent: Agent, want: int, wait: float = 5.0) -> list[Incoming]:
    """Receive until ``want`` texts arrived or ``wait`` seconds passed (bounded)."""
    got: list[Incoming] = []
    with trio.move_on_after(wait):
        for _ in range(50):
            got += await agent.receive(wait=1.0)
            if len(got) >= want:
                break
    return got


async def _spawn(data: Path, env: dict[str, str], log: BinaryIO | None) -> trio.Process:
    argv = [sys.executable, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0"]
    return await trio.lowlevel.open_process(
        [*argv, "--data", str(data)], stdout=subprocess.PIPE, stderr=log, env=env
    )


async def start_node_process(
    data: Path, extra_env: dict[str, str] | None = None, log_file: Path | None = None
) -> tuple[trio.Process, NodeInfo]:
    """``qpc node`` as a real process; returns it and what it announced."""
    env = dict(os.environ, QPC_METRICS_LISTEN="", **(extra_env or {}))
    log = log_file.open("ab") if log_file is not None else None
    try:
        proc = await _spawn(data, env, log)
    finally:
        if log is not None:
            log.close()  # the child holds its own copy of the descriptor
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, "node exited before announcing its address"
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    # "qpc node listening on HOST:PORT pin=FPR"
    addr, pin = line.rsplit(" ", 2)[1:]
    host, port = addr.rsplit(":", 1)
    return proc, NodeInfo(host, int(port), pin.removeprefix("pin="), data)
