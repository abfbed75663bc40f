"""The node's channel messages (store/channels.py): idempotent on msg_id, retention,
caps (eviction: the message due to go soonest first, counted), per-channel paging by
the node's own sequence numbers, and ChannelStore's checks on what neighbours send."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpc_node.store import AsyncStore
from qpc_node.store.channels import (
    ChannelLimits,
    ChannelStore,
    add_messages,
    channel_totals,
    fetch_messages,
    get_messages,
    holding,
    sweep_messages,
)
from qpc_node.store.store import Store
from qpc_node.wire.channel import ChannelExpired, ChannelMessage, ChannelPolicy

NOW = 1_800_000_000_000
HOUR = 3600 * 1000
A, B = b"\xaa" * 32, b"\xbb" * 32


def msg(
    n: int, channel: bytes = A, *, expiry: int = NOW + 24 * HOUR, size: int = 100
) -> ChannelMessage:
    return ChannelMessage(channel, n.to_bytes(16, "big"), expiry, 8, bytes([n % 256]) * size)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "node.db", synchronous="OFF")


def test_idempotent_on_msg_id(store: Store) -> None:
    lim = ChannelLimits()
    first = add_messages(store, [msg(1), msg(2)], NOW, lim).added
    again = add_messages(store, [msg(2), msg(1), msg(3)], NOW + 1, lim).added
    assert [a.new for a in first] == [True, True]
    assert [a.new for a in again] == [False, False, True]
    assert again[0].seq == first[1].seq and again[1].seq == first[0].seq
    assert again[2].seq > first[1].seq
    assert channel_totals(store).messages == 3
    # The same msg_id twice in one batch is one message.
    twice = add_messages(store, [msg(4), msg(4)], NOW, lim).added
    assert [a.new for a in twice] == [True, False] and twice[0].seq == twice[1].seq


def test_retention_then_tombstone_then_gone(store: Store) -> None:
    lim = ChannelLimits(retention_ms=2 * HOUR)
    add_messages(store, [msg(1, expiry=NOW + 10 * HOUR), msg(2, expiry=NOW + HOUR)], NOW, lim)
    # msg 2 expires before retention ends; msg 1 is kept for retention only.
    assert sweep_messages(store, NOW + HOUR - 1, lim) == (0, 0)
    assert sweep_messages(store, NOW + HOUR, lim) == (1, 1)  # expired: dropped and deleted
    assert [
        s
        for s, _ in fetch_messages(
            store, [(A, 0)], NOW + HOUR, limit=10, max_bytes=1 << 20
        ).messages
    ] == [1]
    assert sweep_messages(store, NOW + 2 * HOUR, lim) == (1, 0)  # retention: a tombstone
    t = channel_totals(store)
    assert (t.messages, t.bytes, t.tombstones) == (0, 0, 1)
    assert (
        fetch_messages(store, [(A, 0)], NOW + 2 * HOUR, limit=10, max_bytes=1 << 20).messages == []
    )
    # A late copy from another neighbour is a duplicate while the tombstone lives...
    (late,) = add_messages(store, [msg(1, expiry=NOW + 10 * HOUR)], NOW + 3 * HOUR, lim).added
    assert not late.new
    # ...and the tombstone goes with the message's own expiry.
    assert sweep_messages(store, NOW + 10 * HOUR, lim) == (0, 1)
    assert channel_totals(store).tombstones == 0


def test_message_cap_evicts_the_soonest_to_go_first(store: Store) -> None:
    lim = ChannelLimits(max_messages=3)
    expiries = {1: 5, 2: 1, 3: 9, 4: 3, 5: 7}  # hours ahead
    evicted = 0
    for n, h in expiries.items():
        evicted += add_messages(store, [msg(n, expiry=NOW + h * HOUR)], NOW, lim).evicted
    assert evicted == 2
    left = fetch_messages(store, [(A, 0)], NOW, limit=10, max_bytes=1 << 20).messages
    assert sorted(_body(d)[0] for _, d in left) == [1, 3, 5]
    assert channel_totals(store).messages == 3
    # Evicted ids are remembered: the same message again is not stored again.
    assert not add_messages(store, [msg(2, expiry=NOW + HOUR)], NOW, lim).added[0].new


def _body(data: bytes) -> bytes:
    from qpc_node.wire.channel import decode_channel_message

    return decode_channel_message(data, NOW, ChannelPolicy()).sealed


def test_byte_cap(store: Store) -> None:
    lim = ChannelLimits(max_bytes=1000)
    res = add_messages(
        store, [msg(n, size=300, expiry=NOW + n * HOUR) for n in range(1, 6)], NOW, lim
    )
    t = channel_totals(store)
    assert t.bytes <= 1000 and t.messages == 5 - res.evicted and res.evicted >= 2
    kept = [
        _body(d)[0]
        for _, d in fetch_messages(store, [(A, 0)], NOW, limit=10, max_bytes=1 << 20).messages
    ]
    assert kept == list(range(6 - t.messages, 6))  # the latest expiries stayed


def test_a_lowered_cap_applies_at_the_next_sweep(store: Store) -> None:
    add_messages(store, [msg(n) for n in range(10)], NOW, ChannelLimits())
    sweep_messages(store, NOW, ChannelLimits(max_messages=4))
    assert channel_totals(store).messages == 4


def test_tombstones_are_bounded(store: Store) -> None:
    lim = ChannelLimits(max_messages=1)  # at most 4 tombstones
    for n in range(10):
        add_messages(store, [msg(n, expiry=NOW + (n + 1) * HOUR)], NOW, lim)
    assert channel_totals(store).tombstones == 9
    sweep_messages(store, NOW, lim)
    assert channel_totals(store).tombstones == 4


def test_fetch_pages_per_channel(store: Store) -> None:
    lim = ChannelLimits()
    add_messages(store, [msg(n, A if n % 2 else B) for n in range(1, 11)], NOW, lim)
    page = fetch_messages(store, [(A, 0), (B, 0)], NOW, limit=4, max_bytes=1 << 20)
    assert [s for s, _ in page.messages] == [1, 2, 3, 4] and page.more
    only_a = fetch_messages(store, [(A, 3)], NOW, limit=10, max_bytes=1 << 20)
    assert [s for s, _ in only_a.messages] == [5, 7, 9] and not only_a.more
    # A byte bound is never exceeded: too small for the first message, an empty page
    # that says there is more; room for exactly one (with its overhead), one.
    tiny = fetch_messages(store, [(A, 0)], NOW, limit=10, max_bytes=1)
    assert tiny.messages == [] and tiny.more
    one = len(msg(1).encode()) + 32
    page = fetch_messages(store, [(A, 0)], NOW, limit=10, max_bytes=one + 1, overhead=32)
    assert [s for s, _ in page.messages] == [1] and page.more
    assert (
        fetch_messages(store, [(b"\xcc" * 32, 0)], NOW, limit=10, max_bytes=1 << 20).messages == []
    )
    assert fetch_messages(store, [(A, 2**64 - 1)], NOW, limit=10, max_bytes=1 << 20).messages == []


def test_seq_is_never_reused(store: Store) -> None:
    lim = ChannelLimits(retention_ms=HOUR)
    (a,) = add_messages(store, [msg(1, expiry=NOW + HOUR)], NOW, lim).added
    sweep_messages(store, NOW + HOUR, lim)  # dropped and (expired) deleted
    (b,) = add_messages(store, [msg(2)], NOW + HOUR, lim).added
    assert b.seq > a.seq


def test_holding_and_get_serve_reconciliation(store: Store) -> None:
    lim = ChannelLimits()
    add_messages(store, [msg(1), msg(2)], NOW, lim)
    assert holding(store, NOW) == [
        (NOW + 24 * HOUR, msg(1).msg_id),
        (NOW + 24 * HOUR, msg(2).msg_id),
    ]
    assert get_messages(store, [msg(2).msg_id, b"\x00" * 16], NOW) == [msg(2).encode()]


async def test_channel_store_add_checks_counts_and_wakes(tmp_path: Path) -> None:
    store = await AsyncStore.open(tmp_path / "node.db", synchronous="OFF")
    try:
        ch = ChannelStore(store, ChannelLimits())
        published: list[bytes] = []
        ch.on_published = published.append
        changed = ch.changed
        bad = [
            msg(9, expiry=NOW - 1).encode(),  # expired
            ChannelMessage(A, b"\x01" * 16, NOW + HOUR, 17, b"\x00" * 40).encode(),
            b"\xff\xff",
        ]
        got = await ch.add([msg(1).encode(), *bad, msg(1).encode()], NOW)
        assert got == [True, False, False, False, False]
        assert changed.is_set() and not ch.changed.is_set()
        st = ch.statistics()
        assert (st.stored, st.duplicates) == (1, 1)
        assert (st.refused_expired, st.refused_hop_limit, st.refused_malformed) == (1, 1, 1)
        assert published == []  # from neighbours: not handed back to the gossip driver
        added = await ch.published(msg(2), NOW)
        assert added.new and published == [msg(2).encode()]
        assert not (await ch.published(msg(2), NOW)).new and len(published) == 1
        assert (await ch.totals()).messages == 2

        def refuse(_data: bytes) -> None:
            raise ChannelExpired("the spreader refused it")

        ch.on_published = refuse  # a refusal downstream does not undo the store
        assert (await ch.published(msg(3), NOW)).new
        assert (await ch.totals()).messages == 3
    finally:
        await store.aclose()


async def test_the_gossip_driver_seam(tmp_path: Path) -> None:
    """validate is the driver's PayloadValidator (msg_id or the typed error, counted),
    deliver its DeliverSink (stores at the store's clock, wakes long-polls)."""
    store = await AsyncStore.open(tmp_path / "node.db", synchronous="OFF")
    try:
        ch = ChannelStore(store, ChannelLimits(), wall_ms=lambda: NOW)
        assert ch.validate(msg(1).encode(), NOW) == msg(1).msg_id
        refused = ch.validate(msg(2, expiry=NOW).encode(), NOW)
        assert isinstance(refused, ChannelExpired)
        assert ch.statistics().refused_expired == 1
        changed = ch.changed
        await ch.deliver(msg(1).encode())
        assert changed.is_set()
        page = await ch.fetch([(A, 0)], NOW, limit=10, max_bytes=1 << 20)
        assert [d for _, d in page.messages] == [msg(1).encode()]
    finally:
        await store.aclose()
