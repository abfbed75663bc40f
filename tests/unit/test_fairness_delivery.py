"""Fairness through the Delivery service (real RpcServer and SQLite, in-memory
transport): the session's identity is the sender, a recipient's own sends make it
accept their peers, and an envelope past a stranger's share is refused on its own
while the rest of its batch is stored."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from qpc_node.errors import StatusCode
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.client import RpcClient
from qpc_node.store.records import StoreLimits
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2
from tests.unit.delivery_kit import DeliveryNode, delivery_node

VICTIM = b"\x01" * 32
CONTACT = b"\x02" * 32
OTHER = b"\x03" * 32
STRANGER = b"\x04" * 32
# 200 messages: a pool of 20, shares of 2.
LIMITS = StoreLimits(mailbox_max_messages=200)


@asynccontextmanager
async def node(tmp: Path) -> AsyncIterator[DeliveryNode]:
    async with delivery_node(tmp, LIMITS, (VICTIM, CONTACT, OTHER, STRANGER)) as dn:
        yield dn


def to(recipient: bytes) -> Envelope:
    return Envelope(os.urandom(16), recipient, system_wall_ms() + 86_400_000, 4, os.urandom(64))


async def send(rpc: RpcClient, *envs: Envelope) -> list[StatusCode]:
    resp = await rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=[e.to_proto() for e in envs]),
        service_pb2.EnqueueResponse,
        retries=0,
    )
    return [StatusCode(r.status) for r in resp.results]


async def test_past_the_share_each_envelope_is_refused_alone(tmp_path: Path) -> None:
    async with node(tmp_path) as env:
        stranger = env.session(STRANGER)
        codes = await send(stranger, to(VICTIM), to(VICTIM), to(VICTIM), to(OTHER), to(VICTIM))
        R, OK = StatusCode.RESOURCE_EXHAUSTED, StatusCode.OK
        assert codes == [OK, OK, R, OK, R]
        assert (await env.store.depth(VICTIM)).messages == 2
        assert (await env.store.depth(OTHER)).messages == 1


async def test_the_recipients_own_send_accepts_the_peer(tmp_path: Path) -> None:
    async with node(tmp_path) as env:
        contact, victim = env.session(CONTACT), env.session(VICTIM)
        assert await send(contact, *[to(VICTIM) for _ in range(3)]) == [
            StatusCode.OK,
            StatusCode.OK,
            StatusCode.RESOURCE_EXHAUSTED,
        ]
        assert await send(victim, to(CONTACT)) == [StatusCode.OK]
        # Now the contact is bound by the mailbox quota only (200 - the 2 it stored).
        codes = await send(contact, *[to(VICTIM) for _ in range(198)])
        assert set(codes) == {StatusCode.OK}
        assert await send(contact, to(VICTIM)) == [StatusCode.RESOURCE_EXHAUSTED]
        stats = env.store.statistics().store
        assert (stats.quota_rejections, stats.refused_stranger_share) == (2, 1)
