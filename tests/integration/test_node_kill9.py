"""kill -9 the node process while 2,000 messages are being enqueued: every
acknowledged enqueue is delivered after restart, none twice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from node_harness import accept, mailbox_ids, start_node_process, users

from qpc_node.ops.clock import ManualWallClock
from qpc_node.rpc import RpcError
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(180)
TOTAL = 2000
KILL_AFTER = 500
FAST = {"QPC_LIMITS_RATE_PER_SECOND": "100000", "QPC_LIMITS_RATE_BURST": "100000"}


async def test_kill9_loses_no_acknowledged_enqueue(tmp_path: Path, wall: ManualWallClock) -> None:
    data = tmp_path / "node"
    proc, info = await start_node_process(data, FAST)
    acked: list[bytes] = []
    try:
        async with users(tmp_path, info, wall, "a", "b") as (a, b):
            bme = b.me
            await accept(b, a, wall)  # b's contact: not bound by a stranger's share
            for i in range(TOTAL):
                env = Envelope(
                    os.urandom(16), bme, wall() + 86_400_000, 4, i.to_bytes(4, "big") * 64
                )
                try:
                    await a._rpc.call(
                        "qpc.v1.Delivery/Enqueue",
                        service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
                        service_pb2.EnqueueResponse,
                        retries=0,
                        timeout=5,
                    )
                except (RpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    break
                acked.append(env.msg_id)
                if len(acked) == KILL_AFTER:
                    proc.send_signal(signal.SIGKILL)
    except* (RpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # closing the agents against a dead node
    finally:
        proc.kill()
        await proc.wait()
    assert KILL_AFTER <= len(acked) < TOTAL

    proc, info = await start_node_process(data, FAST)
    try:
        async with users(tmp_path, info, wall, "b") as (b,):
            seen = await mailbox_ids(b)
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await proc.wait()
        proc.kill()
    assert len(seen) == len(set(seen)), "a message was stored twice"
    missing = set(acked) - set(seen)
    assert not missing, f"{len(missing)} acknowledged enqueues lost"
