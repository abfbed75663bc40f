"""One node per data directory: a second one, in the same process or another,
is refused with a clear error before it touches the database or the keys."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio
from node_harness import node_config, running_node, start_node_process

from qpc_node.node import Node
from qpc_node.ops.clock import ManualWallClock
from qpc_node.ops.lockfile import NodeBusy
from qpc_node.quic import ALPN_CLIENT, ClientTLS, open_endpoint
from qpc_node.rpc import RpcClient
from qpc_node.wire.gen.qpc.v1 import health_pb2

pytestmark = pytest.mark.timeout(120)


async def _health(host: str, port: int, pin: str) -> health_pb2.HealthResponse:
    async with open_endpoint("127.0.0.1", 0) as ep:
        conn = await ep.connect(host, port, ClientTLS(ALPN_CLIENT, pin=pin))
        resp = await RpcClient(conn.open_stream).call(
            "qpc.v1.Health/Check", health_pb2.HealthRequest(), health_pb2.HealthResponse
        )
        await conn.aclose()
        return resp


async def test_second_node_in_process_is_refused(tmp_path: Path, wall: ManualWallClock) -> None:
    async with running_node(tmp_path, wall) as (first, info):
        second = Node(node_config(tmp_path), default_data=tmp_path / "node", wall_ms=wall)
        assert second.data_dir == first.data_dir
        with trio.fail_after(10), pytest.raises(NodeBusy, match="a node is running on"):
            await second.run()
        assert second.store is None and second.endpoint is None  # refused before opening
        # The first node never noticed.
        assert (
            await _health(info.host, info.port, info.cert_fingerprint)
        ).status == health_pb2.HealthResponse.SERVING


async def test_second_node_process_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "node"
    proc, info = await start_node_process(data)
    try:
        argv = [sys.executable, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0"]
        with trio.fail_after(60):
            second = await trio.run_process(
                [*argv, "--data", str(data)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=dict(os.environ, QPC_METRICS_LISTEN=""),
            )
        err = second.stderr.decode()
        assert second.returncode == 2, err
        assert f"qpc: error: a node is running on {data}" in err
        assert "Traceback" not in err
        assert b"listening" not in second.stdout
        assert (
            await _health(info.host, info.port, info.cert_fingerprint)
        ).status == health_pb2.HealthResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    # Once the first is gone, the lock is free again.
    proc, _ = await start_node_process(data)
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await proc.wait()
    assert proc.returncode == 0
