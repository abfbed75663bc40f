"""Broadcast over real federation links: A - B - C on loopback (QUIC, real nodes), each
node's own GossipDriver (node.gossip) with its channel store as validator and sink. A
message published on A reaches C through B, exactly once everywhere; bad input from a
neighbour is dropped, counted by reason, never stored.

The messages are real ChannelMessage encodings (wire/channel.py checks what a relay can:
sizes, expiry, hop limit); their sealed part is random bytes, which relays cannot tell
from a real seal (they never open it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from qpc_node.ops.clock import system_wall_ms
from qpc_node.store.channels import ChannelStore
from qpc_node.storefwd.core import Ack, Graft, IHave, Push
from qpc_node.storefwd.gossip import M_GOSSIP, GossipDriver, GossipLimits
from qpc_node.storefwd.gossip_wire import to_proto
from qpc_node.wire.channel import MIN_SEALED
from qpc_node.wire.gen.qpc.v1 import channel_pb2, gossip_pb2
from tests.integration.fed_nodes import FedNode, line_abc, until

pytestmark = pytest.mark.timeout(60)

CHANNEL = bytes(range(32))


def make(body: bytes, *, expiry_ms: int | None = None, hop_limit: int = 8) -> tuple[bytes, bytes]:
    mid = os.urandom(16)
    msg = channel_pb2.ChannelMessage(
        channel_id=CHANNEL,
        msg_id=mid,
        expiry_ms=expiry_ms if expiry_ms is not None else system_wall_ms() + 3_600_000,
        hop_limit=hop_limit,
        sealed=body.ljust(MIN_SEALED + 16, b"\0"),
    )
    return mid, msg.SerializeToString()


def channels(fn: FedNode) -> ChannelStore:
    assert fn.node.channels is not None
    return fn.node.channels


async def held_ids(fn: FedNode) -> list[bytes]:
    return [mid for _, mid in await channels(fn).holding(system_wall_ms())]


@asynccontextmanager
async def gossiping(
    tmp: Path, b_limits: GossipLimits | None = None
) -> AsyncIterator[tuple[dict[str, GossipDriver], dict[str, FedNode]]]:
    async with line_abc(tmp, gossip_limits=b_limits) as (a, b, c):
        nodes = {"a": a, "b": b, "c": c}
        drivers = {}
        for name, fn in nodes.items():
            assert fn.node.gossip is not None
            drivers[name] = fn.node.gossip
        yield drivers, nodes


async def test_published_on_a_reaches_c_through_b_exactly_once(tmp_path: Path) -> None:
    async with gossiping(tmp_path) as (drivers, nodes):
        sent = [make(f"hello {i}".encode()) for i in range(5)]
        for _, p in sent:
            drivers["a"].publish(p)
        ids = {mid for mid, _ in sent}

        async def c_has_all() -> bool:
            return ids <= set(await held_ids(nodes["c"]))

        for _ in range(200):
            if await c_has_all():
                break
            await trio.sleep(0.05)
        assert await c_has_all()
        # Let retransmissions and IHAVEs play out, then count: handed to the store
        # exactly once at B and C, and never to A's (its own publish).
        await until(lambda: all(d.core.statistics().unacked == 0 for d in drivers.values()))
        # (B forwards a push before its store write is counted: wait for that too.)
        await until(lambda: drivers["b"].statistics().delivered >= 5)
        await trio.sleep(0.3)
        sb = drivers["b"].statistics()
        assert sb.delivered == 5 and sb.pushes_invalid == 0
        assert drivers["c"].statistics().delivered == 5
        assert drivers["c"].statistics().core.delivered == 5
        assert drivers["a"].statistics().delivered == 0
        for name in ("b", "c"):
            st = channels(nodes[name]).statistics()
            assert st.stored == 5 and st.duplicates == 0


async def test_bad_input_from_a_neighbour_is_dropped_and_counted(tmp_path: Path) -> None:
    async with gossiping(tmp_path) as (drivers, nodes):
        a, b = nodes["a"], nodes["b"]
        expired_id, expired = make(b"old", expiry_ms=system_wall_ms() - 1)
        good_id, good = make(b"fine")
        short_id, short_reach = make(b"near", hop_limit=2)
        frames = [
            Push(expired_id, 1, expired),  # fails the relay checks: expired
            Push(os.urandom(16), 1, good),  # msg_id not the payload's
            Push(good_id, 99, good),  # beyond the driver's max_hops
            Push(short_id, 3, short_reach),  # travelled past its own hop_limit
            Push(os.urandom(16), 1, b"garbage"),  # malformed
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
        cs = channels(b).statistics()
        assert (cs.refused_expired, cs.refused_hop_limit, cs.refused_malformed) == (1, 1, 1)
        assert st.delivered == 0 and cs.stored == 0 and not await held_ids(b)
        # B still works: a real message goes through to C.
        drivers["a"].publish(good)
        for _ in range(200):
            if good_id in await held_ids(nodes["c"]):
                break
            await trio.sleep(0.05)
        assert good_id in await held_ids(nodes["c"])


async def test_pushes_over_a_neighbours_rate_are_dropped_and_counted(tmp_path: Path) -> None:
    tight = GossipLimits(pushes_per_second=0.001, push_burst=2)
    async with gossiping(tmp_path, tight) as (drivers, nodes):
        a, b = nodes["a"], nodes["b"]
        msgs = [make(f"m{i}".encode()) for i in range(5)]
        frames = [Push(mid, 1, p) for mid, p in msgs]
        await a.fed.call_neighbour(b.node_id, M_GOSSIP, to_proto(frames), gossip_pb2.GossipResponse)
        st = drivers["b"].statistics()
        assert st.pushes_rate_limited == 3 and st.delivered == 2
        assert len(await held_ids(b)) == 2
