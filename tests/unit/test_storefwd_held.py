"""Store-and-forward: the sans-IO decisions (qpc_node/storefwd/held.py) and the store
functions that apply them (qpc_node/store/held.py): hold, quotas and eviction order,
release in arrival order, receipts' purge and tombstone, spray, re-route."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from qpc_node.errors import ConfigError
from qpc_node.store import Envelope, Store
from qpc_node.store.audit import query
from qpc_node.store.federation import RelayItem, RelayQueueLimits, relay_accept, relay_due
from qpc_node.store.held import (
    AUDIT_EVICT,
    HoldItem,
    apply_receipt,
    custody_toward,
    delivered,
    held_count,
    held_expire,
    held_for,
    held_recipients,
    hold_many,
    release,
    reroute,
    spray_candidates,
    spray_done,
)
from qpc_node.storefwd.held import (
    CLOCK_SKEW_S,
    EvictReason,
    ExpiryVerdict,
    HeldMeta,
    HoldPolicy,
    check_expiry,
    rank,
    should_reroute,
    spray_due,
    spray_split,
    victim,
)

NOW = 1_800_000_000_000
USER, OTHER_USER = b"\x01" * 32, b"\x02" * 32
HERE, PREV, HOP, NODE_X, NODE_Y = (bytes([b]) * 32 for b in (0xAA, 0xBB, 0xCC, 0xD1, 0xD2))
HOUR = 3_600_000


def env(recipient: bytes = USER, *, expiry: int = NOW + HOUR, hop_limit: int = 6) -> Envelope:
    return Envelope(os.urandom(16), recipient, expiry, hop_limit, os.urandom(40))


def item(e: Envelope, *, node: bytes = NODE_X, from_node: bytes = PREV) -> HoldItem:
    return HoldItem(e, OTHER_USER, node, from_node, 4)


# ----------------------------------------------------------------- sans-IO decisions


def test_expiry_cap_and_past_expiry_are_refused() -> None:
    p = HoldPolicy(max_expiry_ahead_s=3600)
    skew = CLOCK_SKEW_S * 1000
    assert check_expiry(NOW + 1, NOW, p) is ExpiryVerdict.OK
    # A client's "now + cap" on a clock a little ahead of ours is not refused.
    assert check_expiry(NOW + HOUR + 5_000, NOW, p) is ExpiryVerdict.OK
    assert check_expiry(NOW + HOUR + skew, NOW, p) is ExpiryVerdict.OK
    assert check_expiry(NOW + HOUR + skew + 1, NOW, p) is ExpiryVerdict.TOO_FAR
    assert check_expiry(NOW, NOW, p) is ExpiryVerdict.EXPIRED
    assert check_expiry(NOW - 1, NOW, p) is ExpiryVerdict.EXPIRED
    assert HoldPolicy().max_expiry_ahead_ms == 7 * 24 * HOUR


def test_eviction_order_expired_then_delivered_then_most_hops_then_newest() -> None:
    expired = HeldMeta(5, NOW - 1, False, 8)
    delivered_ = HeldMeta(4, NOW + HOUR, True, 8)
    far = HeldMeta(3, NOW + HOUR, False, 1)  # travelled most: 1 hop left
    near_old = HeldMeta(1, NOW + HOUR, False, 6)
    near_new = HeldMeta(2, NOW + HOUR, False, 6)
    ranked = sorted([near_old, near_new, far, delivered_, expired], key=lambda m: rank(m, NOW))
    assert ranked == [expired, delivered_, far, near_new, near_old]


def test_the_newcomer_is_refused_when_it_ranks_worst() -> None:
    held = HeldMeta(1, NOW + HOUR, False, 6)
    incoming_far = HeldMeta(None, NOW + HOUR, False, 2)
    incoming_equal = HeldMeta(None, NOW + HOUR, False, 6)
    incoming_fresh = HeldMeta(None, NOW + HOUR, False, 7)
    assert victim(held, incoming_far, NOW) is incoming_far
    assert victim(held, incoming_equal, NOW) is incoming_equal  # newest goes on a tie
    assert victim(held, incoming_fresh, NOW) is held
    assert victim(None, incoming_fresh, NOW) is incoming_fresh


def test_reroute_spray_decisions_and_policy_bounds() -> None:
    p = HoldPolicy(reroute_after_s=10, spray_delay_s=2)
    assert not should_reroute(None, 100.0, p)
    assert not should_reroute(95.0, 100.0, p)
    assert should_reroute(90.0, 100.0, p)
    assert spray_split(4) == (2, 2) and spray_split(3) == (2, 1) and spray_split(2) == (1, 1)
    assert spray_split(1) is None and spray_split(0) is None
    assert not spray_due(NOW, NOW + 1999, p) and spray_due(NOW, NOW + 2000, p)
    with pytest.raises(ConfigError):
        HoldPolicy(max_held=10, held_per_origin=11)
    with pytest.raises(ConfigError):
        HoldPolicy(spray_tokens=0)


# ----------------------------------------------------------------- store


def test_hold_is_durable_idempotent_and_counts_no_hop(tmp_path: Path) -> None:
    e = env(hop_limit=3)
    with Store.open(tmp_path / "n.db") as s:
        got = hold_many(s, [item(e), item(e)], NOW, HoldPolicy())
        assert got.outcomes == ["held", "duplicate"] and not got.evicted
    with Store.open(tmp_path / "n.db") as s:  # a restart loses nothing
        (h,) = held_for(s, USER, NOW)
        assert h.envelope == e and h.envelope.hop_limit == 3  # as it arrived
        assert (h.origin_node, h.from_node, h.tokens) == (NODE_X, PREV, 4)
        assert held_recipients(s) == {USER}
        # A copy of an id held here is a duplicate on the custody path too.
        out = relay_accept(s, [RelayItem(HOP, PREV, e, None)], NOW, RelayQueueLimits())
        assert out == ["duplicate"]


def test_per_origin_quota_evicts_within_that_origin_and_audits(tmp_path: Path) -> None:
    p = HoldPolicy(max_held=10, held_per_origin=2)
    with Store.open(tmp_path / "n.db") as s:
        short = env(expiry=NOW + 10)
        keep = env()
        other = env(hop_limit=1)  # another origin: never a victim of NODE_X's quota
        assert hold_many(
            s, [item(short), item(keep), item(other, node=NODE_Y)], NOW, p
        ).outcomes == [
            "held",
            "held",
            "held",
        ]
        later = NOW + 20  # `short` expired meanwhile
        new = env()
        got = hold_many(s, [item(new)], later, p)
        assert got.outcomes == ["held"]
        assert [(v.msg_id, v.reason) for v in got.evicted] == [(short.msg_id, EvictReason.EXPIRED)]
        # Full again, nothing expired or delivered: the one with fewest hops left goes,
        # and a newcomer that would rank worst is refused.
        worse = env(hop_limit=1)
        assert hold_many(s, [item(worse)], later, p).outcomes == ["full"]
        better = env(hop_limit=7)
        got = hold_many(s, [item(better)], later, p)
        assert got.outcomes == ["held"] and got.evicted[0].reason is EvictReason.HOPS
        assert got.evicted[0].msg_id == new.msg_id  # keep and new tie: newest goes
        ids = {h.envelope.msg_id for h in held_for(s, USER, later)}
        assert ids == {keep.msg_id, other.msg_id, better.msg_id}
        audits = query(s.conn, kind=AUDIT_EVICT)
        assert sorted(a.event.detail["reason"] for a in audits) == ["expired", "most_hops"]
        # An id evicted undelivered may be held again later (a retry, a spray copy).
        assert hold_many(s, [item(new, node=NODE_Y)], later, p).outcomes == ["held"]


def test_total_quota_evicts_a_delivered_one_first(tmp_path: Path) -> None:
    p = HoldPolicy(max_held=2, held_per_origin=2)
    with Store.open(tmp_path / "n.db") as s:
        a, b = env(hop_limit=1), env(hop_limit=7)
        hold_many(s, [item(a, node=NODE_X), item(b, node=NODE_Y)], NOW, p)
        # Mark b delivered without purging it (a receipt raced a hold): it goes first,
        # before a, which travelled more.
        s.conn.execute("UPDATE relay_seen SET delivered = 1 WHERE msg_id = ?", (b.msg_id,))
        got = hold_many(s, [item(env(), node=HERE)], NOW, p)
        assert got.outcomes == ["held"]
        assert [(v.msg_id, v.reason) for v in got.evicted] == [(b.msg_id, EvictReason.DELIVERED)]


def test_sql_eviction_order_agrees_with_rank(tmp_path: Path) -> None:
    """The store picks its worst candidate in SQL; it must be the rank's minimum."""
    with Store.open(tmp_path / "n.db") as s:
        metas = []
        for expiry, dlv, hops in itertools.product((NOW + 5, NOW + HOUR), (0, 1), (1, 4, 8)):
            e = env(expiry=expiry, hop_limit=hops)
            hold_many(s, [item(e)], NOW, HoldPolicy())
            if dlv:
                s.conn.execute("UPDATE relay_seen SET delivered = 1 WHERE msg_id = ?", (e.msg_id,))
            metas.append(e)
        now = NOW + 10
        rows = s.conn.execute(
            "SELECT h.id, h.expiry_ms, coalesce(s.delivered, 0), h.hop_limit FROM held h"
            " LEFT JOIN relay_seen s ON s.msg_id = h.msg_id"
        ).fetchall()
        all_meta = [HeldMeta(r[0], r[1], bool(r[2]), r[3]) for r in rows]
        from qpc_node.storefwd.held import EVICTION_ORDER_SQL

        sql_order = [
            r[0]
            for r in s.conn.execute(
                "SELECT h.id FROM held h LEFT JOIN relay_seen s ON s.msg_id = h.msg_id "
                + EVICTION_ORDER_SQL,
                {"now": now},
            )
        ]
        assert sql_order == [m.id for m in sorted(all_meta, key=lambda m: rank(m, now))]


def test_release_moves_in_arrival_order_and_spends_the_hop_then(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as s:
        es = [env(hop_limit=5) for _ in range(5)]
        back = env()  # came from HOP itself: it saw the id, it stays held
        zero = env(hop_limit=0)
        hold_many(s, [item(e) for e in es[:3]], NOW, HoldPolicy())
        hold_many(s, [item(back, from_node=HOP), item(zero)], NOW, HoldPolicy())
        hold_many(s, [item(e) for e in es[3:]], NOW, HoldPolicy())
        hold_many(s, [item(env(OTHER_USER))], NOW, HoldPolicy())
        got = release(s, USER, HOP, NOW, max_per_hop=3)  # room for 3 only
        assert (got.moved, got.hop_limit, got.left) == (3, 0, 3)  # `back` is not counted
        got = release(s, USER, HOP, NOW, max_per_hop=100)
        assert (got.moved, got.hop_limit, got.left) == (2, 1, 0)
        due = relay_due(s, HOP, NOW, 100)
        assert [q.envelope.msg_id for q in due] == [e.msg_id for e in es]
        assert all(q.envelope.hop_limit == 4 for q in due)
        assert all(q.origin_node == NODE_X for q in due)
        assert [h.envelope.msg_id for h in held_for(s, USER, NOW)] == [back.msg_id]
        assert held_recipients(s) == {USER, OTHER_USER}


def test_receipt_purges_replicas_keeps_a_tombstone_and_forwards_along_the_trail(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path / "n.db") as s:
        held_e, queued_e = env(), env()
        hold_many(s, [item(held_e)], NOW, HoldPolicy())
        relay_accept(s, [RelayItem(HOP, NODE_Y, queued_e, None)], NOW, RelayQueueLimits())
        spray_done(s, NODE_X, [(held_for(s, USER, NOW)[0], 2)])  # a copy went to a carrier

        got = apply_receipt(s, held_e.msg_id, HOP)
        assert got.known and not got.already and got.purged_held == 1
        assert sorted(got.peers) == sorted([PREV, NODE_X])
        got = apply_receipt(s, queued_e.msg_id, HOP)
        assert got.purged_queued == {HOP: 1} and got.peers == (NODE_Y,)
        assert held_count(s) == 0 and relay_due(s, HOP, NOW, 10) == []
        assert delivered(s, held_e.msg_id) and delivered(s, queued_e.msg_id)
        # Repeated: nothing more to do or forward. Unknown: dropped by the caller.
        assert apply_receipt(s, held_e.msg_id, NODE_X).already
        assert not apply_receipt(s, os.urandom(16), HOP).known
        # A late copy (replayed msg_id) is a duplicate on both paths: never delivered twice.
        assert hold_many(s, [item(held_e)], NOW, HoldPolicy()).outcomes == ["duplicate"]
        out = relay_accept(s, [RelayItem(HOP, PREV, queued_e, None)], NOW, RelayQueueLimits())
        assert out == ["duplicate"]


def test_expired_while_held_is_dropped(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as s:
        hold_many(s, [item(env(expiry=NOW + 10)), item(env())], NOW, HoldPolicy())
        assert held_expire(s, NOW + 10) == 1
        assert held_count(s) == 1
        assert release(s, USER, HOP, NOW + 10, max_per_hop=10).moved == 1


def test_spray_candidates_wait_the_delay_and_skip_the_trail(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as s:
        a, b, c = env(), env(), env(hop_limit=0)
        hold_many(s, [item(a), item(c)], NOW, HoldPolicy())
        hold_many(s, [HoldItem(b, None, NODE_X, PREV, 1)], NOW, HoldPolicy())  # 1 token
        assert spray_candidates(s, NODE_Y, NOW + 999, 1000, 10) == []
        (row,) = spray_candidates(s, NODE_Y, NOW + 1000, 1000, 10)
        assert row.envelope.msg_id == a.msg_id
        assert spray_candidates(s, PREV, NOW + 1000, 1000, 10) == []  # it came from there
        spray_done(s, NODE_Y, [(row, 2)])
        assert spray_candidates(s, NODE_Y, NOW + 1000, 1000, 10) == []
        (h, *_) = held_for(s, USER, NOW)
        assert h.tokens == 2


def test_reroute_moves_custody_or_holds_it_again(tmp_path: Path) -> None:
    with Store.open(tmp_path / "n.db") as s:
        a, b = env(hop_limit=5), env(hop_limit=5)
        relay_accept(
            s,
            [RelayItem(HOP, PREV, a, None, NODE_X), RelayItem(HOP, PREV, b, None, NODE_X)],
            NOW,
            RelayQueueLimits(),
        )
        rows = custody_toward(s, HOP)
        a_ref, b_ref = ((r.id, r.msg_id) for r in rows)
        assert reroute(s, [(a_ref, NODE_Y)], [b_ref], NOW, 4) == (1, 1)
        assert [q.envelope.msg_id for q in relay_due(s, NODE_Y, NOW, 10)] == [a.msg_id]
        (h,) = held_for(s, USER, NOW)
        # hop_limit back to what it arrived with: the decrement is redone on release.
        assert h.envelope.msg_id == b.msg_id and h.envelope.hop_limit == 6
        assert (h.origin_node, h.from_node) == (NODE_X, PREV)
