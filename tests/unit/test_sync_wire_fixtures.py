"""Golden fixtures of the inventory sync wire format (proto/qpc/v1/sync.proto).

Pinned: the protobuf bytes of each message, the negentropy v1 bytes inside them
(deterministic items, so another negentropy implementation must produce the same
first message) and the sync-id derivation (SHA-256 over a domain prefix, scope,
kind and msg id). Regenerate deliberately with

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_sync_wire_fixtures.py

Files live in tests/fixtures/wire/sync/ (lowercase hex, one line).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node._core import Negentropy
from qpc_node.storefwd.sync import (
    KIND_CHANNEL,
    KIND_HELD,
    KIND_RECEIPT,
    SCOPE_CHANNELS,
    SCOPE_HELD,
    sync_id,
)
from qpc_node.wire.gen.qpc.v1 import sync_pb2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "sync"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
EXPIRY = 1_800_000_300_000
MSG_ID = bytes(range(16))
SESSION = bytes(range(100, 116))
R = sync_pb2.SyncRefusal

ITEMS = [(EXPIRY + k, sync_id(SCOPE_CHANNELS, KIND_CHANNEL, bytes([k]) * 16)) for k in range(40)]
FIRST = Negentropy(ITEMS).initiate()
ANSWER = Negentropy(ITEMS[:30]).reconcile(FIRST)

MESSAGES: dict[str, bytes] = {
    "sync_id_channel": sync_id(SCOPE_CHANNELS, KIND_CHANNEL, MSG_ID),
    "sync_id_held": sync_id(SCOPE_HELD, KIND_HELD, MSG_ID),
    "sync_id_receipt": sync_id(SCOPE_HELD, KIND_RECEIPT, MSG_ID),
    "negentropy_first": FIRST,
    "negentropy_answer": ANSWER,
    "sync_request": sync_pb2.SyncRequest(
        session_id=SESSION, scope=SCOPE_CHANNELS, message=FIRST
    ).SerializeToString(),
    "sync_response_message": sync_pb2.SyncResponse(message=ANSWER).SerializeToString(),
    "sync_response_refused": sync_pb2.SyncResponse(
        refusal=R(reason=R.RATE_LIMITED, retry_after_ms=4_001)
    ).SerializeToString(),
    "sync_fetch_request": sync_pb2.SyncFetchRequest(
        session_id=SESSION, scope=SCOPE_HELD, ids=[ITEMS[0][1], ITEMS[1][1]]
    ).SerializeToString(),
    "sync_fetch_response": sync_pb2.SyncFetchResponse(
        items=[b"item-one", b"item-two"]
    ).SerializeToString(),
    "sync_fetch_response_refused": sync_pb2.SyncFetchResponse(
        refusal=R(reason=R.UNKNOWN_SESSION)
    ).SerializeToString(),
    "sync_push_request": sync_pb2.SyncPushRequest(
        session_id=SESSION, scope=SCOPE_CHANNELS, items=[b"item-one"]
    ).SerializeToString(),
    "sync_push_response": sync_pb2.SyncPushResponse(accepted=1).SerializeToString(),
    "sync_push_response_refused": sync_pb2.SyncPushResponse(
        refusal=R(reason=R.TOO_LARGE)
    ).SerializeToString(),
}


def golden(name: str, data: bytes) -> None:
    path = FIXTURES / f"{name}.hex"
    if REGEN:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_text(data.hex() + "\n")
        return
    assert path.exists(), f"missing fixture {path.name}: regenerate with QPC_REGEN_FIXTURES=1"
    assert data == bytes.fromhex(path.read_text().strip()), (
        f"wire encoding of {name} changed; if deliberate, regenerate (QPC_REGEN_FIXTURES=1)"
    )


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_sync_bytes_are_pinned(name: str) -> None:
    golden(name, MESSAGES[name])


def test_pinned_messages_decode() -> None:
    """The pinned bytes parse back with the current schema (field numbers kept)."""
    pinned = {p.stem: bytes.fromhex(p.read_text().strip()) for p in FIXTURES.glob("*.hex")}
    req = sync_pb2.SyncRequest.FromString(pinned["sync_request"])
    assert (req.session_id, req.scope, req.message) == (SESSION, SCOPE_CHANNELS, FIRST)
    resp = sync_pb2.SyncResponse.FromString(pinned["sync_response_refused"])
    assert resp.WhichOneof("result") == "refusal"
    assert (resp.refusal.reason, resp.refusal.retry_after_ms) == (R.RATE_LIMITED, 4_001)
    # The pinned first message still reconciles: 10 ids the answerer lacks.
    init = Negentropy(ITEMS)
    init.initiate()
    nxt, have, need = init.reconcile_with_ids(pinned["negentropy_answer"])
    assert nxt is None and len(have) == 10 and need == []
