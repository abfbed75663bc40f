"""Issue 12: DMs between users homed on different nodes, through the real node.

Three nodes A - B - C on loopback, configured only by ``mesh.static_peers``
(A and C are not peered). Users prove their key to their node with a signed home
binding; the routing core spreads node routes and bindings over the federation
Announce RPC; Delivery/Enqueue for a user homed elsewhere goes into custody
toward the next hop; Directory/Fetch proxies the KeyPackage, so /dm works.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import trio
from node_harness import mailbox_ids, texts

from qpc_node.client.agent import Agent
from qpc_node.client.connect import open_agent
from qpc_node.client.identity_store import open_user
from qpc_node.demo import open_line
from qpc_node.errors import StatusCode
from qpc_node.mesh.routing import HomeBinding, sign_binding
from qpc_node.node import Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.repl.runner import format_mesh
from qpc_node.rpc.errors import RpcError
from qpc_node.service.auth import auth_message
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2
from tests.integration.fed_nodes import until

if TYPE_CHECKING:
    from qpc_node.mesh.service import MeshService

pytestmark = pytest.mark.timeout(120)


def mesh_of(node: Node) -> MeshService:
    assert node.mesh is not None
    return node.mesh


@asynccontextmanager
async def line(tmp: Path) -> AsyncIterator[tuple[tuple[Node, NodeInfo], ...]]:
    """A - B - C as ``qpc demo`` builds it: A and C list only B; B lists both."""
    async with open_line(tmp) as nodes:
        a, b, c = ((n.node, n.info) for n in nodes)
        ids = {n.name: n.node_id for n in nodes}
        # Node routes converge: A reaches C via B.
        await until(lambda: mesh_of(a[0]).router.next_hop(ids["C"]) == ids["B"], within=20)
        await until(lambda: mesh_of(c[0]).router.next_hop(ids["A"]) == ids["B"], within=20)
        yield a, b, c


def user(tmp: Path, name: str, info: NodeInfo, wall: ManualWallClock) -> Any:
    """A user's client on its home node (real QUIC, MLS, client state)."""
    return open_agent(
        tmp / "users" / name, info.host, info.port, pin=info.cert_fingerprint, wall_ms=wall
    )


async def homed(node: Node, who: Agent, home: Node) -> None:
    """``node`` routes ``who`` toward ``home`` (the binding spread that far)."""
    want = mesh_of(home).node_id

    def known() -> bool:
        b = mesh_of(node).router.binding(who.me)
        return b is not None and b.node == want

    await until(known, within=20)


async def test_dm_across_two_hops_and_reply(tmp_path: Path, wall: ManualWallClock) -> None:
    with trio.fail_after(100):
        async with (
            line(tmp_path) as ((a_node, a_info), (b_node, b_info), (c_node, c_info)),
            user(tmp_path, "a", a_info, wall) as a,
            user(tmp_path, "b", b_info, wall) as b,
            user(tmp_path, "c", c_info, wall) as c,
        ):
            await homed(a_node, c, c_node)
            await homed(c_node, a, a_node)
            await homed(a_node, b, b_node)

            # /mesh peers and /mesh routes, as a's REPL shows them.
            view = await a.mesh_status()
            assert view.on_mesh and bytes(view.node_id) == mesh_of(a_node).node_id
            assert [(bytes(p.node_id), p.state) for p in view.peers] == [
                (mesh_of(b_node).node_id, "up")
            ]
            routes = {bytes(r.destination): (bytes(r.next_hop), r.hops) for r in view.routes}
            b_id, c_id = mesh_of(b_node).node_id, mesh_of(c_node).node_id
            assert routes[c_id] == (b_id, 2) and routes[b_id] == (b_id, 1)
            shown = format_mesh(view, "routes")
            # c is homed on C, b on B (a on A is this node, not a destination).
            assert f"{c_id.hex()[:16]}  via {b_id.hex()[:16]}  2 hops  1 user  seq" in shown
            assert [(p.hops, p.users) for p in view.peers] == [(1, 1)]
            peers = format_mesh(view, "peers")
            assert "rtt" in peers and "  1 hop  1 user" in peers

            # a DMs c by fingerprint: KeyPackage proxied A -> B -> C, Welcome and text
            # relayed A -> B -> C.
            relayed_by_b = _relay_in(b_node, mesh_of(a_node).node_id)
            await a.dm(c.ident.fingerprint, "hello c")
            assert [m.text for m in await texts(c, 1, wait=20)] == ["hello c"]
            assert _relay_in(b_node, mesh_of(a_node).node_id) > relayed_by_b
            assert not a_node.federation or not a_node.federation.link_up(mesh_of(c_node).node_id)
            # ... and c replies over the same conversation.
            await c.dm(a.ident.fingerprint, "hi a")
            assert [m.text for m in await texts(a, 1, wait=20)] == ["hi a"]

            # A group whose members live on three nodes: the commit's fan-out (atomic)
            # and the message go to each member's home.
            await a.group_create("team")
            await a.group_invite("team", b.ident.fingerprint)
            await a.group_invite("team", c.ident.fingerprint)
            await a.group_send("team", "hello team")
            assert "hello team" in [m.text for m in await texts(b, 1, wait=20)]
            assert "hello team" in [m.text for m in await texts(c, 1, wait=20)]

            # Latency of one more text: 2 hops (a -> c) vs 1 hop (a -> b).
            await a.dm(b.ident.fingerprint, "hello b")
            assert [m.text for m in await texts(b, 1, wait=20)] == ["hello b"]
            two = [await _latency(a, c, f"again c {i}") for i in range(5)]
            one = [await _latency(a, b, f"again b {i}") for i in range(5)]
            print(
                f"mesh dm latency (dm call to text shown, median of 5): "
                f"1 hop {statistics.median(one) * 1000:.0f} ms, "
                f"2 hops {statistics.median(two) * 1000:.0f} ms"
            )


def _relay_in(node: Node, from_node: bytes) -> int:
    assert node.federation is not None
    for n in node.federation.statistics().neighbours:
        if n.node_id == from_node:
            return sum(n.relay_in.values())
    return 0


async def _latency(sender: Agent, to: Agent, text: str) -> float:
    t0 = trio.current_time()
    await sender.dm(to.ident.fingerprint, text)
    assert [m.text for m in await texts(to, 1, wait=20)] == [text]
    return trio.current_time() - t0


async def _enqueue(agent: Agent, env: Envelope) -> service_pb2.EnqueueResult:
    resp = await agent._rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
        service_pb2.EnqueueResponse,
    )
    (res,) = resp.results
    return res


async def test_hop_limit_one_stops_at_b_and_no_route_is_retried(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    with trio.fail_after(100):
        async with (
            line(tmp_path) as ((a_node, a_info), (_b, _), (c_node, c_info)),
            user(tmp_path, "a", a_info, wall) as a,
            user(tmp_path, "c", c_info, wall) as c,
        ):
            await homed(a_node, c, c_node)
            fed_a = a_node.federation
            assert fed_a is not None

            # hop_limit 1 toward a home 2 hops away: A knows the distance and refuses
            # it at once, typed and final, in the sender's EnqueueResult (before: A
            # took custody, answered OK, and only A's refusal log learnt B's answer).
            stop = Envelope(os.urandom(16), c.me, wall() + 3_600_000, 1, os.urandom(64))
            go = Envelope(os.urandom(16), c.me, wall() + 3_600_000, 2, os.urandom(64))
            res = await _enqueue(a, stop)
            assert res.status == StatusCode.FAILED_PRECONDITION, res
            assert "RELAY_HOP_LIMIT_EXCEEDED" in res.detail and "2 hops" in res.detail, res
            assert (await _enqueue(a, go)).status == StatusCode.OK
            # The client's outbox drops it with a warning, counted (never retried).
            await a._state.call(a._st.outbox_add, stop.msg_id, stop.encode(), wall())
            assert await a.flush_outbox() == 0
            assert a.stats.send_dropped == 1
            assert fed_a.refusals() == []  # never taken into custody

            async def got_go() -> bool:
                return go.msg_id in await mailbox_ids(c)

            await until(got_go, within=20)
            assert stop.msg_id not in await mailbox_ids(c)

            # A user nobody has a binding for yet: A holds it (store-and-forward) and
            # says so; it goes on by itself once the user appears on C.
            y_dir = tmp_path / "users" / "y"
            y_me = bytes.fromhex(open_user(y_dir).ident.fingerprint)
            raw = a._envelope(y_me, client_pb2.Sealed.MLS_MESSAGE, b"g", b"for y")
            res = await _enqueue(a, raw)
            assert res.status == StatusCode.OK and res.held and res.hops == 0, res
            assert a.stats.send_dropped == 1  # (the hop_limit one above)

            async with open_agent(
                y_dir, c_info.host, c_info.port, pin=c_info.cert_fingerprint, wall_ms=wall
            ) as y:
                await homed(a_node, y, c_node)

                async def y_has_it() -> bool:
                    return raw.msg_id in await mailbox_ids(y)

                await until(y_has_it, within=20)


async def test_prove_refuses_a_binding_not_for_this_node_or_key(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A home binding must be signed by the proving identity, for this node, and
    verify; anything else fails Auth/Prove with a typed INVALID_ARGUMENT."""
    with trio.fail_after(100):
        async with (
            line(tmp_path) as ((a_node, a_info), _, (_, c_info)),
            user(tmp_path, "a", a_info, wall) as a,
            user(tmp_path, "c", c_info, wall) as c,
        ):
            here = mesh_of(a_node).node_id
            now = wall()

            async def prove(home: HomeBinding) -> RpcError:
                ch = await a._rpc.call(
                    "qpc.v1.Auth/Challenge",
                    service_pb2.AuthChallengeRequest(),
                    service_pb2.AuthChallengeResponse,
                )
                assert ch.node_id == here
                req = service_pb2.AuthProveRequest(
                    public_key=a.ident.public_key,
                    signature=a.ident.sign(auth_message(ch.nonce, a._node_fpr)),
                    home=home.to_proto(),
                )
                with pytest.raises(RpcError) as ei:
                    await a._rpc.call(
                        "qpc.v1.Auth/Prove", req, service_pb2.AuthProveResponse, retries=0
                    )
                assert ei.value.code == StatusCode.INVALID_ARGUMENT
                return ei.value

            def signed(ident: Any, node: bytes, seq: int) -> HomeBinding:
                return sign_binding(ident.public_key, ident.sign, node, seq, now + 3_600_000)

            err = await prove(signed(a.ident, b"\x07" * 32, now + 1))
            assert "another node" in err.message
            err = await prove(signed(c.ident, here, now + 1))
            assert "proving identity" in err.message
            forged = msgspec.structs.replace(signed(a.ident, here, now + 1), seq=now + 2)
            err = await prove(forged)
            assert "forged" in err.message
            b = mesh_of(a_node).router.binding(a.me)
            assert b is not None and b.seq <= now  # the good one from login stands
