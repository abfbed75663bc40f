"""Issue 12: home bindings outlive a node restart; the old home hands over a re-homed
user's mail.

Real nodes on loopback configured by ``mesh.static_peers`` (the helpers of
test_mesh_dm.py), stopped and started again on the same data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from node_harness import mailbox_ids

from qpc_node.client.agent import Agent
from qpc_node.node import Node
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.store.federation import mailbox_has_mail
from qpc_node.store.held import delivered
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import federation_pb2
from tests.integration.fed_nodes import free_port, identity, mesh_node, until
from tests.integration.test_mesh_dm import _enqueue, homed, mesh_of, user

pytestmark = pytest.mark.timeout(120)


def home_of(node: Node, who: bytes) -> bytes | None:
    b = mesh_of(node).router.binding(who)
    return None if b is None else b.node


async def test_bindings_survive_a_restart_and_are_announced_again(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A restarted node knows where users are homed before any link is up, and a node
    that never saw those users learns them from it (nobody logged in again)."""
    ids = {n: identity(tmp_path, n)[1] for n in "abc"}
    ports = {n: free_port() for n in "abc"}
    with trio.fail_after(100):
        async with (
            mesh_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (b_node, b_info),
            mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, a_info),
            user(tmp_path, "x", a_info, wall) as x,
            user(tmp_path, "y", b_info, wall) as y,
        ):
            await homed(a_node, y, b_node)
            await homed(a_node, x, a_node)
            xid, yid = x.me, y.me
        # Both stopped. A starts again alone: B is down, so nobody re-announces.
        async with mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, _):
            assert home_of(a_node, yid) == ids["b"]
            assert home_of(a_node, xid) == ids["a"]
            assert mesh_of(a_node).router.statistics().bindings_restored == 2
            # C never saw x or y; its only neighbour is A, whose users did not log in again.
            async with mesh_node(tmp_path, "c", ports["c"], [(ports["a"], ids["a"])]) as (c, _):
                await until(lambda: home_of(c, xid) == ids["a"], within=20)
                await until(lambda: home_of(c, yid) == ids["b"], within=20)


async def test_old_home_hands_over_mail_after_the_user_re_homed(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """u is homed on A and has unread mail there; while A is down, u re-homes on B.
    When A comes back it learns the newer binding and moves u's unacked mail into
    custody toward B: B's mailbox holds each message exactly once, A's none."""
    ids = {n: identity(tmp_path, n)[1] for n in "ab"}
    ports = {n: free_port() for n in "ab"}
    sent: list[bytes] = []
    with trio.fail_after(100):
        async with (
            mesh_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (b_node, b_info),
            mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, a_info),
            user(tmp_path, "u", a_info, wall) as u,
            user(tmp_path, "s", b_info, wall) as s,
        ):
            await homed(b_node, u, a_node)
            for _ in range(5):  # s on B writes to u on A: relayed, stored in A's mailbox
                env = Envelope(os.urandom(16), u.me, wall() + 86_400_000, 8, os.urandom(64))
                res = await _enqueue(s, env)
                assert res.status == 0, res.detail
                sent.append(env.msg_id)
            await until(lambda: _ids(u, len(sent)), within=20)
            uid = u.me
        wall.advance(1_000)  # u's next binding has a higher seq
        async with (
            mesh_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (
                b_node,
                b_info,
            ),
            user(tmp_path, "u", b_info, wall) as u,
        ):
            await until(lambda: home_of(b_node, uid) == ids["b"], within=20)
            assert await mailbox_ids(u) == []
            # A comes back: its own store still says u is homed on A.
            async with mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (
                a_node,
                _,
            ):
                await until(lambda: _ids(u, len(sent)), within=30)
                assert sorted(await mailbox_ids(u)) == sorted(sent)  # each exactly once
                fed = a_node.federation
                assert fed is not None and fed.custody.handed_over == len(sent)
                assert a_node.store is not None
                left = await a_node.store.run(
                    lambda st: mailbox_has_mail(st, uid, system_wall_ms())
                )
                assert not left
                await until(lambda: fed.statistics().queued == 0, within=10)
                # New mail for u that reaches A now is routed to B, not stored at A.
                late = Envelope(os.urandom(16), uid, wall() + 86_400_000, 8, os.urandom(64))
                (res,) = await fed.submit([late.to_proto()], origin=b"\x05" * 32)
                assert res.status == federation_pb2.RELAY_QUEUED
                await until(lambda: _ids(u, len(sent) + 1), within=20)
                assert sorted(await mailbox_ids(u)) == sorted([*sent, late.msg_id])


async def _ids(agent: Agent, want: int) -> bool:
    return len(await mailbox_ids(agent)) >= want


async def test_handover_passes_a_relay_holding_the_delivered_tombstone(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A - R - B: s on B writes to u on A through R; A stores it and its receipt leaves
    R a delivered tombstone of each msg_id. u re-homes on B while A is down; A comes
    back and hands u's unread mail over through R. R must relay the handed-over
    copies on (a hand-over, not a late copy of delivered mail): u gets every message
    at B exactly once, and a replayed hand-over is still a duplicate."""
    ids = {n: identity(tmp_path, n)[1] for n in "arb"}
    ports = {n: free_port() for n in "arb"}
    sent: list[bytes] = []
    with trio.fail_after(110):
        async with (
            mesh_node(
                tmp_path, "r", ports["r"], [(ports["a"], ids["a"]), (ports["b"], ids["b"])]
            ) as (r_node, _),
            mesh_node(tmp_path, "b", ports["b"], [(ports["r"], ids["r"])]) as (b_node, b_info),
        ):
            async with (
                mesh_node(tmp_path, "a", ports["a"], [(ports["r"], ids["r"])]) as (a_node, a_info),
                user(tmp_path, "u", a_info, wall) as u,
                user(tmp_path, "s", b_info, wall) as s,
            ):
                await homed(b_node, u, a_node)
                for _ in range(5):  # relayed B -> R -> A, stored in A's mailbox
                    env = Envelope(os.urandom(16), u.me, wall() + 86_400_000, 8, os.urandom(64))
                    res = await _enqueue(s, env)
                    assert res.status == 0, res.detail
                    sent.append(env.msg_id)
                await until(lambda: _ids(u, len(sent)), within=20)
                uid = u.me
                assert r_node.store is not None
                r_store = r_node.store

                async def tombstones() -> bool:
                    got = [await r_store.run(lambda st, m=m: delivered(st, m)) for m in sent]
                    return all(got)

                await until(tombstones, within=20)  # A's receipts reached R
            wall.advance(1_000)  # u's next binding has a higher seq
            async with user(tmp_path, "u", b_info, wall) as u:
                await until(lambda: home_of(b_node, uid) == ids["b"], within=20)
                await until(lambda: home_of(r_node, uid) == ids["b"], within=20)
                assert await mailbox_ids(u) == []
                async with mesh_node(tmp_path, "a", ports["a"], [(ports["r"], ids["r"])]) as (
                    a_node,
                    _,
                ):
                    fed = a_node.federation
                    assert fed is not None
                    await until(lambda: fed.custody.handed_over == len(sent), within=30)
                    await until(lambda: fed.statistics().queued == 0, within=20)
                    await until(lambda: _ids(u, len(sent)), within=20)
                    assert sorted(await mailbox_ids(u)) == sorted(sent)  # each exactly once
                    assert not [x for x in fed.custody.refusals() if x.msg_id in sent]
                    # B's receipts close R's tombstones again: a replayed hand-over of
                    # the same mail is a duplicate at R now.
                    await until(tombstones, within=20)
                    r_fed = r_node.federation
                    assert r_fed is not None
                    env = Envelope(sent[0], uid, wall() + 86_400_000, 8, os.urandom(64))
                    (res,) = await r_fed.take_custody(
                        [env.to_proto()], from_node=ids["a"], handover=[True]
                    )
                    assert res.status == federation_pb2.RELAY_DUPLICATE
