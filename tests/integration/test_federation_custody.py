"""Hop-by-hop custody: a relay that dies loses nothing it acknowledged, delivers nothing twice.

A - B - C on loopback. B is stopped abruptly (its node's nursery cancelled: the
tasks die where they are; what SQLite committed is all that survives) and
restarted from the same data directory and port.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from qpc_node.federation.core import FederationLimits
from qpc_node.federation.routes import StaticRoutes
from qpc_node.wire.gen.qpc.v1 import federation_pb2
from tests.integration.fed_nodes import (
    USER_A,
    USER_C,
    FedNode,
    envelope,
    fed_node,
    free_port,
    identity,
    mailbox,
    peer,
    until,
    wrote_to,
)

N = 300
SMALL_BATCHES = FederationLimits(relay_batch=8)  # many round trips: B dies between some


async def count_at(c: FedNode) -> int:
    return len(await mailbox(c, USER_C))


async def test_relay_killed_mid_way_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    _, c_id = identity(tmp_path, "c")
    pb, pc = free_port(), free_port()
    msgs = [os.urandom(16) for _ in range(N)]
    first, second = msgs[: N // 2], msgs[N // 2 :]

    def b_node() -> object:
        return fed_node(
            tmp_path,
            "b",
            port=pb,
            routes=StaticRoutes(b_id, {USER_C: c_id}),
            peers=(peer(pc, c_id),),
            limits=SMALL_BATCHES,
        )

    with trio.fail_after(90):
        async with fed_node(
            tmp_path,
            "a",
            routes=StaticRoutes(a_id, {USER_C: c_id}, via={c_id: b_id}),
            peers=(peer(pb, b_id),),
            limits=SMALL_BATCHES,
        ) as a:
            # Life 1 of B: C is down, so B can only hold what it takes.
            async with b_node() as b:  # type: ignore[attr-defined]
                res = await a.fed.submit([envelope(m, USER_C) for m in first], origin=USER_A)
                assert {r.status for r in res} == {federation_pb2.RELAY_QUEUED}
                await until(lambda: a.fed.statistics().queued == 0)  # all acknowledged by B
                assert b.fed.statistics().queued == len(first)
            # B is gone with N/2 envelopes in its custody and nobody else holding them.
            async with fed_node(
                tmp_path, "c", port=pc, routes=StaticRoutes(c_id, {USER_C: c_id})
            ) as c:
                await wrote_to(c, USER_C, USER_A)  # N from USER_A: more than a stranger's share
                # Life 2 of B: drains what it held; dies again mid-way through the rest.
                async with b_node() as b:  # type: ignore[attr-defined]
                    # What B acknowledged in life 1 reaches C from B's SQLite queue alone.
                    async def first_half() -> bool:
                        return await count_at(c) == len(first)

                    await until(first_half, within=30)
                    await a.fed.wait_link(b_id)
                    await a.fed.submit([envelope(m, USER_C) for m in second], origin=USER_A)

                    async def mid_way() -> bool:
                        return await count_at(c) >= len(first) + 10

                    await until(mid_way, within=30)
                # Life 3 of B: whatever A still holds is retried, whatever B took is drained.
                async with b_node():

                    async def all_delivered() -> bool:
                        return await count_at(c) == N

                    await until(all_delivered, within=60)
                    await until(lambda: a.fed.statistics().queued == 0)
                got = await mailbox(c, USER_C)
    ids = [e.msg_id for e in got]
    assert len(ids) == N and set(ids) == set(msgs)  # every one, none twice
