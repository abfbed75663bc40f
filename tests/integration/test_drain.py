"""Draining: SIGTERM during 500 in-flight calls (each completes or gets a retriable
error, no acknowledged message is lost, the process exits within its drain grace), and
parked long-polls answered at once when the node starts draining."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from node_harness import mailbox_ids, node_config, start_node_process, users

from qpc_node.crypto import Identity
from qpc_node.errors import StatusCode
from qpc_node.node import Node, NodeInfo
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


async def _wait_parked(node: Node, recipients: int) -> None:
    assert node.delivery is not None
    with trio.fail_after(20):
        # Parked fetches are counted by the node; poll it (bounded) rather than guess a delay.
        while len(node.delivery.waiters) < recipients:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_drain_answers_parked_long_polls(tmp_path: Path, wall: ManualWallClock) -> None:
    """Fetches parked with a wait longer than the grace get their (empty) answer as
    soon as the drain starts, and the node then exits well inside its grace; a drain
    that left them parked would hold the node for the whole grace and then cut them off."""
    grace, wait_ms = 10.0, 25_000
    assert wait_ms / 1000 > grace
    cfg = node_config(tmp_path, node={"drain_grace_s": str(grace)})
    node = Node(cfg, default_data=tmp_path / "node", wall_ms=wall)
    idents = [Identity.create(tmp_path / f"u{i}", os.urandom(32), durable=False) for i in range(3)]
    answered: list[tuple[float, service_pb2.FetchResponse | StatusCode]] = []
    node_scope = trio.CancelScope()
    node_exited = trio.Event()

    async def run_node(*, task_status: trio.TaskStatus[NodeInfo]) -> None:
        with node_scope:
            await node.run(task_status=task_status)
        node_exited.set()

    async with trio.open_nursery() as outer:
        info: NodeInfo = await outer.start(run_node)
        async with open_endpoint("127.0.0.1", 0) as ep:
            rpcs = [
                (await session(ep, info.host, info.port, info.cert_fingerprint, ident))[1]
                for ident in idents
            ]

            async def park(rpc: RpcClient) -> None:
                try:
                    resp = await rpc.call(
                        "qpc.v1.Delivery/Fetch",
                        service_pb2.FetchRequest(wait_ms=wait_ms),
                        service_pb2.FetchResponse,
                        timeout=wait_ms / 1000 + 10,
                    )
                except RpcError as exc:
                    answered.append((trio.current_time(), exc.code))
                else:
                    answered.append((trio.current_time(), resp))

            async with trio.open_nursery() as clients:
                for rpc in rpcs:
                    clients.start_soon(park, rpc)
                await _wait_parked(node, len(rpcs))
                t_drain = trio.current_time()
                node_scope.cancel()  # what SIGTERM does in `qpc node`
                with trio.fail_after(grace * 2):
                    await node_exited.wait()
                exit_after = trio.current_time() - t_drain
            ep.abort()
    print(
        f"long-polls answered after {[round(t - t_drain, 3) for t, _ in answered]}s,"
        f" exit after {exit_after:.3f}s (grace {grace}s)"
    )
    assert len(answered) == len(rpcs)
    for t, resp in answered:
        assert isinstance(resp, service_pb2.FetchResponse), resp  # an answer, not a cut-off
        assert list(resp.messages) == []
        assert t - t_drain < grace / 2
    assert exit_after < grace / 2
