"""Per-envelope Enqueue results: the node stores the good envelopes of a mixed batch.

A real RpcServer, DeliveryService and SQLite store (in-memory transport, no QUIC):
one batch carries envelopes for a local mailbox, a recipient not homed here, a
mailbox that is full, an expired envelope and a duplicate; each gets its own
status, in request order, and only the good ones are stored.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from qpc_node.errors import StatusCode
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.client import RpcClient
from qpc_node.service.delivery import DeliveryService
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.records import StoreLimits
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2
from tests.unit.delivery_kit import DeliveryNode, delivery_node

SENDER = b"\x01" * 32
LOCAL = b"\x02" * 32
FULL = b"\x03" * 32
STRANGER = b"\x04" * 32
DAY_MS = 86_400_000
MAILBOX_MAX = 3


@dataclass(slots=True)
class Env:
    node: DeliveryNode
    rpc: RpcClient  # SENDER's session

    @property
    def store(self) -> AsyncStore:
        return self.node.store

    @property
    def delivery(self) -> DeliveryService:
        return self.node.delivery

    def session(self, user: bytes) -> RpcClient:
        return self.node.session(user)


@asynccontextmanager
async def node(tmp: Path) -> AsyncIterator[Env]:
    # Every sender may fill a whole mailbox here (stranger pool = 100 %, one share):
    # this is about per-envelope results; fairness has its own tests (test_fairness*).
    limits = StoreLimits(
        mailbox_max_messages=MAILBOX_MAX, stranger_pool_percent=100, stranger_shares=1
    )
    async with delivery_node(tmp, limits, (SENDER, LOCAL, FULL)) as dn:
        yield Env(dn, dn.session(SENDER))


def env_for(recipient: bytes, *, expiry_ms: int | None = None) -> Envelope:
    expiry = system_wall_ms() + DAY_MS if expiry_ms is None else expiry_ms
    return Envelope(os.urandom(16), recipient, expiry, 4, os.urandom(256))


async def enqueue(env: Env, *envs: Envelope) -> list[service_pb2.EnqueueResult]:
    resp = await env.rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs]),
        service_pb2.EnqueueResponse,
        retries=0,
    )
    return list(resp.results)


async def test_mixed_batch_stores_the_good_ones(tmp_path: Path) -> None:
    async with node(tmp_path) as env:
        # FULL's mailbox holds MAILBOX_MAX - 1: one more fits, the second does not.
        await enqueue(env, *[env_for(FULL) for _ in range(MAILBOX_MAX - 1)])
        good = env_for(LOCAL)
        batch = [
            good,
            env_for(STRANGER),
            fits := env_for(FULL),
            env_for(FULL),
            env_for(LOCAL, expiry_ms=1),
            good,  # the same msg_id again within one batch: a duplicate, not a refusal
            good2 := env_for(LOCAL),
        ]
        results = await enqueue(env, *batch)

        assert [bytes(r.msg_id) for r in results] == [e.msg_id for e in batch]
        assert [StatusCode(r.status) for r in results] == [
            StatusCode.OK,
            StatusCode.NOT_FOUND,
            StatusCode.OK,
            StatusCode.RESOURCE_EXHAUSTED,
            StatusCode.INVALID_ARGUMENT,
            StatusCode.OK,
            StatusCode.OK,
        ]
        assert "not homed here" in results[1].detail
        assert "quota" in results[3].detail
        assert results[0].detail == ""
        assert (results[0].seq, results[5].seq, results[5].duplicate) == (1, 1, True)
        assert results[6].seq == 2 and results[1].seq == results[3].seq == 0

        local = await env.store.fetch(LOCAL, now_ms=system_wall_ms())
        assert [m.envelope.msg_id for m in local.messages] == [good.msg_id, good2.msg_id]
        full = await env.store.fetch(FULL, now_ms=system_wall_ms())
        assert len(full.messages) == MAILBOX_MAX
        assert full.messages[-1].envelope.msg_id == fits.msg_id
        assert (await env.store.depth(STRANGER)).messages == 0


async def test_a_parked_fetch_is_woken_by_a_partly_refused_batch(tmp_path: Path) -> None:
    async with node(tmp_path) as env:
        woken = trio.Event()

        async def park() -> None:
            res = await env.session(LOCAL).call(
                "qpc.v1.Delivery/Fetch",
                service_pb2.FetchRequest(wait_ms=20_000),
                service_pb2.FetchResponse,
                timeout=30.0,
            )
            assert len(res.messages) == 1
            woken.set()

        async with trio.open_nursery() as n:
            n.start_soon(park)
            # The fetch reads the store (a worker thread) before it parks: poll, bounded.
            for _ in range(2000):
                if len(env.delivery.waiters) == 1:
                    break
                await trio.sleep(0.005)
            assert len(env.delivery.waiters) == 1
            await enqueue(env, env_for(STRANGER), env_for(LOCAL))
            with trio.fail_after(10):
                await woken.wait()


async def enqueue_atomic(env: Env, *envs: Envelope) -> list[tuple[StatusCode, int]]:
    resp = await env.rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs], atomic=True),
        service_pb2.EnqueueResponse,
        retries=0,
    )
    assert [bytes(r.msg_id) for r in resp.results] == [e.msg_id for e in envs]
    return [(StatusCode(r.status), r.seq) for r in resp.results]


async def test_atomic_batch_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    """A commit's fan-out: one refused envelope means none is stored, each says why."""
    async with node(tmp_path) as env:
        assert await enqueue_atomic(env, env_for(LOCAL), env_for(STRANGER), env_for(FULL)) == [
            (StatusCode.ABORTED, 0),
            (StatusCode.NOT_FOUND, 0),
            (StatusCode.ABORTED, 0),
        ]
        await enqueue(env, *[env_for(FULL) for _ in range(MAILBOX_MAX)])
        # Over quota (the store's refusal names no single envelope): all retriable.
        assert await enqueue_atomic(env, env_for(LOCAL), env_for(FULL)) == [
            (StatusCode.RESOURCE_EXHAUSTED, 0),
            (StatusCode.RESOURCE_EXHAUSTED, 0),
        ]
        # An expired envelope is the store's refusal of that one envelope.
        assert await enqueue_atomic(env, env_for(LOCAL), env_for(LOCAL, expiry_ms=1)) == [
            (StatusCode.ABORTED, 0),
            (StatusCode.INVALID_ARGUMENT, 0),
        ]
        assert (await env.store.depth(LOCAL)).messages == 0
        assert await enqueue_atomic(env, env_for(LOCAL), env_for(LOCAL)) == [
            (StatusCode.OK, 1),
            (StatusCode.OK, 2),
        ]
