"""Store-and-forward with the real routing core: A - B - C configured by static peers
(mesh_node), users homed by signed bindings. C goes away; once the mesh has
withdrawn its routes, a DM from a's user is held by A ("held on this node until a
route appears"); C comes back, its routes return, the routing core's update wakes
the release at A, and the DM reaches c's mailbox exactly once; C's receipt,
checked against the routing core's binding of c (home = C), travels back to A."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from qpc_node.client.connect import open_agent
from qpc_node.errors import StatusCode
from qpc_node.node import Node
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.store.held import delivered, held_count
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2
from tests.integration.fed_nodes import free_port, identity, mesh_node, until

pytestmark = pytest.mark.timeout(120)


def mesh(node: Node):  # type: ignore[no-untyped-def]
    assert node.mesh is not None
    return node.mesh


async def test_a_dm_held_while_the_home_is_away_is_delivered_once_when_it_returns(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    ports = {n: free_port() for n in "abc"}
    ids = {n: identity(tmp_path, n)[1] for n in "abc"}
    with trio.fail_after(100):
        async with (
            mesh_node(
                tmp_path, "b", ports["b"], [(ports["a"], ids["a"]), (ports["c"], ids["c"])]
            ) as (_b, _),
            mesh_node(tmp_path, "a", ports["a"], [(ports["b"], ids["b"])]) as (a_node, a_info),
            open_agent(
                tmp_path / "users" / "a", a_info.host, a_info.port, pin=a_info.cert_fingerprint,
                wall_ms=wall,
            ) as ua,
        ):  # fmt: skip
            async with (
                mesh_node(tmp_path, "c", ports["c"], [(ports["b"], ids["b"])]) as (_, c_info),
                open_agent(
                    tmp_path / "users" / "c", c_info.host, c_info.port,
                    pin=c_info.cert_fingerprint, wall_ms=wall,
                ) as uc,
            ):  # fmt: skip
                c_me = uc.me

                def routed() -> bool:
                    b = mesh(a_node).router.binding(c_me)
                    return (
                        mesh(a_node).router.next_hop(ids["c"]) == ids["b"]
                        and b is not None
                        and b.node == ids["c"]
                    )

                await until(routed, within=30)
            # C is gone: B withdraws its routes, then A does.
            await until(lambda: mesh(a_node).router.next_hop(ids["c"]) is None, within=30)
            env = Envelope(os.urandom(16), c_me, system_wall_ms() + 600_000, 8, os.urandom(64))
            resp = await ua._rpc.call(
                "qpc.v1.Delivery/Enqueue",
                service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
                service_pb2.EnqueueResponse,
            )
            (res,) = resp.results
            assert res.status == StatusCode.OK and res.held and res.hops == 0, res
            a_store = a_node.store
            assert a_store is not None
            assert await a_store.run(held_count) == 1

            async with (
                mesh_node(tmp_path, "c", ports["c"], [(ports["b"], ids["b"])]) as (c_node, c_info),
            ):
                c_store = c_node.store
                assert c_store is not None

                async def arrived() -> bool:
                    got = await c_store.fetch(c_me, now_ms=system_wall_ms(), after_seq=0, limit=10)
                    return any(m.envelope.msg_id == env.msg_id for m in got.messages)

                await until(arrived, within=30)
                got = await c_store.fetch(c_me, now_ms=system_wall_ms(), after_seq=0, limit=10)
                assert [m.envelope.msg_id for m in got.messages] == [env.msg_id]  # once

                async def receipted() -> bool:
                    return await a_store.run(lambda s: delivered(s, env.msg_id))

                await until(receipted, within=15)
                assert await a_store.run(held_count) == 0
                fed_a = a_node.federation
                assert fed_a is not None
                sf = fed_a.statistics().storefwd
                assert (sf.held, sf.released, sf.receipts_applied) == (1, 1, 1)
                assert sf.receipts_unknown_home == 0 and sf.receipts_wrong_home == 0


async def test_carrier_and_storefwd_config_reach_the_federation(tmp_path: Path) -> None:
    """``mesh.carrier`` and ``storefwd.*`` from the node's config: the carrier says so
    in its Pings (its neighbour sees a carrier link), and the hold policy is in force."""
    ports = {n: free_port() for n in "ab"}
    ids = {n: identity(tmp_path, n)[1] for n in "ab"}
    with trio.fail_after(40):
        async with (
            mesh_node(
                tmp_path, "a", ports["a"], [(ports["b"], ids["b"])],
                mesh={"carrier": "true"},
                storefwd={"spray_delay_s": "2", "max_held": "100"},
            ) as (a_node, _),
            mesh_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (b_node, _),
        ):  # fmt: skip
            fa, fb = a_node.federation, b_node.federation
            assert fa is not None and fb is not None
            policy = fa.limits.storefwd
            assert (policy.carrier, policy.spray_delay_s, policy.max_held) == (True, 2.0, 100)
            assert not fb.limits.storefwd.carrier

            def carrier_seen() -> bool:
                link = fb._links.get(ids["a"])
                return link is not None and link.carrier

            await until(carrier_seen, within=20)
            back = fa._links.get(ids["b"])
            assert back is not None and not back.carrier
