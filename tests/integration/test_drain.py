"""SIGTERM during 500 in-flight calls: each completes or gets a retriable error,
no acknowledged message is lost, and the process exits within its drain grace."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from node_harness import accept, mailbox_ids, start_node_process, users

from qpc_node.crypto import Identity
from qpc_node.errors import StatusCode
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import ALPN_CLIENT, ClientTLS, Connection, Endpoint, open_endpoint
from qpc_node.rpc import RpcClient, RpcError
from qpc_node.rpc.client import NO_RETRY
from qpc_node.service.auth import auth_message
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(240)
CONNS, PER_CONN = 20, 25  # 500 calls in flight
GRACE = 5
ENV = {
    "QPC_LIMITS_RATE_PER_SECOND": "100000",
    "QPC_LIMITS_RATE_BURST": "100000",
    "QPC_NODE_DRAIN_GRACE_S": str(GRACE),
}


async def session(
    ep: Endpoint, host: str, port: int, pin: str, ident: Identity
) -> tuple[Connection, RpcClient]:
    conn = await ep.connect(host, port, ClientTLS(ALPN_CLIENT, pin=pin))
    rpc = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
    ch = await rpc.call(
        "qpc.v1.Auth/Challenge",
        service_pb2.AuthChallengeRequest(),
        service_pb2.AuthChallengeResponse,
    )
    await rpc.call(
        "qpc.v1.Auth/Prove",
        service_pb2.AuthProveRequest(
            public_key=ident.public_key,
            signature=ident.sign(auth_message(ch.nonce, bytes.fromhex(pin))),
        ),
        service_pb2.AuthProveResponse,
    )
    return conn, rpc


async def test_sigterm_drains(tmp_path: Path, wall: ManualWallClock) -> None:
    proc, info = await start_node_process(tmp_path / "node", ENV)
    acked: list[bytes] = []
    outcomes: list[StatusCode] = []
    try:
        async with users(tmp_path, info, wall, "a", "b") as (a, b):
            bme = b.me
            await accept(b, a, wall)  # b's contact: not bound by a stranger's share
            async with open_endpoint("127.0.0.1", 0) as ep:
                sessions = [
                    await session(ep, info.host, info.port, info.cert_fingerprint, a.ident)
                    for _ in range(CONNS)
                ]
                gate = trio.Event()
                busy = trio.Event()

                async def one(rpc: RpcClient, i: int) -> None:
                    env = Envelope(
                        os.urandom(16), bme, wall() + 86_400_000, 4, i.to_bytes(4, "big") * 256
                    )
                    await gate.wait()
                    try:
                        await rpc.call(
                            "qpc.v1.Delivery/Enqueue",
                            service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
                            service_pb2.EnqueueResponse,
                            timeout=30,
                        )
                    except RpcError as exc:
                        outcomes.append(exc.code)
                        return
                    outcomes.append(StatusCode.OK)
                    acked.append(env.msg_id)
                    if len(acked) == 50:
                        busy.set()

                exited = trio.Event()
                exit_after: list[float] = []

                async def terminate_when_busy() -> None:
                    await gate.wait()
                    with trio.move_on_after(5):
                        await busy.wait()  # 50 calls acknowledged: the rest are in flight
                    t_sig = trio.current_time()
                    proc.send_signal(signal.SIGTERM)
                    with trio.fail_after(GRACE + 30):
                        await proc.wait()
                    exit_after.append(trio.current_time() - t_sig)
                    exited.set()

                async with trio.open_nursery() as nursery:
                    for c, (_, rpc) in enumerate(sessions):
                        for k in range(PER_CONN):
                            nursery.start_soon(one, rpc, c * PER_CONN + k)
                    nursery.start_soon(terminate_when_busy)
                    await trio.sleep(0.2)
                    gate.set()
                await exited.wait()
                rc = proc.returncode
                elapsed = exit_after[0]
                ep.abort()
    except* (RpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the agents' own goodbyes to a node that is gone
    finally:
        proc.kill()
        await proc.wait()
    print(
        "drain outcomes:",
        {c.name: outcomes.count(c) for c in set(outcomes)},
        f"exit after {elapsed:.1f}s",
    )
    assert len(outcomes) == CONNS * PER_CONN
    assert all(code == StatusCode.OK or code.retriable for code in outcomes), set(outcomes)
    assert StatusCode.OK in outcomes
    assert rc == 0, "the node exits cleanly on SIGTERM"
    assert elapsed < GRACE + 30

    # Every acknowledged enqueue is there after a restart.
    proc, info = await start_node_process(tmp_path / "node", ENV)
    try:
        async with users(tmp_path, info, wall, "b") as (b2,):
            seen = set(await mailbox_ids(b2))
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await proc.wait()
        proc.kill()
    assert set(acked) <= seen
