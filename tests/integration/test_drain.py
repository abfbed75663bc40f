"""Draining: SIGTERM during 500 in-flight calls (each completes or gets a retriable
error, no acknowledged message is lost, the process exits within its drain grace), and
parked long-polls answered at once when the node starts draining."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from node_harness import mailbox_ids, node_config, running_node, start_node_process, users

from qpc_node.crypto import Identity
from qpc_node.errors import StatusCode
from qpc_node.node import Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import ALPN_CLIENT, ClientTLS, Connection, Endpoint, open_endpoint
from qpc_node.rpc import RpcClient, RpcError
from qpc_node.rpc.client import NO_RETRY
from qpc_node.service.auth import auth_message
from qpc_node.service.stats import STATS_METHOD, samples_from_proto
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import ops_pb2, service_pb2

pytestmark = pytest.mark.timeout(240)
CONNS, PER_CONN = 20, 25  # 500 calls in flight
GRACE = 10
LONG_POLL_MS = 25_000  # outlasts the grace: only the drain can answer these in time
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


async def _parked_fetches(rpc: RpcClient) -> float:
    resp = await rpc.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
    return sum(s.value for s in samples_from_proto(resp) if s.name == "qpc_fetch_waiters")


async def test_sigterm_drains(tmp_path: Path, wall: ManualWallClock) -> None:
    """Besides the 500 enqueues, every connection parks a long-poll whose wait outlasts
    the grace: calls that are certainly in flight when SIGTERM lands. The drain must
    answer them and let the enqueues finish, and the process exit within the grace."""
    proc, info = await start_node_process(tmp_path / "node", ENV)
    acked: list[bytes] = []
    outcomes: list[StatusCode] = []
    fetches: list[service_pb2.FetchResponse | StatusCode] = []
    try:
        async with users(tmp_path, info, wall, "b") as (b,):
            bme = b.me  # b is homed here; its agent says goodbye while the node is up
        idents = [
            Identity.create(tmp_path / f"s{i}", os.urandom(32), durable=False) for i in range(CONNS)
        ]
        async with open_endpoint("127.0.0.1", 0) as ep:
            sessions = [
                await session(ep, info.host, info.port, info.cert_fingerprint, ident)
                for ident in idents
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

            async def long_poll(rpc: RpcClient) -> None:
                try:
                    fetches.append(
                        await rpc.call(
                            "qpc.v1.Delivery/Fetch",
                            service_pb2.FetchRequest(wait_ms=LONG_POLL_MS),
                            service_pb2.FetchResponse,
                            timeout=LONG_POLL_MS / 1000 + 10,
                        )
                    )
                except RpcError as exc:
                    fetches.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _, rpc in sessions:
                    nursery.start_soon(long_poll, rpc)
                with trio.fail_after(20):
                    # Bounded poll of the node's own count: no delay is guessed.
                    while await _parked_fetches(sessions[0][1]) < CONNS:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                for c, (_, rpc) in enumerate(sessions):
                    for k in range(PER_CONN):
                        nursery.start_soon(one, rpc, c * PER_CONN + k)
                gate.set()
                with trio.fail_after(30):
                    await busy.wait()  # 50 calls acknowledged: the rest are in flight
                in_flight = CONNS * PER_CONN - len(outcomes)
                t_sig = trio.current_time()
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(GRACE * 3):  # a bound for the test, not the claim
                    await proc.wait()
                elapsed = trio.current_time() - t_sig
            ep.abort()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    print(
        "drain outcomes:",
        {c.name: outcomes.count(c) for c in set(outcomes)},
        f"in flight at SIGTERM: {in_flight} enqueues + {CONNS} long-polls,",
        f"exit after {elapsed:.2f}s (grace {GRACE}s)",
    )
    assert proc.returncode == 0, "the node exits cleanly on SIGTERM"
    assert elapsed < GRACE, "the node exits within its drain grace"
    assert len(outcomes) == CONNS * PER_CONN
    assert all(code == StatusCode.OK or code.retriable for code in outcomes), set(outcomes)
    # The parked long-polls were answered (empty), not cut off when the node went away.
    assert len(fetches) == CONNS
    assert all(isinstance(f, service_pb2.FetchResponse) and not f.messages for f in fetches), [
        f for f in fetches if not isinstance(f, service_pb2.FetchResponse)
    ]

    # Every acknowledged enqueue is there after a restart.
    proc, info = await start_node_process(tmp_path / "node", ENV)
    try:
        async with users(tmp_path, info, wall, "b") as (b2,):
            seen = set(await mailbox_ids(b2))
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(GRACE * 3):
            await proc.wait()
    assert proc.returncode == 0
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


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.05])
async def test_cancel_while_starting_stops_cleanly(tmp_path: Path, delay: float) -> None:
    """The services run shielded; a cancellation that lands while they start must
    still stop them (nursery.start waits for the shielded task), not hang."""
    node = Node(node_config(tmp_path), default_data=tmp_path / "node")
    with trio.fail_after(20), trio.move_on_after(delay):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await trio.sleep_forever()
    assert node.store is None or not node.store.is_open  # closed, not leaked


async def test_startup_error_reaches_the_caller_unwrapped(tmp_path: Path) -> None:
    """``qpc`` attaches to the node already on its port by catching OSError from
    ``nursery.start(node.run)``: the error must not come wrapped in a group."""
    async with running_node(tmp_path / "a") as (_, info):
        cfg = node_config(tmp_path / "b", node={"listen": f"127.0.0.1:{info.port}"})
        second = Node(cfg, default_data=tmp_path / "b" / "node")
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20), pytest.raises(OSError):
                await nursery.start(second.run)
