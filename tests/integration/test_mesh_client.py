"""The client on a mesh (issue 12), in-process on real QUIC: what /mesh dm reports,
moving to another node (/mesh server), and a second copy of a message from
another node never shown twice.

Nodes A - B - C on loopback (``test_mesh_dm.line``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from node_harness import texts

from qpc_node.client.agent import Agent
from qpc_node.client.connect import open_session
from qpc_node.client.outbox import Sent
from qpc_node.client.session import Session, Target
from qpc_node.errors import QpcError
from qpc_node.node import NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import ALPN_CLIENT, ClientTLS
from qpc_node.repl.runner import Repl, describe_route
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import service_pb2
from tests.integration.test_mesh_dm import homed, line, mesh_of, user

pytestmark = pytest.mark.timeout(150)


@asynccontextmanager
async def session_user(
    tmp: Path, name: str, info: NodeInfo, wall: ManualWallClock
) -> AsyncIterator[tuple[Agent, Session]]:
    async with open_session(
        tmp / "users" / name, info.host, info.port, pin=info.cert_fingerprint, wall_ms=wall
    ) as pair:
        yield pair


async def test_dm_report_says_stored_or_relayed_via_n_hops(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    with trio.fail_after(120):
        async with (
            line(tmp_path) as ((a_node, a_info), (b_node, b_info), (c_node, c_info)),
            user(tmp_path, "a", a_info, wall) as a,
            user(tmp_path, "a2", a_info, wall) as a2,
            user(tmp_path, "b", b_info, wall) as b,
            user(tmp_path, "c", c_info, wall) as c,
        ):
            await homed(a_node, c, c_node)
            await homed(a_node, b, b_node)
            got = await a.dm_report(c.ident.fingerprint, "two hops")
            assert (got.fate, got.hops) == (Sent.DELIVERED, 2)
            assert describe_route(got) == "(relayed via 2 hops)"
            got = await a.dm_report(b.ident.fingerprint, "one hop")
            assert describe_route(got) == "(relayed via 1 hop)"
            got = await a.dm_report(a2.ident.fingerprint, "here")
            assert describe_route(got) == "(stored on this node)"
            assert [m.text for m in await texts(c, 1, wait=20)] == ["two hops"]


async def test_move_to_another_node_rehomes_and_skips_a_second_copy(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """u moves from A to B (/mesh server: node-id pin, new binding, cursor per node);
    v's DMs follow u there; the same envelope delivered again by another node (as an
    old home forwards what it held) is skipped, not shown or warned about."""
    with trio.fail_after(120):
        async with (
            line(tmp_path) as ((a_node, a_info), (b_node, b_info), _c),
            session_user(tmp_path, "u", a_info, wall) as (u, u_session),
            user(tmp_path, "v", a_info, wall) as v,
        ):
            sent: list[Envelope] = []
            real_enqueue = v._outbox._enqueue

            async def spy(
                envs: list[Envelope], ids: list[bytes], *, atomic: bool
            ) -> list[service_pb2.EnqueueResult]:
                sent.extend(envs)
                return await real_enqueue(envs, ids, atomic=atomic)

            v._outbox._enqueue = spy  # type: ignore[method-assign]
            await v.dm(u.ident.fingerprint, "on a")
            assert [m.text for m in await texts(u, 1, wait=20)] == ["on a"]
            first = sent[-1]
            assert first.recipient == u.me

            b_id = mesh_of(b_node).node_id
            server = await u_session.move_to(
                Target(b_info.host, b_info.port, ClientTLS(ALPN_CLIENT, node_id=b_id), b_id)
            )
            assert server.node_id == b_id and u.node == b_id
            # B got a full pool of u's KeyPackages, the last-resort one included: the
            # 17th fetch still finds one (KP_TARGET = 16 one-time packages).
            for _ in range(17):
                await u._rpc.call(
                    "qpc.v1.Directory/Fetch",
                    service_pb2.FetchKeyPackageRequest(identity=u.me),
                    service_pb2.FetchKeyPackageResponse,
                )
            await u.top_up_key_packages()
            await homed(a_node, u, b_node)  # the new binding reached A

            got = await v.dm_report(u.ident.fingerprint, "on b")
            assert (got.fate, got.hops) == (Sent.DELIVERED, 1)
            assert [m.text for m in await texts(u, 1, wait=20)] == ["on b"]

            # The first message again (same id), now relayed to u's new home.
            resp = await v._rpc.call(
                "qpc.v1.Delivery/Enqueue",
                service_pb2.EnqueueRequest(envelopes=[first.to_proto()]),
                service_pb2.EnqueueResponse,
            )
            assert resp.results[0].status == 0
            await v.dm(u.ident.fingerprint, "after the copy")
            assert [m.text for m in await texts(u, 1, wait=20)] == ["after the copy"]
            assert u.stats.duplicates == 1
            assert u.stats.undecryptable == 0 and not u.stats.warnings
            assert [r.text for r in await u.unshown()] == ["on a", "on b", "after the copy"]


async def test_repl_mesh_server_and_auto(tmp_path: Path, wall: ManualWallClock) -> None:
    """/mesh server by node-id prefix and by address from the peer list; /mesh auto
    measures every node it can reach and ends on the fastest; errors are clear."""
    with trio.fail_after(120):
        async with (
            line(tmp_path) as ((a_node, _a), (b_node, b_info), (c_node, _c)),
            session_user(tmp_path, "u", b_info, wall) as (u, u_session),
        ):
            shown: list[str] = []
            repl = Repl(u, shown.append, u_session)
            a_id, b_id, c_id = (mesh_of(n).node_id for n in (a_node, b_node, c_node))
            await repl.run_line("/mesh peers")  # B's peers: A and C, remembered
            assert {n.node_id for n in await u.known_nodes()} >= {a_id, c_id}

            await repl.run_line(f"/mesh server {a_id.hex()[:8]}")
            assert shown[-1].startswith(f"now on node {a_id[:4].hex()}")
            assert u.node == a_id
            await repl.run_line(f"/mesh server {a_id.hex()[:8]}")
            assert shown[-1] == f"already on node {a_id[:4].hex()}"
            # By address: B as A's peer list shows it.
            view = await u.mesh_status()
            (b_addr,) = [p.address for p in view.peers if bytes(p.node_id) == b_id]
            await repl.run_line(f"/mesh server {b_addr}")
            assert shown[-1].startswith(f"now on node {b_id[:4].hex()}") and u.node == b_id

            with pytest.raises(QpcError, match="not in this node's peer list"):
                await repl.run_line("/mesh server 127.0.0.1:1")
            with pytest.raises(QpcError, match="no known node"):
                await repl.run_line("/mesh server ffffffff")
            # A known node that does not answer: a typed error, the session stays put.
            await u.remember_rtt(b"\x07" * 32, "127.0.0.1:9", 1.0)
            with pytest.raises(QpcError, match=r"127\.0\.0\.1:9"):
                await repl.run_line("/mesh server 07070707")
            assert u.node == b_id and u_session.connected

            await repl.run_line("/mesh auto")
            assert any(s.startswith(("staying on node", "fastest: ")) for s in shown[-2:])
            measured = {n.node_id: n.rtt_ms for n in await u.known_nodes()}
            assert all(measured[n] is not None for n in (a_id, b_id))
            # Still a working session wherever it ended.
            await u.receive(0)
