"""Node/MeshTrust: who may re-pin a node's federation key (docs/threat-model.md).

A real Guard, RpcServer and MeshStatusService over the in-memory transport; the
caller's address is what the QUIC layer would report. The loopback rule is
checked before anything else is looked at, so a node without a mesh shows it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from qpc_node.errors import StatusCode
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.client import NO_RETRY, RpcClient
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.errors import RpcError
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.rpc.methods import MethodTable
from qpc_node.rpc.server import RpcServer
from qpc_node.service.audit import AuditSink
from qpc_node.service.guard import Guard
from qpc_node.service.mesh_status import MESH_TRUST_METHOD, MeshStatusService
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.records import AuditEvent
from qpc_node.wire.gen.qpc.v1 import ops_pb2

USER = b"\x42" * 32
AUDITED: list[AuditEvent] = []


@asynccontextmanager
async def trust_rpc(tmp: Path) -> AsyncIterator[tuple[RpcServer, trio.Nursery]]:
    store = await AsyncStore.open(tmp / "node.db")
    try:
        async with trio.open_nursery() as nursery:
            audit = AuditSink(store)
            await nursery.start(audit.run)

            def limiter() -> TokenBucketLimiter[str]:
                return TokenBucketLimiter[str](rate=1e9, burst=1e9)

            guard = Guard(
                per_ip=limiter(), per_identity=limiter(), audit=audit, wall_ms=system_wall_ms
            )
            table = MethodTable()
            MeshStatusService(None, guard, AUDITED.append).register(table)
            yield RpcServer(table), nursery
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def call_from(
    server: RpcServer, nursery: trio.Nursery, host: str, *, authed: bool = True
) -> StatusCode:
    conn = MemoryConnection(server, nursery, PeerInfo("t", remote_address=(host, 50000)))
    if authed:
        conn.state.session.user = USER
    client = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
    with pytest.raises(RpcError) as info:
        await client.call(
            MESH_TRUST_METHOD,
            ops_pb2.MeshTrustRequest(fingerprint="ab" * 32),
            ops_pb2.MeshTrustResponse,
        )
    return StatusCode(info.value.code)


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("10.0.0.1", StatusCode.PERMISSION_DENIED),  # a community user over the mesh
        ("fe80::1%3", StatusCode.PERMISSION_DENIED),
        ("2001:db8::1", StatusCode.PERMISSION_DENIED),
        ("0.0.0.0", StatusCode.PERMISSION_DENIED),
        ("127.0.0.1", StatusCode.FAILED_PRECONDITION),  # the operator: past the rule
        ("127.0.0.9", StatusCode.FAILED_PRECONDITION),
        ("::1", StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_only_loopback_callers_may_trust(tmp_path: Path, host: str, want: StatusCode) -> None:
    AUDITED.clear()
    with trio.fail_after(10):
        async with trust_rpc(tmp_path) as (server, nursery):
            assert await call_from(server, nursery, host) == want
    denied = [(e.kind, e.subject) for e in AUDITED if e.kind == "federation.trust_denied"]
    if want is StatusCode.PERMISSION_DENIED:  # a refused attempt is in the audit trail
        assert denied == [("federation.trust_denied", host)]
    else:
        assert denied == []


async def test_trust_needs_a_session_even_on_loopback(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with trust_rpc(tmp_path) as (server, nursery):
            code = await call_from(server, nursery, "127.0.0.1", authed=False)
            assert code == StatusCode.UNAUTHENTICATED
