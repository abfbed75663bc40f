"""Issue 11 item 5: after ``kill -9`` and a restart on the same port and data
directory, a client that was connected learns at once that its connection is
gone -- the new process answers the old connection's packets with a stateless
reset (RFC 9000 10.3) carrying the token the old process handed out, derived
from the node's persistent key -- instead of waiting out its idle timeout.

Before the fix the new process dropped those packets silently: the client
noticed only when its idle timer (22.5 s by default) ran out.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest
import trio
from node_harness import node_stats, start_node_process

from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import ALPN_CLIENT, ClientTLS, Connection, ConnectionClosed, open_endpoint
from qpc_node.quic.settings import QuicSettings
from qpc_node.rpc import RpcClient
from qpc_node.rpc.health import HEALTH_METHOD
from qpc_node.wire.gen.qpc.v1 import health_pb2

pytestmark = pytest.mark.timeout(90)


async def health(conn: Connection) -> None:
    resp = await RpcClient(conn.open_stream).call(
        HEALTH_METHOD, health_pb2.HealthRequest(), health_pb2.HealthResponse, retries=0
    )
    assert resp.status == health_pb2.HealthResponse.SERVING


async def test_restarted_node_resets_old_connections(tmp_path: Path, wall: ManualWallClock) -> None:
    data, log = tmp_path / "node", tmp_path / "node.log"
    settings = QuicSettings()  # the client's: idle timeout 22.5 s
    proc, info = await start_node_process(data, log_file=log)
    try:
        async with open_endpoint("127.0.0.1", 0, settings=settings) as ep:
            tls = ClientTLS(ALPN_CLIENT, pin=info.cert_fingerprint)
            conn = await ep.connect(info.host, info.port, tls)
            await health(conn)

            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            proc, again = await start_node_process(
                data, log_file=log, listen=f"127.0.0.1:{info.port}"
            )
            assert (again.port, again.cert_fingerprint) == (info.port, info.cert_fingerprint)

            # The user's next call goes out on the old connection.
            start = trio.current_time()
            with trio.move_on_after(settings.idle_timeout + 5):
                with contextlib.suppress(ConnectionClosed):
                    stream = await conn.open_stream()
                    await stream.send_all(b"\x00" * 64)
                await conn.closed.wait()
            noticed = trio.current_time() - start
            conn2 = await ep.connect(info.host, info.port, tls)
            await health(conn2)
            first_ok = trio.current_time() - start
            print(
                f"restart: old connection ended after {noticed * 1000:.1f} ms "
                f"({conn.close_error}), first OK after {first_ok * 1000:.1f} ms; "
                f"client idle timeout {settings.idle_timeout} s"
            )
            assert conn.close_error is not None and conn.close_error.reason == "stateless reset"
            assert noticed < settings.idle_timeout / 20
            await conn2.aclose()
        stats = await node_stats(tmp_path, info, wall)
        assert stats["qpc_quic_stateless_resets_total,result=sent"] >= 1
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
