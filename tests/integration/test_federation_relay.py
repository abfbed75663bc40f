"""Relay over real federation links: nodes on loopback, real QUIC, real SQLite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from qpc_node.errors import StatusCode
from qpc_node.federation.core import M_RELAY
from qpc_node.federation.routes import StaticRoutes
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.errors import RpcError
from qpc_node.store import KeyPackageUpload
from qpc_node.wire.gen.qpc.v1 import federation_pb2
from tests.integration.fed_nodes import (
    USER_A,
    USER_C,
    envelope,
    fed_node,
    identity,
    line_abc,
    mailbox,
    peer,
    until,
)


async def test_relay_a_b_c_decrements_hop_limit(tmp_path: Path) -> None:
    """A and C share no link: B relays, each forwarding hop takes one off hop_limit."""
    with trio.fail_after(30):
        async with line_abc(tmp_path) as (a, b, c):
            assert not a.fed.link_up(c.node_id)
            msgs = [os.urandom(16) for _ in range(5)]
            res = await a.fed.submit(
                [envelope(m, USER_C, hop_limit=3) for m in msgs], origin=USER_A
            )
            assert [r.status for r in res] == [federation_pb2.RELAY_QUEUED] * 5

            async def delivered() -> bool:
                return len(await mailbox(c, USER_C)) == 5

            await until(delivered)
            got = await mailbox(c, USER_C)
            assert {e.msg_id for e in got} == set(msgs)
            assert {e.hop_limit for e in got} == {1}  # 3 - (A forwards) - (B forwards)
            await until(lambda: a.fed.statistics().queued == 0)
            await until(lambda: b.fed.statistics().queued == 0)
            b_in = {n.node_id: n for n in b.fed.statistics().neighbours}[a.node_id]
            assert b_in.relay_in == {"RELAY_QUEUED": 5}


async def test_hop_limit_one_stops_at_b_with_typed_status(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with line_abc(tmp_path) as (a, b, c):
            stop, go = os.urandom(16), os.urandom(16)
            await a.fed.submit([envelope(stop, USER_C, hop_limit=1)], origin=USER_A)
            await a.fed.submit([envelope(go, USER_C, hop_limit=2)], origin=USER_A)
            await until(lambda: len(a.fed.refusals()) == 1)
            (refusal,) = a.fed.refusals()
            assert (refusal.msg_id, refusal.next_hop) == (stop, b.node_id)
            assert refusal.status_name == "RELAY_HOP_LIMIT_EXCEEDED"

            async def go_delivered() -> bool:
                return len(await mailbox(c, USER_C)) == 1

            await until(go_delivered)
            (only,) = await mailbox(c, USER_C)
            assert only.msg_id == go and only.hop_limit == 0
            # Nothing at 0 is relayed: the origin refuses it too, typed ...
            (res,) = await a.fed.submit(
                [envelope(os.urandom(16), USER_C, hop_limit=0)], origin=USER_A
            )
            assert res.status == federation_pb2.RELAY_HOP_LIMIT_EXCEEDED
            # ... and nothing after expiry.
            (res,) = await a.fed.submit(
                [envelope(os.urandom(16), USER_C, expiry_ms=1000)], origin=USER_A
            )
            assert res.status == federation_pb2.RELAY_EXPIRED
            assert a.fed.statistics().queued == 0
            assert {n.node_id: n for n in a.fed.statistics().neighbours}[b.node_id].refused_out == {
                "RELAY_HOP_LIMIT_EXCEEDED": 1
            }


async def test_same_msg_id_over_two_paths_stored_once(tmp_path: Path) -> None:
    """A reaches C via B and directly: C stores the second copy as a duplicate; B too."""
    with trio.fail_after(30):
        async with line_abc(tmp_path, a_direct_to_c=True) as (a, b, c):
            await a.fed.wait_link(c.node_id)
            m = os.urandom(16)
            env = envelope(m, USER_C, hop_limit=4)
            await a.fed.submit([env], origin=USER_A)

            async def delivered() -> bool:
                return len(await mailbox(c, USER_C)) == 1

            await until(delivered)
            req = federation_pb2.RelayEnqueueRequest(envelopes=[env])
            # The same envelope again, straight over A's own link to C ...
            direct = await a.fed._link(c.node_id).rpc.call(
                M_RELAY, req, federation_pb2.RelayEnqueueResponse
            )
            assert [r.status for r in direct.results] == [federation_pb2.RELAY_DUPLICATE]
            # ... and to B once more (a retry after a lost answer): B relayed it already.
            again = await a.fed._link(b.node_id).rpc.call(
                M_RELAY, req, federation_pb2.RelayEnqueueResponse
            )
            assert [r.status for r in again.results] == [federation_pb2.RELAY_DUPLICATE]
            # ... and to A itself: its own seen-set.
            (res,) = await a.fed.submit([env], origin=USER_A)
            assert res.status == federation_pb2.RELAY_DUPLICATE
            assert [e.msg_id for e in await mailbox(c, USER_C)] == [m]


async def test_proxy_keypackage_fetch_and_announce(tmp_path: Path) -> None:
    """A fetches a KeyPackage of a user homed on its neighbour B; announces reach B's sink."""
    seen: list[tuple[bytes, bytes]] = []

    def sink(node: bytes, payload: bytes) -> bool:
        seen.append((node, payload))
        return True

    user_b, stranger = os.urandom(32), os.urandom(32)
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with (
            fed_node(
                tmp_path, "b", routes=StaticRoutes(b_id, {user_b: b_id}), announce_sink=sink
            ) as b,
            fed_node(
                tmp_path,
                "a",
                routes=StaticRoutes(a_id, {user_b: b_id, stranger: b_id}),
                peers=(peer(b.info.port, b_id),),
            ) as a,
        ):
            await a.fed.wait_link(b_id)
            assert b.node.store is not None
            await b.node.store.upload_keypackages(
                user_b, [KeyPackageUpload(b"kp-of-b" * 10, 1)], system_wall_ms()
            )
            kp, last_resort = await a.fed.fetch_key_package(user_b)
            assert (kp, last_resort) == (b"kp-of-b" * 10, False)
            with pytest.raises(RpcError) as info:  # B has none for a user it does not home
                await a.fed.fetch_key_package(stranger)
            assert info.value.code == StatusCode.NOT_FOUND
            assert await a.fed.announce(b_id, b"opaque route update") is True
            assert seen == [(a_id, b"opaque route update")]
