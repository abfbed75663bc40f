"""The sans-IO inventory sync core (qpc_node/storefwd/sync.py): two cores talking.

Reconciliation finds exactly the difference, its cost follows the difference (not
the 10k-item set), both sides end with the union, and every bad input is a typed,
counted refusal or error with nothing stored.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import pytest

from qpc_node.errors import ConfigError
from qpc_node.storefwd.sync import (
    INITIATOR_TRANSITIONS,
    KIND_CHANNEL,
    KIND_HELD,
    KIND_RECEIPT,
    RESPONDER_TRANSITIONS,
    SCOPE_CHANNELS,
    SCOPE_HELD,
    IEvent,
    InitiatorSession,
    IState,
    NeedItems,
    REvent,
    RState,
    SyncCore,
    SyncLimits,
    SyncProtocolError,
    SyncRefused,
    SyncStateError,
    sync_id,
)
from qpc_node.wire.gen.qpc.v1 import sync_pb2

A = b"\xaa" * 32
B = b"\xbb" * 32
NOW_MS = 1_800_000_000_000
R = sync_pb2.SyncRefusal


def _mid(n: int) -> bytes:
    return hashlib.sha256(b"msg-%d" % n).digest()[:16]


@dataclass
class Inventory:
    """An in-memory source: sync id -> (expiry_ms, encoded item)."""

    items: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)

    def add(self, n: int, payload: bytes = b"p" * 100) -> None:
        i = sync_id(SCOPE_CHANNELS, KIND_CHANNEL, _mid(n))
        ts = NOW_MS + 60_000 + n
        self.items[i] = (ts, struct.pack(">Q", ts) + _mid(n) + payload)

    def listing(self) -> list[tuple[int, bytes]]:
        return [(ts, i) for i, (ts, _) in self.items.items()]

    def offer(self, ids: list[bytes]) -> list[bytes]:
        return [self.items[i][1] for i in ids if i in self.items]

    def take(self, items: list[bytes]) -> int:
        n = 0
        for it in items:
            ts = struct.unpack(">Q", it[:8])[0]
            i = sync_id(SCOPE_CHANNELS, KIND_CHANNEL, it[8:24])
            if i not in self.items:
                self.items[i] = (ts, it)
                n += 1
        return n


@dataclass
class Cost:
    sync_bytes: int = 0  # negentropy rounds (requests + answers)
    item_bytes: int = 0  # fetch and push calls
    rounds: int = 0


def session(
    ca: SyncCore, cb: SyncCore, a: Inventory, b: Inventory, now: float = 0.0
) -> tuple[InitiatorSession, Cost]:
    """A opens a session with B and moves both differences (what a Syncer does)."""
    cost = Cost()
    s = ca.begin(B, SCOPE_CHANNELS, a.listing(), now, NOW_MS)
    req: sync_pb2.SyncRequest | None = s.start()
    while req is not None:
        r = cb.on_query(A, req, now, NOW_MS)
        if isinstance(r, NeedItems):
            r = cb.on_query(A, req, now, NOW_MS, items=b.listing())
        assert isinstance(r, sync_pb2.SyncResponse)
        cost.sync_bytes += req.ByteSize() + r.ByteSize()
        cost.rounds += 1
        req = s.on_answer(r)
    for p in s.push_requests(a.offer(s.have)):
        got = cb.on_push(A, p, now)
        assert isinstance(got, list)
        resp = cb.push_answer(b.take(got))
        cost.item_bytes += p.ByteSize() + resp.ByteSize()
        s.on_push_response(resp, len(p.items))
    for f in s.fetch_requests():
        ids = cb.on_fetch(A, f, now)
        assert isinstance(ids, list)
        fresp = cb.fetch_answer(len(ids), b.offer(ids))
        cost.item_bytes += f.ByteSize() + fresp.ByteSize()
        s.note_taken(a.take(s.on_fetch_response(fresp, len(f.ids))))
    s.finish(now)
    return s, cost


def pair(n: int, d: int) -> tuple[Inventory, Inventory]:
    """n items in common... minus d: A lacks d//2 of them, B lacks the other d - d//2."""
    a, b = Inventory(), Inventory()
    for k in range(n):
        if k < d // 2:
            b.add(k)
        elif k < d:
            a.add(k)
        else:
            a.add(k)
            b.add(k)
    return a, b


@pytest.mark.parametrize("d", [0, 1, 100, 5000])
def test_union_after_one_session(d: int) -> None:
    a, b = pair(10_000, d)
    ca, cb = SyncCore(), SyncCore()
    s, cost = session(ca, cb, a, b)
    assert s.state is IState.DONE and not s.capped
    assert set(a.items) == set(b.items) and len(a.items) == 10_000
    assert len(s.need) == d // 2 and len(s.have) == d - d // 2
    st = ca.statistics()
    assert (st.sessions_completed, st.ids_need, st.ids_have) == (1, d // 2, d - d // 2)
    assert cb.statistics().sessions_served == 1
    print(f"d={d}: sync bytes {cost.sync_bytes}, rounds {cost.rounds}, items {cost.item_bytes}")


def test_cost_grows_with_the_difference_not_the_set() -> None:
    full_list = 10_000 * 32
    costs = {}
    for d in (0, 1, 100, 5000):
        a, b = pair(10_000, d)
        costs[d] = session(SyncCore(), SyncCore(), a, b)[1].sync_bytes
    assert costs[0] < 1_000
    assert costs[1] < full_list / 50  # ~3 KB against 320 KB of ids
    assert costs[1] < costs[100] < costs[5000]
    assert costs[100] < full_list / 10


def test_receipt_and_held_copy_are_different_items() -> None:
    m = _mid(1)
    held, receipt = sync_id(SCOPE_HELD, KIND_HELD, m), sync_id(SCOPE_HELD, KIND_RECEIPT, m)
    assert len(held) == 32 and held != receipt
    assert sync_id(SCOPE_CHANNELS, KIND_CHANNEL, m) not in (held, receipt)
    ca, cb = SyncCore(), SyncCore()
    s = ca.begin(B, SCOPE_HELD, [(NOW_MS + 1000, held)], 0.0, NOW_MS)
    req = s.start()
    r = cb.on_query(A, req, 0.0, NOW_MS)
    assert isinstance(r, NeedItems)
    r = cb.on_query(A, req, 0.0, NOW_MS, items=[(NOW_MS + 1000, receipt)])
    assert isinstance(r, sync_pb2.SyncResponse)
    assert s.on_answer(r) is None
    assert (s.have, s.need) == ([held], [receipt])
    with pytest.raises(ValueError):
        sync_id(SCOPE_HELD, KIND_HELD, b"short")


def test_expired_items_are_out_of_every_set() -> None:
    a, b = Inventory(), Inventory()
    a.add(1)
    i = sync_id(SCOPE_CHANNELS, KIND_CHANNEL, _mid(2))
    b.items[i] = (NOW_MS, b"x")  # expires now: not offered, not listed
    s, _ = session(SyncCore(), SyncCore(), a, b)
    assert s.need == [] and s.have != []


def test_rounds_cap_keeps_what_was_learnt_and_next_session_finishes() -> None:
    a, b = pair(3000, 3000)  # disjoint halves: every id listed
    lim = SyncLimits(frame_size_limit=4096, max_rounds=3)
    ca, cb = SyncCore(lim), SyncCore(lim)
    s, _ = session(ca, cb, a, b)
    assert s.capped and s.state is IState.DONE and 0 < len(s.have) + len(s.need) < 3000
    assert ca.statistics().sessions_capped == 1
    for k in range(40):
        if set(a.items) == set(b.items):
            break
        session(ca, cb, a, b, now=float(k + 1) * 10)
    assert set(a.items) == set(b.items) and len(a.items) == 3000


def test_ids_cap() -> None:
    a, b = pair(2000, 2000)
    lim = SyncLimits(frame_size_limit=4096, max_ids=300)
    s, _ = session(SyncCore(lim), SyncCore(lim), a, b)
    assert s.capped and len(s.have) + len(s.need) <= 300


def test_frame_limit_bounds_every_message() -> None:
    a, b = pair(4000, 4000)
    lim = SyncLimits(frame_size_limit=4096, max_rounds=100)
    ca, cb = SyncCore(lim), SyncCore(lim)
    s = ca.begin(B, SCOPE_CHANNELS, a.listing(), 0.0, NOW_MS)
    req: sync_pb2.SyncRequest | None = s.start()
    while req is not None:
        assert len(req.message) <= 4096
        r = cb.on_query(A, req, 0.0, NOW_MS)
        if isinstance(r, NeedItems):
            r = cb.on_query(A, req, 0.0, NOW_MS, items=b.listing())
        assert isinstance(r, sync_pb2.SyncResponse) and len(r.message) <= 4096
        req = s.on_answer(r)


# ------------------------------------------------------------------ responder: bad input


def _query(
    cb: SyncCore, req: sync_pb2.SyncRequest, now: float = 0.0, items: int = 10
) -> sync_pb2.SyncResponse:
    r = cb.on_query(A, req, now, NOW_MS)
    if isinstance(r, NeedItems):
        listing = [(NOW_MS + 1000 + k, sync_id(1, 0, _mid(k))) for k in range(items)]
        r = cb.on_query(A, req, now, NOW_MS, items=listing)
    assert isinstance(r, sync_pb2.SyncResponse)
    return r


def _first(sid: bytes = b"s" * 16, scope: int = SCOPE_CHANNELS) -> sync_pb2.SyncRequest:
    msg = SyncCore().begin(B, scope, [], 0.0, NOW_MS).start().message
    return sync_pb2.SyncRequest(session_id=sid, scope=scope, message=msg)  # type: ignore[arg-type]


def _reason(r: sync_pb2.SyncResponse) -> int:
    assert r.WhichOneof("result") == "refusal"
    return r.refusal.reason


@pytest.mark.parametrize(
    ("req", "reason"),
    [
        (sync_pb2.SyncRequest(session_id=b"s", scope=SCOPE_CHANNELS, message=b"\x61"), R.MALFORMED),
        (sync_pb2.SyncRequest(session_id=b"s" * 16, scope=9, message=b"\x61"), R.UNKNOWN_SCOPE),  # type: ignore[arg-type]
        (
            sync_pb2.SyncRequest(
                session_id=b"s" * 16, scope=SCOPE_CHANNELS, message=b"\x61" * 40_000
            ),
            R.TOO_LARGE,
        ),
        (
            sync_pb2.SyncRequest(
                session_id=b"s" * 16, scope=SCOPE_CHANNELS, message=b"\x61\x05\xff"
            ),
            R.MALFORMED,
        ),
        (
            sync_pb2.SyncRequest(session_id=b"s" * 16, scope=SCOPE_CHANNELS, message=b""),
            R.MALFORMED,
        ),
    ],
)
def test_bad_query_refused_and_counted(req: sync_pb2.SyncRequest, reason: int) -> None:
    cb = SyncCore()
    r = _query(cb, req)
    assert _reason(r) == reason
    st = cb.statistics()
    assert st.refusals_sent == {sync_pb2.SyncRefusal.Reason.Name(reason).lower(): 1}
    assert st.sessions_open == 0  # a malformed first message leaves nothing open


def test_flooding_neighbour_rate_limited_and_counted() -> None:
    lim = SyncLimits(session_rate=0.1, session_burst=3)
    cb = SyncCore(lim)
    results = [_query(cb, _first(bytes([k]) * 16)) for k in range(10)]
    ok = [r for r in results if r.WhichOneof("result") == "message"]
    refused = [r for r in results if r.WhichOneof("result") == "refusal"]
    assert len(ok) == 3 and len(refused) == 7
    assert all(r.refusal.reason == R.RATE_LIMITED for r in refused)
    assert all(r.refusal.retry_after_ms > 0 for r in refused)
    assert cb.statistics().refusals_sent == {"rate_limited": 7}
    assert cb.statistics().sessions_open == 1  # one scope, one session: replaced, not piled up
    # Time refills the bucket.
    assert _query(cb, _first(b"z" * 16), now=11.0).WhichOneof("result") == "message"


def test_busy_when_too_many_sessions() -> None:
    cb = SyncCore(SyncLimits(max_sessions=1))
    assert _query(cb, _first(scope=SCOPE_CHANNELS)).WhichOneof("result") == "message"
    r = _query(cb, _first(scope=SCOPE_HELD))
    assert _reason(r) == R.BUSY and r.refusal.retry_after_ms > 0
    cb.expire(100.0)  # the idle session closes
    assert cb.open_sessions() == 0
    assert _query(cb, _first(scope=SCOPE_HELD), now=100.0).WhichOneof("result") == "message"


def test_rounds_per_session_capped_on_responder() -> None:
    cb = SyncCore(SyncLimits(max_rounds=2))
    req = _first()
    assert _query(cb, req).WhichOneof("result") == "message"
    assert _query(cb, req).WhichOneof("result") == "message"
    assert _reason(_query(cb, req)) == R.TOO_MANY_ROUNDS


def test_fetch_and_push_need_an_open_session_and_stay_bounded() -> None:
    cb = SyncCore(SyncLimits(batch_items=4, max_ids=6))
    sid = b"s" * 16
    f = sync_pb2.SyncFetchRequest(session_id=sid, scope=SCOPE_CHANNELS, ids=[b"i" * 32])
    r = cb.on_fetch(A, f, 0.0)
    assert isinstance(r, sync_pb2.SyncFetchResponse) and r.refusal.reason == R.UNKNOWN_SESSION
    p = sync_pb2.SyncPushRequest(session_id=sid, scope=SCOPE_CHANNELS, items=[b"x"])
    rp = cb.on_push(A, p, 0.0)
    assert isinstance(rp, sync_pb2.SyncPushResponse) and rp.refusal.reason == R.UNKNOWN_SESSION
    _query(cb, _first(sid))
    # Another neighbour cannot use A's session.
    other = cb.on_fetch(B, f, 0.0)
    assert isinstance(other, sync_pb2.SyncFetchResponse)
    assert other.refusal.reason == R.UNKNOWN_SESSION
    big = sync_pb2.SyncFetchRequest(session_id=sid, scope=SCOPE_CHANNELS, ids=[b"i" * 32] * 5)
    r = cb.on_fetch(A, big, 0.0)
    assert isinstance(r, sync_pb2.SyncFetchResponse) and r.refusal.reason == R.TOO_LARGE
    heavy = sync_pb2.SyncPushRequest(
        session_id=sid, scope=SCOPE_CHANNELS, items=[b"x" * 600_000] * 2
    )
    rp = cb.on_push(A, heavy, 0.0)
    assert isinstance(rp, sync_pb2.SyncPushResponse) and rp.refusal.reason == R.TOO_LARGE
    assert cb.on_fetch(
        A, sync_pb2.SyncFetchRequest(session_id=sid, scope=SCOPE_CHANNELS, ids=[b"i" * 32] * 4), 0.0
    ) == [b"i" * 32]
    r = cb.on_fetch(
        A, sync_pb2.SyncFetchRequest(session_id=sid, scope=SCOPE_CHANNELS, ids=[b"j" * 32] * 4), 0.0
    )
    assert isinstance(r, sync_pb2.SyncFetchResponse) and r.refusal.reason == R.TOO_MANY_IDS
    assert cb.open_sessions() == 0  # over its id budget: the session is closed


def test_fetch_with_bad_ids_closes_the_session() -> None:
    cb = SyncCore()
    sid = b"s" * 16
    _query(cb, _first(sid))
    r = cb.on_fetch(
        A, sync_pb2.SyncFetchRequest(session_id=sid, scope=SCOPE_CHANNELS, ids=[b"short"]), 0.0
    )
    assert isinstance(r, sync_pb2.SyncFetchResponse) and r.refusal.reason == R.MALFORMED
    assert cb.open_sessions() == 0 and cb.statistics().refusals_sent["malformed"] == 1


def test_fetch_answer_cut_to_what_was_asked() -> None:
    cb = SyncCore(SyncLimits(batch_bytes=2048))
    assert list(cb.fetch_answer(2, [b"a", b"b", b"c"]).items) == [b"a", b"b"]
    assert list(cb.fetch_answer(3, [b"a" * 1500, b"b" * 1500]).items) == [b"a" * 1500]


def test_link_down_closes_the_peers_sessions() -> None:
    cb = SyncCore()
    _query(cb, _first())
    cb.link_down(A)
    assert cb.open_sessions() == 0 and cb.next_deadline() is None


# ------------------------------------------------------------------ initiator: bad answers


def _opened() -> InitiatorSession:
    s = SyncCore().begin(B, SCOPE_CHANNELS, [(NOW_MS + 5, b"q" * 32)], 0.0, NOW_MS)
    s.start()
    return s


@pytest.mark.parametrize(
    "resp",
    [
        sync_pb2.SyncResponse(),
        sync_pb2.SyncResponse(message=b"\x61\x01\x00\x05"),
        sync_pb2.SyncResponse(message=b"\x50"),
        sync_pb2.SyncResponse(message=b"\x61" + b"\x00" * 40_000),
    ],
)
def test_bad_answer_fails_the_session(resp: sync_pb2.SyncResponse) -> None:
    s = _opened()
    with pytest.raises(SyncProtocolError):
        s.on_answer(resp)
    assert s.state is IState.FAILED
    assert s._core.statistics().bad_answers == 1
    assert s._core.statistics().sessions_failed == 1


def test_refusal_ends_the_session_with_its_reason() -> None:
    s = _opened()
    with pytest.raises(SyncRefused) as ei:
        s.on_answer(sync_pb2.SyncResponse(refusal=R(reason=R.RATE_LIMITED, retry_after_ms=500)))
    assert ei.value.retry_after_ms == 500 and s.state is IState.FAILED
    assert s._core.statistics().refusals_received == {"rate_limited": 1}


def test_fetch_answer_over_the_ask_is_refused() -> None:
    a, b = pair(100, 10)
    ca, cb = SyncCore(), SyncCore()
    s = ca.begin(B, SCOPE_CHANNELS, a.listing(), 0.0, NOW_MS)
    req: sync_pb2.SyncRequest | None = s.start()
    while req is not None:
        r = cb.on_query(A, req, 0.0, NOW_MS)
        if isinstance(r, NeedItems):
            r = cb.on_query(A, req, 0.0, NOW_MS, items=b.listing())
        assert isinstance(r, sync_pb2.SyncResponse)
        req = s.on_answer(r)
    with pytest.raises(SyncProtocolError):
        s.on_fetch_response(sync_pb2.SyncFetchResponse(items=[b"x"] * 6), 5)
    assert s.state is IState.FAILED


def test_transition_tables_are_closed() -> None:
    s = _opened()
    with pytest.raises(SyncStateError):
        s.finish(0.0)  # RECONCILING has no TRANSFERRED edge
    with pytest.raises(SyncStateError):
        s.push_requests([])
    assert (IState.DONE, IEvent.START) not in INITIATOR_TRANSITIONS
    assert all((st, ev) not in RESPONDER_TRANSITIONS for st in (RState.CLOSED,) for ev in REvent)


def test_limits_validated() -> None:
    with pytest.raises(ConfigError):
        SyncLimits(frame_size_limit=1000)
    with pytest.raises(ConfigError):
        SyncLimits(max_rounds=0)


def test_responder_snapshot_shared_by_sessions_opened_soon_after() -> None:
    """One engine per scope serves every neighbour opening within snapshot_max_age_s
    (memory and store reads do not grow with the number of neighbours)."""
    cb = SyncCore(SyncLimits(snapshot_max_age_s=5.0))
    req = _first()
    assert isinstance(cb.on_query(A, req, 0.0, NOW_MS), NeedItems)
    cb.on_query(A, req, 0.0, NOW_MS, items=[(NOW_MS + 10, b"q" * 32)])
    r = cb.on_query(B, req, 4.0, NOW_MS)  # B, 4 s later: same snapshot, no read
    assert isinstance(r, sync_pb2.SyncResponse) and r.WhichOneof("result") == "message"
    assert cb.statistics().snapshots == 1 and cb.open_sessions() == 2
    r2 = cb.on_query(B, _first(b"t" * 16), 6.0, NOW_MS)  # stale now: read again
    assert isinstance(r2, NeedItems)
