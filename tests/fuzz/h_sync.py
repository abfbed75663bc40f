"""Inventory sync: the negentropy binding in both roles and the sync.proto parsers
feeding the session core (responder: Sync, SyncFetch, SyncPush requests; initiator:
their answers).

Seeds are real session messages (a first query, a reply, a later query) over a few
hundred items and the golden fixtures, so mutants stay close to valid ranges,
fingerprints, id lists and refusals.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from google.protobuf.message import DecodeError

from qpc_node._core import Negentropy, SyncError
from qpc_node.storefwd.sync import (
    SCOPE_CHANNELS,
    NeedItems,
    SyncCore,
    SyncLimits,
    SyncProtocolError,
    SyncRefused,
)
from qpc_node.wire.gen.qpc.v1 import sync_pb2
from tests.fuzz.registry import Invariant, pure

LIMIT = 4096


def _items(n: int, salt: int) -> list[tuple[int, bytes]]:
    return [(i // 4, hashlib.sha256(b"fz-sync-%d-%d" % (salt, i)).digest()) for i in range(n)]


MINE = _items(300, 0)
THEIRS = _items(200, 0) + _items(120, 1)


def _negentropy_seeds() -> list[bytes]:
    init = Negentropy(MINE, LIMIT)
    resp = Negentropy(THEIRS, LIMIT)
    q1 = init.initiate()
    r1 = resp.reconcile(q1)
    q2, _, _ = init.reconcile_with_ids(r1)
    seeds = [q1, r1, b"\x61", b"\x60", b"\x61\x00\x00"]
    if q2 is not None:
        seeds += [q2, resp.reconcile(q2)]
    return seeds


def _responder(data: bytes) -> None:
    out = Negentropy(THEIRS, LIMIT).reconcile(data)
    if len(out) > LIMIT or out[:1] != b"\x61":
        raise Invariant(f"responder answer of {len(out)} bytes starting {out[:1]!r}")


def _initiator(data: bytes) -> None:
    init = Negentropy(MINE, LIMIT)
    init.initiate()
    nxt, have, need = init.reconcile_with_ids(data)
    if nxt is not None and len(nxt) > LIMIT:
        raise Invariant(f"next query of {len(nxt)} bytes")
    if any(len(i) != 32 for i in have + need):
        raise Invariant("id of wrong length")
    # `need` may name ids we hold: a peer can list any id in any range (ids are
    # compared within a timestamp range), so the session core filters it; `have`
    # comes from our own storage and must be ours.
    if not set(have) <= {i for _, i in MINE}:
        raise Invariant("have names an id we do not hold")


pure("sync.negentropy.responder", seeds=_negentropy_seeds, target=_responder, allowed=(SyncError,))
pure("sync.negentropy.initiator", seeds=_negentropy_seeds, target=_initiator, allowed=(SyncError,))


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "sync"
A = b"\xaa" * 32
NOW_MS = 1_800_000_000_000
LIMITS = SyncLimits(frame_size_limit=LIMIT, batch_items=64, batch_bytes=64 * 1024)
SID = bytes(range(100, 116))


def _fixtures(prefix: str) -> list[bytes]:
    return [bytes.fromhex(p.read_text().strip()) for p in sorted(FIXTURES.glob(f"{prefix}*.hex"))]


def _listing() -> list[tuple[int, bytes]]:
    return [(NOW_MS + 1 + ts, i) for ts, i in THEIRS]


def _request_seeds() -> list[bytes]:
    first = Negentropy(MINE, LIMIT).initiate()
    return [
        sync_pb2.SyncRequest(
            session_id=SID, scope=SCOPE_CHANNELS, message=first
        ).SerializeToString(),
        *_fixtures("sync_request"),
    ]


def _served() -> SyncCore:
    """A responder with A's session SID open (scope 1)."""
    core = SyncCore(LIMITS)
    req = sync_pb2.SyncRequest(session_id=SID, scope=SCOPE_CHANNELS, message=b"\x61")
    r = core.on_query(A, req, 0.0, NOW_MS)
    assert isinstance(r, NeedItems)
    core.on_query(A, req, 0.0, NOW_MS, items=_listing())
    return core


def _check_sent(core: SyncCore) -> None:
    st = core.statistics()
    if st.sessions_open > 1 or st.items_taken:
        raise Invariant(f"responder state after one call: {st}")


def _on_query(data: bytes) -> None:
    req = sync_pb2.SyncRequest.FromString(data)
    core = SyncCore(LIMITS)
    r = core.on_query(A, req, 0.0, NOW_MS)
    if isinstance(r, NeedItems):
        r = core.on_query(A, req, 0.0, NOW_MS, items=_listing())
    if not isinstance(r, sync_pb2.SyncResponse) or len(r.message) > LIMIT:
        raise Invariant(f"bad answer {r!r:.80}")
    _check_sent(core)


def _on_fetch(data: bytes) -> None:
    req = sync_pb2.SyncFetchRequest.FromString(data)
    core = _served()
    r = core.on_fetch(A, req, 0.0)
    if isinstance(r, list) and (len(r) > LIMITS.batch_items or any(len(i) != 32 for i in r)):
        raise Invariant("fetch granted ids over the limits")
    _check_sent(core)


def _on_push(data: bytes) -> None:
    req = sync_pb2.SyncPushRequest.FromString(data)
    core = _served()
    r = core.on_push(A, req, 0.0)
    if isinstance(r, list) and (
        len(r) > LIMITS.batch_items or sum(map(len, r)) > LIMITS.batch_bytes
    ):
        raise Invariant("push granted items over the limits")
    _check_sent(core)


def _initiator_answer(data: bytes) -> None:
    resp = sync_pb2.SyncResponse.FromString(data)
    s = SyncCore(LIMITS).begin(A, SCOPE_CHANNELS, _listing(), 0.0, NOW_MS)
    s.start()
    nxt = s.on_answer(resp)
    if nxt is not None and len(nxt.message) > LIMIT:
        raise Invariant("next query over the frame limit")


def _initiator_fetch(data: bytes) -> None:
    resp = sync_pb2.SyncFetchResponse.FromString(data)
    s = SyncCore(LIMITS).begin(A, SCOPE_CHANNELS, [], 0.0, NOW_MS)
    s.start()
    s.on_answer(sync_pb2.SyncResponse(message=b"\x61"))
    got = s.on_fetch_response(resp, 4)
    if len(got) > 4 or sum(map(len, got)) > LIMITS.batch_bytes:
        raise Invariant("fetch answer over what was asked")


_PROTO_ERRORS = (DecodeError, SyncProtocolError, SyncRefused)

pure("sync.request", seeds=_request_seeds, target=_on_query, allowed=(DecodeError,))
pure(
    "sync.fetch_request",
    seeds=lambda: (
        [
            *_fixtures("sync_fetch_request"),
            sync_pb2.SyncFetchRequest(
                session_id=SID, scope=SCOPE_CHANNELS, ids=[i for _, i in THEIRS[:3]]
            ).SerializeToString(),
        ]
    ),
    target=_on_fetch,
    allowed=(DecodeError,),
)
pure(
    "sync.push_request",
    seeds=lambda: (
        [
            *_fixtures("sync_push_request"),
            sync_pb2.SyncPushRequest(
                session_id=SID, scope=SCOPE_CHANNELS, items=[b"x" * 100]
            ).SerializeToString(),
        ]
    ),
    target=_on_push,
    allowed=(DecodeError,),
)
pure(
    "sync.response",
    seeds=lambda: (
        [
            *_fixtures("sync_response"),
            sync_pb2.SyncResponse(
                message=Negentropy(THEIRS, LIMIT).reconcile(Negentropy(MINE, LIMIT).initiate())
            ).SerializeToString(),
        ]
    ),
    target=_initiator_answer,
    allowed=_PROTO_ERRORS,
)
pure(
    "sync.fetch_response",
    seeds=lambda: _fixtures("sync_fetch_response"),
    target=_initiator_fetch,
    allowed=_PROTO_ERRORS,
)
