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
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2


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


async def accept(recipient: Agent, sender: Agent, wall: ManualWallClock) -> None:
    """``recipient`` writes to ``sender`` once (one opaque envelope), which is how its node
    learns that ``recipient`` accepts mail from ``sender``. Mailbox fairness gives senders
    a recipient has not accepted only a bounded share of its mailbox (docs/threat-model.md),
    so a test that has one user send hundreds of envelopes to another starts with this."""
    env = Envelope(os.urandom(16), sender.me, wall() + 86_400_000, 4, os.urandom(256))
    resp = await recipient._rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
        service_pb2.EnqueueResponse,
    )
    assert resp.results[0].status == 0, resp.results[0].detail


async def texts(agent: Agent, want: int, wait: float = 5.0) -> list[Incoming]:
    """Receive until ``want`` texts arrived or ``wait`` seconds passed (bounded)."""
    got: list[Incoming] = []
    with trio.move_on_after(wait):
        for _ in range(50):
            got += await agent.receive(wait=1.0)
            if len(got) >= want:
                break
    return got


async def flush_inbox(agent: Agent, rounds: int = 20) -> list[Incoming]:
    """Handle everything already in ``agent``'s mailbox, without waiting for more.

    A send returns once the node stored its fan-out, so after ``flush_inbox`` the
    recipient has seen all of it: "nothing arrived" is checked without a fixed wait.
    """
    got: list[Incoming] = []
    for _ in range(rounds):
        got += await agent.receive(wait=0)
        if not await mailbox_ids(agent, pages=1):
            return got
    raise AssertionError(f"mailbox still not empty after {rounds} rounds")


async def _spawn(
    data: Path, env: dict[str, str], log: BinaryIO | None, listen: str = "127.0.0.1:0"
) -> trio.Process:
    argv = [sys.executable, "-m", "qpc_node.cli", "node", "--listen", listen]
    return await trio.lowlevel.open_process(
        [*argv, "--data", str(data)], stdout=subprocess.PIPE, stderr=log, env=env
    )


async def start_node_process(
    data: Path,
    extra_env: dict[str, str] | None = None,
    log_file: Path | None = None,
    listen: str = "127.0.0.1:0",
) -> tuple[trio.Process, NodeInfo]:
    """``qpc node`` as a real process; returns it and what it announced.

    ``listen``: a fixed HOST:PORT to restart a node where its clients knew it.
    """
    env = dict(os.environ, QPC_METRICS_LISTEN="", **(extra_env or {}))
    log = log_file.open("ab") if log_file is not None else None
    try:
        proc = await _spawn(data, env, log, listen)
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


async def run_repl(
    data: Path, port: int, pin: str, script: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``qpc repl --script -`` as a real process against 127.0.0.1:PORT."""
    argv = [sys.executable, "-m", "qpc_node.cli", "repl", "--server", f"127.0.0.1:{port}"]
    return await trio.run_process(
        [*argv, "--pin", pin, "--data", str(data), "--script", "-"],
        stdin=script.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def node_stats(tmp: Path, info: NodeInfo, wall: ManualWallClock) -> dict[str, float]:
    """The node's metrics over the authenticated Stats RPC: ``name,label=value,...`` -> value."""
    async with users(tmp, info, wall, "stats-watcher") as (w,):
        samples = await w.node_stats()
    return {s.name + "".join(f",{k}={v}" for k, v in s.labels): s.value for s in samples}


def cli_fingerprint(data: Path, env: dict[str, str] | None = None) -> str:
    """``qpc id --data DATA``: creates the identity on first use, returns its fingerprint."""
    out = subprocess.run(
        [sys.executable, "-m", "qpc_node.cli", "id", "--data", str(data), "--no-qr"],
        capture_output=True,
        check=True,
        text=True,
        env={**os.environ, **(env or {})},
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("fingerprint:"))
    return line.split(":", 1)[1].replace(" ", "")


async def mailbox_ids(agent: Agent, pages: int = 100) -> list[bytes]:
    """Every msg_id in the agent's mailbox, in order, without acking (bounded paging)."""
    seen: list[bytes] = []
    after = 0
    for _ in range(pages):
        resp = await agent._rpc.call(
            "qpc.v1.Delivery/Fetch",
            service_pb2.FetchRequest(after_seq=after, limit=256),
            service_pb2.FetchResponse,
        )
        if not resp.messages:
            break
        seen += [bytes(m.envelope.msg_id) for m in resp.messages]
        after = resp.messages[-1].seq
    return seen
