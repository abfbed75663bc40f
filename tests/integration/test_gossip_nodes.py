"""Broadcast over real federation links: A - B - C on loopback (QUIC, real nodes), one
GossipDriver per node on its Federation. A message published on A reaches C through B,
exactly once everywhere; bad input from a neighbour is dropped, counted, never stored.

The validator here reads a tiny test format (the channel layer provides the real one):
``b"TG" + msg_id(16) + expiry_ms(8, big endian) + body``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from qpc_node.errors import QpcError, RemoteProtocolError
from qpc_node.ops.clock import system_wall_ms
from qpc_node.storefwd.core import Ack, Graft, IHave, Push
from qpc_node.storefwd.gossip import M_GOSSIP, GossipDriver, GossipLimits
from qpc_node.storefwd.gossip_wire import to_proto
from qpc_node.wire.gen.qpc.v1 import gossip_pb2
from tests.integration.fed_nodes import FedNode, line_abc, until

pytestmark = pytest.mark.timeout(60)


def make(body: bytes, *, expiry_ms: int | None = None) -> tuple[bytes, bytes]:
    mid = os.urandom(16)
    exp = expiry_ms if expiry_ms is not None else system_wall_ms() + 3_600_000
    return mid, b"TG" + mid + exp.to_bytes(8, "big") + body


def validate(payload: bytes, now_ms: int) -> bytes | QpcError:
    if payload.startswith(b"RAISE"):  # a validator may raise its refusal, too
        raise RemoteProtocolError("refused by raising")
    if len(payload) < 26 or payload[:2] != b"TG":
        return RemoteProtocolError("not a test message")
    if int.from_bytes(payload[18:26], "big") <= now_ms:
        return RemoteProtocolError("expired")
    return payload[2:18]


@asynccontextmanager
async def gossiping(
    tmp: Path, limits: dict[str, GossipLimits] | None = None
) -> AsyncIterator[tuple[dict[str, GossipDriver], dict[str, Counter[bytes]], dict[str, FedNode]]]:
    async with line_abc(tmp) as (a, b, c):
        nodes = {"a": a, "b": b, "c": c}
        got: dict[str, Counter[bytes]] = {n: Counter() for n in nodes}
        drivers: dict[str, GossipDriver] = {}
        async with trio.open_nursery() as nursery:
            for name, fn in nodes.items():

                async def sink(payload: bytes, name: str = name) -> None:
                    got[name][payload] += 1

                drivers[name] = GossipDriver(
                    fn.fed, validate, sink, limits=(limits or {}).get(name)
                )
                await nursery.start(drivers[name].run)
            yield drivers, got, nodes
            nursery.cancel_scope.cancel()


async def test_published_on_a_reaches_c_through_b_exactly_once(tmp_path: Path) -> None:
    async with gossiping(tmp_path) as (drivers, got, _):
        sent = [make(f"hello {i}".encode())[1] for i in range(5)]
        for p in sent:
            drivers["a"].publish(p)
        await until(lambda: all(got["c"][p] for p in sent), within=20)
        # Let retransmissions and IHAVEs play out, then count: exactly once at B and C,
        # and never handed back to A's sink (its own publish).
        await until(lambda: all(d.core.statistics().unacked == 0 for d in drivers.values()))
        await trio.sleep(0.3)
        for p in sent:
            assert got["b"][p] == 1 and got["c"][p] == 1 and got["a"][p] == 0
        sb = drivers["b"].statistics()
        assert sb.delivered == 5 and sb.pushes_invalid == 0
        assert drivers["c"].statistics().core.delivered == 5


async def test_bad_input_from_a_neighbour_is_dropped_and_counted(tmp_path: Path) -> None:
    async with gossiping(tmp_path) as (drivers, got, nodes):
        a, b = nodes["a"], nodes["b"]
        expired_id, expired = make(b"old", expiry_ms=system_wall_ms() - 1)
        good_id, good = make(b"fine")
        frames = [
            Push(expired_id, 1, expired),  # fails the validator
            Push(os.urandom(16), 1, good),  # msg_id not the payload's
            Push(good_id, 99, good),  # beyond max_hops
            Push(os.urandom(16), 1, b"garbage"),
            Push(os.urandom(16), 1, b"RAISE"),
            Ack(tuple(os.urandom(16) for _ in range(100))),  # unknown ids
            Graft(tuple(os.urandom(16) for _ in range(100))),
            IHave(tuple((os.urandom(16), 1) for _ in range(500))),
        ]
        await a.fed.call_neighbour(b.node_id, M_GOSSIP, to_proto(frames), gossip_pb2.GossipResponse)
        bad = gossip_pb2.GossipRequest()
        bad.frames.add().push.msg_id = b"short"
        bad.frames.add()  # no kind set
        await a.fed.call_neighbour(b.node_id, M_GOSSIP, bad, gossip_pb2.GossipResponse)
        st = drivers["b"].statistics()
        assert st.pushes_invalid == 3 and st.pushes_id_mismatch == 1 and st.pushes_over_hops == 1
        assert st.frames_dropped_bad_id == 1 and st.frames_dropped_empty == 1
        assert st.core.acks_unknown == 100 and st.core.graft_misses == 100
        assert st.core.missing <= drivers["b"].core.policy.max_missing
        assert not got["b"] and st.delivered == 0
        # B still works: a real message goes through.
        drivers["a"].publish(good)
        await until(lambda: got["c"][good] == 1, within=20)


async def test_pushes_over_a_neighbours_rate_are_dropped_and_counted(tmp_path: Path) -> None:
    tight = GossipLimits(pushes_per_second=0.001, push_burst=2)
    async with gossiping(tmp_path, {"b": tight}) as (drivers, got, nodes):
        a, b = nodes["a"], nodes["b"]
        msgs = [make(f"m{i}".encode()) for i in range(5)]
        frames = [Push(mid, 1, p) for mid, p in msgs]
        await a.fed.call_neighbour(b.node_id, M_GOSSIP, to_proto(frames), gossip_pb2.GossipResponse)
        st = drivers["b"].statistics()
        assert st.pushes_rate_limited == 3 and st.delivered == 2
        assert sum(got["b"].values()) == 2
