"""A relay node killed (kill -9) just after its links came up and restarted at once.

A - B - C on loopback; A and C run in-process, B is a real ``qpc node`` process so it
can die without a word. B is killed right after its links came up and is back well
inside the federation's ``race_window`` (made long here, so the test does not depend
on how fast the machine restarts a process): by timing alone, B's new connections
look like a second simultaneous dial of the old process, and neighbours never sent
the new B their routes (it had none until the periodic full table, 30 s later). The
boot id in Ping tells the new process apart: A and C re-sync with it at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
from node_harness import mailbox_ids

from qpc_node.client.agent import Agent
from qpc_node.client.connect import open_agent
from qpc_node.errors import StatusCode
from qpc_node.node import Node
from qpc_node.ops.clock import ManualWallClock
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2
from tests.integration.fed_nodes import free_port, identity, mesh_node, node_dir, until

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 5
PROMPT = 12.0
"""Seconds the new B may take to carry mail again: well under the 30 s periodic
full table that was the only way its routes came back before."""


@asynccontextmanager
async def b_process(tmp: Path, port: int, peers: list[tuple[int, bytes]]) -> AsyncIterator[None]:
    """``qpc node`` for B on 127.0.0.1:``port`` until the block ends (then SIGKILL)."""
    env = dict(
        os.environ,
        QPC_METRICS_LISTEN="",
        QPC_MESH_MDNS="false",
        QPC_MESH_STATIC_PEERS=",".join(f"127.0.0.1:{p}#{nid.hex()}" for p, nid in peers),
    )
    cmd = [sys.executable, "-m", "qpc_node.cli", "node", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--data", str(node_dir(tmp, "b"))]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=env
    )
    try:
        assert proc.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while b"qpc node mesh id" not in seen:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"B exited before it served: {seen!r}"
                seen += chunk
        yield
    finally:
        proc.send_signal(signal.SIGKILL)  # kill -9: no CONNECTION_CLOSE to anyone
        with trio.CancelScope(shield=True):
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


def slow_to_notice(node: Node) -> None:
    """Neither the race window nor the liveness pings may decide the case: B comes
    back 'within the window' and before its old links are found dead."""
    fed = node.federation
    assert fed is not None
    fed.timers = msgspec.structs.replace(fed.timers, race_window=600.0, dead_after=600.0)


async def test_a_relay_restarted_within_the_race_window_gets_routes_at_once(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    ports = {n: free_port() for n in "abc"}
    ids = {n: identity(tmp_path, n)[1] for n in "abc"}
    b_peers = [(ports["a"], ids["a"]), (ports["c"], ids["c"])]
    with trio.fail_after(110):
        async with (
            mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, a_info),
            mesh_node(tmp_path, "c", ports["c"], [(ports["b"], ids["b"])]) as (c_node, c_info),
            open_agent(
                tmp_path / "users" / "a", a_info.host, a_info.port, pin=a_info.cert_fingerprint,
                wall_ms=wall,
            ) as ua,
            open_agent(
                tmp_path / "users" / "c", c_info.host, c_info.port, pin=c_info.cert_fingerprint,
                wall_ms=wall,
            ) as uc,
        ):  # fmt: skip
            slow_to_notice(a_node)
            slow_to_notice(c_node)
            a_mesh, c_mesh = a_node.mesh, c_node.mesh
            assert a_mesh is not None and c_mesh is not None

            def routed() -> bool:
                b = a_mesh.router.binding(uc.me)
                return (
                    a_mesh.router.next_hop(ids["c"]) == ids["b"]
                    and c_mesh.router.next_hop(ids["a"]) == ids["b"]
                    and b is not None
                    and b.node == ids["c"]
                )

            async with b_process(tmp_path, ports["b"], b_peers):
                await until(routed, within=30)
            # B is dead (kill -9); A and C still hold their links to it and the
            # routes through it. Restarted on its data dir, B dials both back. (Some
            # rounds: whether the old code stalled depended on which side's packets
            # reached the new process first; the fix must hold in every round.)
            for _ in range(ROUNDS):
                async with b_process(tmp_path, ports["b"], b_peers):
                    await _relayed_promptly(ua, uc, wall)
                    for fed in (a_node.federation, c_node.federation):
                        assert fed is not None and fed.link_up(ids["b"])


async def _relayed_promptly(ua: Agent, uc: Agent, wall: ManualWallClock) -> None:
    """One envelope from a's user to c's, sent as a client's outbox would: again while
    A answers "no route yet" (A withdrew the routes through the old B and re-learns
    them from the new one); it must reach c's mailbox within PROMPT."""
    env = Envelope(os.urandom(16), uc.me, wall() + 3_600_000, 8, os.urandom(64))

    async def taken() -> bool:
        resp = await ua._rpc.call(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
            service_pb2.EnqueueResponse,
        )
        (res,) = resp.results
        assert res.status in (StatusCode.OK, StatusCode.UNAVAILABLE), res
        return res.status == StatusCode.OK  # in A's custody toward B

    async def arrived() -> bool:
        return env.msg_id in await mailbox_ids(uc)

    # Before: the new B had no routes (A and C took its connections for a second
    # dial of the old B) and answered "no route" until the periodic full table.
    with trio.fail_after(PROMPT):
        await until(taken, within=PROMPT, step=0.1)
        await until(arrived, within=PROMPT, step=0.1)
