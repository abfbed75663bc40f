"""A real DeliveryService behind a real RpcServer and SQLite store, over the in-memory
transport (no QUIC): what the delivery-level unit tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.client import RpcClient
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.rpc.methods import MethodTable
from qpc_node.rpc.server import RpcServer
from qpc_node.service.audit import AuditSink
from qpc_node.service.delivery import DeliveryService
from qpc_node.service.guard import Guard
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.records import StoreLimits


@dataclass(slots=True)
class DeliveryNode:
    store: AsyncStore
    delivery: DeliveryService
    server: RpcServer
    nursery: trio.Nursery

    def session(self, user: bytes) -> RpcClient:
        """An RPC client whose session has proved ``user`` (auth is not under test)."""
        conn = MemoryConnection(self.server, self.nursery, PeerInfo(user.hex()[:8]))
        conn.state.session.user = user
        return RpcClient(conn.open_stream)


@asynccontextmanager
async def delivery_node(
    tmp: Path, limits: StoreLimits, local_users: Iterable[bytes]
) -> AsyncIterator[DeliveryNode]:
    """The node's delivery path with rate limits out of the way; ``local_users`` are
    homed here."""
    store = await AsyncStore.open(tmp / "node.db", limits=limits)
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
            delivery = DeliveryService(store, guard, wall_ms=system_wall_ms)
            delivery.register(table)
            for user in local_users:
                await delivery.mark_local(user)
            yield DeliveryNode(store, delivery, RpcServer(table), nursery)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
