"""The sync sources over real stores (storefwd/sources.py): what a peer hands over is
checked as any neighbour input (bad items refused, counted, nothing stored), new items
go to ``on_new`` (the gossip driver) in timestamp order, ``offer`` gives what we hold."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qpc_node.store import AsyncStore
from qpc_node.store.channels import ChannelLimits, ChannelStore
from qpc_node.storefwd.core import Deliver, IHave, Prune, Push, Send
from qpc_node.storefwd.plumtree import PlumtreeCore, PlumtreePolicy
from qpc_node.storefwd.sources import ChannelSource
from qpc_node.storefwd.sync import KIND_CHANNEL, SCOPE_CHANNELS, sync_id
from qpc_node.wire.channel import ChannelMessage, ChannelPolicy

NOW = 1_800_000_000_000
HOUR = 3600 * 1000
CH = b"\xaa" * 32
PEER = b"\x01" * 32


def msg(n: int, *, expiry: int = NOW + 24 * HOUR, size: int = 100, hops: int = 8) -> bytes:
    return ChannelMessage(CH, n.to_bytes(16, "big"), expiry, hops, bytes([n % 256]) * size).encode()


@pytest.fixture
async def channels(tmp_path: Path) -> AsyncIterator[ChannelStore]:
    store = await AsyncStore.open(tmp_path / "node.db")
    try:
        yield ChannelStore(store, ChannelLimits(), ChannelPolicy(max_sealed=1024))
    finally:
        await store.aclose()


async def test_bad_items_are_refused_counted_and_not_stored(channels: ChannelStore) -> None:
    got: list[tuple[bytes, bytes]] = []
    src = ChannelSource(channels, lambda data, peer: got.append((data, peer)))
    bad = [
        msg(1, expiry=NOW - 1),  # expired
        msg(2, expiry=NOW + 30 * 24 * HOUR),  # expiry too far ahead
        msg(3, size=4096),  # oversize
        b"\xff\x00garbage",  # malformed
        msg(4, hops=200),  # hop limit above max
    ]
    good = msg(5)
    assert await src.take(PEER, [*bad, good], NOW) == 1
    assert src.refused == 5 and src.taken == 1
    st = channels.statistics()
    assert (
        st.refused_expired,
        st.refused_expiry_too_far,
        st.refused_too_large,
        st.refused_malformed,
        st.refused_hop_limit,
    ) == (1, 1, 1, 1, 1)
    assert [mid for _, mid in await channels.holding(NOW)] == [(5).to_bytes(16, "big")]
    assert got == [(good, PEER)]  # only the new, good one goes on to gossip
    # The same item again is not new: stored once, not handed on twice.
    assert await src.take(PEER, [good], NOW) == 0
    assert len(got) == 1


async def test_take_stores_in_timestamp_order(channels: ChannelStore) -> None:
    """Items of a batch arrive in any order; the node's seq (what clients page by)
    follows their expiry, i.e. one sender's creation order."""
    got: list[bytes] = []
    src = ChannelSource(channels, lambda data, _peer: got.append(data))
    items = [msg(n, expiry=NOW + HOUR + n) for n in (3, 1, 4, 2, 0)]
    assert await src.take(PEER, items, NOW) == 5
    page = await channels.fetch([(CH, 0)], NOW, limit=100, max_bytes=1 << 20)
    order = [mid_of(d) for _, d in page.messages]
    assert order == [n.to_bytes(16, "big") for n in range(5)]
    assert [mid_of(d) for d in got] == order


def mid_of(data: bytes) -> bytes:
    from qpc_node.wire.channel import decode_channel_message

    return decode_channel_message(data, NOW, ChannelPolicy(max_sealed=1024)).msg_id


async def test_items_and_offer(channels: ChannelStore) -> None:
    src = ChannelSource(channels)
    await src.take(PEER, [msg(n, expiry=NOW + HOUR + 10 - n) for n in range(3)], NOW)
    items = await src.items(NOW)
    want = {
        (NOW + HOUR + 10 - n, sync_id(SCOPE_CHANNELS, KIND_CHANNEL, n.to_bytes(16, "big")))
        for n in range(3)
    }
    assert set(items) == want
    ids = [i for _, i in items] + [sync_id(SCOPE_CHANNELS, KIND_CHANNEL, b"\x09" * 16)]
    offered = await src.offer(PEER, ids, NOW)
    # Unknown ids are left out; what is given comes by expiry (2, 1, 0 here).
    assert [mid_of(d) for d in offered] == [n.to_bytes(16, "big") for n in (2, 1, 0)]
    # Past retention nothing is listed or offered.
    assert await src.items(NOW + 2 * HOUR) == []
    assert await src.offer(PEER, ids, NOW + 2 * HOUR) == []


def test_a_message_the_sync_brought_goes_on_the_tree_not_flooded() -> None:
    """PlumtreeCore.inject (what the node wires a ChannelSource's ``on_new`` to through
    the gossip driver): pushed on eager edges, IHAVE on lazy ones, never back to the
    peer it came from, nothing delivered; a publish would push on every edge."""
    n = [bytes([v]) * 32 for v in range(4)]
    c = PlumtreeCore(PlumtreePolicy(flood_hops=1))
    for v in (1, 2, 3):
        c.link_up(0.0, n[v])
    c.receive(0.0, n[3], [Prune()])  # 3 is lazy; 1 and 2 eager
    c.poll()
    mid = b"\x07" * 16
    assert c.inject(0.1, mid, b"payload", n[1])
    c.tick(1.0)
    out = c.poll()
    assert not any(isinstance(o, Deliver) for o in out)
    pushed = {o.peer for o in out if isinstance(o, Send) for f in o.frames if isinstance(f, Push)}
    announced = {
        o.peer for o in out if isinstance(o, Send) for f in o.frames if isinstance(f, IHave)
    }
    assert pushed == {n[2]} and n[3] in announced and n[1] not in announced
    assert not c.inject(0.2, mid, b"payload", n[2])  # seen: nothing twice
