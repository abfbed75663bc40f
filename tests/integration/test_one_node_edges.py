"""Issue 4: idempotency, gaps, restarts and bad input against a real node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from node_harness import running_node, texts, users

from qpc_node.client.agent import Agent
from qpc_node.errors import StatusCode
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import ALPN_CLIENT, ClientTLS, open_endpoint
from qpc_node.rpc import RpcClient, RpcError
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2

pytestmark = pytest.mark.timeout(120)
DAY_MS = 86_400_000


def env_for(agent: Agent, wall: ManualWallClock, *, size: int = 256, ttl: int = DAY_MS) -> Envelope:
    return Envelope(os.urandom(16), agent.me, wall() + ttl, 4, os.urandom(size))


async def enqueue(sender: Agent, *envs: Envelope) -> service_pb2.EnqueueResponse:
    return await sender._rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs]),
        service_pb2.EnqueueResponse,
        retries=0,
    )


async def fetch_raw(agent: Agent, **kw: object) -> service_pb2.FetchResponse:
    return await agent._rpc.call(
        "qpc.v1.Delivery/Fetch", service_pb2.FetchRequest(**kw), service_pb2.FetchResponse
    )


async def test_retried_enqueue_is_delivered_once(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        e = env_for(b, wall)
        results = [(await enqueue(a, e)).results[0] for _ in range(5)]
        assert [r.duplicate for r in results] == [False, True, True, True, True]
        assert len({r.seq for r in results}) == 1
        got = await fetch_raw(b)
        assert [bytes(m.envelope.msg_id) for m in got.messages] == [e.msg_id]


async def test_gap_is_flagged(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall) as (node, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        await a.dm(b.ident.fingerprint, "one")  # seq 1..3: welcome, info, text
        assert [m.text for m in await texts(b, 1)] == ["one"]
        # A message that expires undelivered leaves a hole in b's sequence numbers.
        await enqueue(a, env_for(b, wall, ttl=1000))
        wall.advance(2000)
        assert node.store is not None and node.audit is not None
        assert await node.sweep_once() == (1, 0)
        await node.audit.flush()
        (ev,) = await node.store.audit_query(kind="retention.evict")
        assert ev.event.detail == {"messages": 1, "key_packages": 0}
        await a.dm(b.ident.fingerprint, "two")
        assert [m.text for m in await texts(b, 1)] == ["two"]
        assert len(b.stats.gaps) == 1
        expected, got = b.stats.gaps[0]
        assert got == expected + 1


async def test_restart_between_send_and_receive(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        await a.dm(b.ident.fingerprint, "first")
        assert [m.text for m in await texts(b, 1)] == ["first"]
        await a.dm(b.ident.fingerprint, "sent before the restart")
        bfp = b.ident.fingerprint
    # Node and both agents are gone; start again from the same directories.
    async with running_node(tmp_path, wall) as (_, info), users(tmp_path, info, wall, "b") as (b2,):
        assert b2.ident.fingerprint == bfp
        assert [m.text for m in await texts(b2, 1)] == ["sent before the restart"]


async def _status(coro: object) -> StatusCode:
    with pytest.raises(RpcError) as ei:
        await coro  # type: ignore[misc]
    return ei.value.code


async def test_bad_input_gets_typed_errors_and_changes_nothing(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (node, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        assert node.store is not None
        await enqueue(a, env_for(b, wall))
        before = await node.store.depth(b.me)
        kp_before = await node.store.count_keypackages(b.me, wall())

        # Unauthenticated enqueue: a fresh connection that never proved a key.
        async with open_endpoint("127.0.0.1", 0) as ep:
            conn = await ep.connect(
                info.host, info.port, ClientTLS(ALPN_CLIENT, pin=info.cert_fingerprint)
            )
            anon = RpcClient(conn.open_stream)
            code = await _status(
                anon.call(
                    "qpc.v1.Delivery/Enqueue",
                    service_pb2.EnqueueRequest(envelopes=[env_for(b, wall).to_proto()]),
                    service_pb2.EnqueueResponse,
                )
            )
            assert code == StatusCode.UNAUTHENTICATED
            await conn.aclose()

        # Fetch or ack someone else's mailbox.
        assert await _status(fetch_raw(a, identity=b.me)) == StatusCode.PERMISSION_DENIED
        assert (
            await _status(
                a._rpc.call(
                    "qpc.v1.Delivery/Ack",
                    service_pb2.AckRequest(up_to_seq=99, identity=b.me),
                    service_pb2.AckResponse,
                )
            )
            == StatusCode.PERMISSION_DENIED
        )
        # Enqueue for an identity that is not homed here.
        # Each envelope is answered on its own (issue 10): the call succeeds, the
        # envelope's result carries the refusal.
        stranger = Envelope(os.urandom(16), b"\x07" * 32, wall() + DAY_MS, 4, b"x" * 256)
        assert (await enqueue(a, stranger)).results[0].status == StatusCode.NOT_FOUND
        # Oversize payload (just over 5 MiB).
        big = env_for(b, wall, size=5 * 1024 * 1024 + 1)
        assert await _status(enqueue(a, big)) == StatusCode.PAYLOAD_TOO_LARGE
        # Expired envelope.
        old = Envelope(os.urandom(16), b.me, wall() - 1, 4, b"x" * 256)
        assert (await enqueue(a, old)).results[0].status == StatusCode.INVALID_ARGUMENT
        # A KeyPackage signed by someone else.
        other_kp = a.ident.key_package()
        assert (
            await _status(
                b._rpc.call(
                    "qpc.v1.Directory/Upload",
                    service_pb2.UploadKeyPackagesRequest(
                        packages=[service_pb2.KeyPackageUpload(key_package=other_kp)]
                    ),
                    service_pb2.UploadKeyPackagesResponse,
                )
            )
            == StatusCode.PERMISSION_DENIED
        )
        assert await node.store.depth(b.me) == before
        assert await node.store.count_keypackages(b.me, wall()) == kp_before


async def test_foreign_suite_keypackage_refused(tmp_path: Path, wall: ManualWallClock) -> None:
    # This node only accepts suite 3; our clients make suite-1 packages.
    async with running_node(tmp_path, wall, mls={"ciphersuites": "3"}) as (node, info):
        with pytest.raises(RpcError) as ei:
            async with users(tmp_path, info, wall, "a"):
                pass
        assert ei.value.code == StatusCode.INVALID_ARGUMENT
        assert "ciphersuite 0x0001 is not allowed" in ei.value.message
        assert node.store is not None
        rows = await node.store.audit_query(kind="keypackage.upload")
        assert rows == []


async def test_rate_limit(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall, limits={"rate_per_second": "2", "rate_burst": "30"}) as (
            node,
            info,
        ),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        assert node.store is not None
        before = await node.store.depth(b.me)
        codes = []
        for _ in range(40):  # bounded; the burst is 30 including the connect calls
            try:
                await enqueue(a, env_for(b, wall))
                codes.append(StatusCode.OK)
            except RpcError as exc:
                codes.append(exc.code)
        assert StatusCode.RESOURCE_EXHAUSTED in codes
        accepted = codes.count(StatusCode.OK)
        assert (await node.store.depth(b.me)).messages == before.messages + accepted
        assert node.audit is not None
        await node.audit.flush()  # the sink writes once a second; don't wait for that
        hits = await node.store.audit_query(kind="ratelimit.hit")
        assert len(hits) == codes.count(StatusCode.RESOURCE_EXHAUSTED)
