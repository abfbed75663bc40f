"""Federation tables: the custody queue (idempotent, capped, durable) and trust pins."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_node.store import Envelope, Store
from qpc_node.store.federation import (
    AcceptCall,
    PinRecord,
    QueuedRelay,
    RelayItem,
    RelayQueueLimits,
    TrustChange,
    load_trust,
    relay_accept,
    relay_accept_many,
    relay_done,
    relay_done_many,
    relay_due,
    relay_expire,
    relay_hops,
    relay_next_attempt,
    relay_retry_later,
    save_trust,
)
from qpc_node.store.held import apply_receipt

NOW = 1_700_000_000_000
HOP1, HOP2 = b"\x01" * 32, b"\x02" * 32
SRC1, SRC2 = b"\x11" * 32, b"\x12" * 32
LIMITS = RelayQueueLimits(max_per_hop=5, max_per_source=3)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db") as s:
        yield s


ORIGIN = b"\x0a" * 32


def item(
    n: int,
    hop: bytes = HOP1,
    src: bytes = SRC1,
    expiry: int = NOW + 60_000,
    origin: bytes | None = ORIGIN,
    recipient: bytes = b"r" * 32,
) -> RelayItem:
    env = Envelope(n.to_bytes(16, "big"), recipient, expiry, 3, b"x" * 32)
    return RelayItem(hop, src, env, origin)


def refs(rows: list[QueuedRelay]) -> list[tuple[int, bytes]]:
    """What the drainer keeps of a batch it read: (id, msg_id) per row."""
    return [(q.id, q.envelope.msg_id) for q in rows]


def test_a_stale_row_id_never_ends_another_envelopes_custody(store: Store) -> None:
    """A receipt purges a row while its batch is still in flight; the next envelope
    queued reuses the rowid. The batch's late "done" (and "retry later") must not
    touch the newcomer: before, it deleted it, and a DM was lost (the five-node netns
    test, 1 run in 7: custody at the entry node gone, nothing sent, nothing held)."""
    relay_accept(store, [item(1)], NOW, LIMITS)
    (a,) = relay_due(store, HOP1, NOW, 10)
    assert apply_receipt(store, a.envelope.msg_id, HOP1).purged_queued == {HOP1: 1}
    relay_accept(store, [item(2)], NOW, LIMITS)
    (b,) = relay_due(store, HOP1, NOW, 10)
    assert b.id == a.id  # SQLite reused the rowid
    relay_retry_later(store, [(a.id, a.envelope.msg_id, NOW + 60_000)])
    assert relay_done(store, refs([a])) == 0
    assert relay_done_many(store, [refs([a])]) == [0]
    assert refs(relay_due(store, HOP1, NOW, 10)) == refs([b])  # still due now, not later


def test_accept_is_idempotent_on_msg_id_even_after_delivery(store: Store) -> None:
    assert relay_accept(store, [item(1), item(2), item(1)], NOW, LIMITS) == [
        "queued",
        "queued",
        "duplicate",
    ]
    due = relay_due(store, HOP1, NOW, 10)
    assert [q.envelope.msg_id[-1] for q in due] == [1, 2]
    assert relay_done(store, refs(due)) == 2
    # Delivered and gone from the queue: a late copy is still a duplicate (seen-set).
    assert relay_accept(store, [item(1, hop=HOP2)], NOW, LIMITS) == ["duplicate"]
    assert relay_hops(store) == {}


def test_caps_per_source_and_per_hop(store: Store) -> None:
    out = relay_accept(store, [item(i) for i in range(5)], NOW, LIMITS)
    assert out == ["queued"] * 3 + ["source_full"] * 2
    out = relay_accept(store, [item(10 + i, src=SRC2) for i in range(3)], NOW, LIMITS)
    assert out == ["queued", "queued", "hop_full"]  # the hop's own cap (5) is the other bound
    # Refused ones were not marked seen: they may come again once there is room.
    relay_done(store, refs(relay_due(store, HOP1, NOW, 1)))
    assert relay_accept(store, [item(3, src=SRC2)], NOW, LIMITS) == ["queued"]


def test_due_skips_rows_in_flight_and_still_fills_the_batch(store: Store) -> None:
    """The drainer reads the next batch while earlier ones are in flight: the rows
    in flight are left out and the batch is still full from what lies behind them."""
    relay_accept(store, [item(i) for i in range(3)], NOW, LIMITS)
    relay_accept(store, [item(10 + i, src=SRC2) for i in range(2)], NOW, LIMITS)
    first = relay_due(store, HOP1, NOW, 2)
    assert [q.envelope.msg_id[-1] for q in first] == [0, 1]
    second = relay_due(store, HOP1, NOW, 2, skip={q.id for q in first})
    assert [q.envelope.msg_id[-1] for q in second] == [2, 10]
    skip = {q.id for q in first + second}
    assert [q.envelope.msg_id[-1] for q in relay_due(store, HOP1, NOW, 2, skip=skip)] == [11]
    # relay_done counts what it deleted, once: a row already gone is not counted again.
    assert relay_done(store, refs(first) * 2) == 2


def test_accept_many_is_the_calls_one_after_another_in_one_commit(store: Store) -> None:
    """Grouped calls (custody.py) keep the caps and the seen-set exact: each call sees
    what the earlier ones of its group queued."""
    calls = [
        AcceptCall([item(1), item(2)], NOW),
        AcceptCall([item(2), item(3), item(4)], NOW),  # 2 again: a duplicate across calls
        AcceptCall([item(5, src=SRC2), item(6, src=SRC2), item(7, src=SRC2)], NOW),
    ]
    got = relay_accept_many(store, calls, LIMITS)
    assert got == [
        ["queued", "queued"],
        ["duplicate", "queued", "source_full"],  # SRC1 holds 3 (its cap) after item 3
        ["queued", "queued", "hop_full"],  # the hop holds 5 (its cap)
    ]
    ids = refs(relay_due(store, HOP1, NOW, 10))
    assert relay_done_many(store, [ids[:2], [], ids[2:], ids[:1]]) == [2, 0, 3, 0]
    assert relay_hops(store) == {}


def test_retry_later_and_next_attempt(store: Store) -> None:
    relay_accept(store, [item(1), item(2)], NOW, LIMITS)
    first = relay_due(store, HOP1, NOW, 1)
    relay_retry_later(store, [(first[0].id, first[0].envelope.msg_id, NOW + 5_000)])
    assert [q.envelope.msg_id[-1] for q in relay_due(store, HOP1, NOW, 10)] == [2]
    relay_done(store, refs(relay_due(store, HOP1, NOW, 10)))
    assert relay_next_attempt(store, HOP1, NOW) == NOW + 5_000
    (later,) = relay_due(store, HOP1, NOW + 5_000, 10)
    assert later.attempts == 1
    assert relay_next_attempt(store, HOP2, NOW) is None


def test_origin_is_kept_with_custody_and_unknown_stays_unknown(tmp_path: Path) -> None:
    """The declared origin goes into the queue and comes out unchanged (across a reopen:
    it is on disk); an envelope that arrived without one is held as unknown (None)."""
    with Store.open(tmp_path / "n.db") as s:
        relay_accept(s, [item(1), item(2, origin=None)], NOW, LIMITS)
    with Store.open(tmp_path / "n.db") as s:
        due = relay_due(s, HOP1, NOW, 10)
    assert [(q.envelope.msg_id[-1], q.origin) for q in due] == [(1, ORIGIN), (2, None)]


def test_queue_refuses_a_malformed_origin(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        relay_accept(store, [item(1, origin=b"short")], NOW, LIMITS)
    assert relay_hops(store) == {}


def test_proven_origin_accepts_its_recipients_like_a_local_send(store: Store) -> None:
    """A user who sends to a remote contact through the federation accepts that
    contact's mail from then on (as store.enqueue records for local sends); a relayed
    (unproven) origin records nothing, and neither does a refused item."""
    contact, other, third = b"\xc1" * 32, b"\xc2" * 32, b"\xc3" * 32
    relay_accept(store, [item(1, recipient=contact)], NOW, LIMITS, proven=True)
    relay_accept(store, [item(2, recipient=other)], NOW, LIMITS)  # a neighbour's: unproven
    full = RelayQueueLimits(max_per_hop=2, max_per_source=3)
    assert relay_accept(store, [item(3, recipient=third)], NOW, full, proven=True) == ["hop_full"]
    rows = store.conn.execute("SELECT recipient, peer FROM accepted").fetchall()
    assert [(bytes(r), bytes(p)) for r, p in rows] == [(ORIGIN, contact)]


def test_expiry_drops_custody_and_old_seen_marks(store: Store) -> None:
    relay_accept(store, [item(1, expiry=NOW + 10), item(2)], NOW, LIMITS)
    assert relay_due(store, HOP1, NOW + 10, 10)[0].envelope.msg_id[-1] == 2  # expired: not sent
    assert relay_expire(store, NOW + 10) == (1, 1)
    assert relay_hops(store) == {HOP1: 1}


def test_custody_survives_reopen(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as s:
        relay_accept(s, [item(1), item(2, hop=HOP2)], NOW, LIMITS)
    with Store.open(tmp_path / "n.db") as s:
        assert relay_hops(s) == {HOP1: 1, HOP2: 1}


def test_trust_roundtrip(store: Store) -> None:
    pin = PinRecord(b"\x05" * 32, b"k" * 32, "trusted", "127.0.0.1:1", NOW, NOW)
    save_trust(store, [TrustChange(pin=pin, bind=("127.0.0.1:1", pin.node_id))], NOW)
    refused = PinRecord(b"\x06" * 32, b"j" * 32, "refused", "127.0.0.1:1", NOW, NOW + 1)
    save_trust(store, [TrustChange(pin=refused)], NOW + 1)
    # Trusting by id only (no key yet) keeps a key we already know.
    save_trust(
        store, [TrustChange(pin=PinRecord(refused.node_id, None, "trusted", "", 0, NOW + 2))], NOW
    )
    snap = load_trust(store)
    pins = {p.node_id: p for p in snap.pins}
    assert pins[pin.node_id] == pin
    assert pins[refused.node_id].state == "trusted"
    assert pins[refused.node_id].public_key == b"j" * 32
    assert dict(snap.addresses) == {"127.0.0.1:1": pin.node_id}
