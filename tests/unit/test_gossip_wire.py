"""Gossip frames on the wire (proto/qpc/v1/gossip.proto): golden bytes, round trips,
and what the decoder drops (counted by reason) or refuses (typed).

Fixtures live in ``tests/fixtures/wire/gossip/``; if an encoding changes on purpose:

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_gossip_wire.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import Message

from qpc_node.storefwd.core import Ack, Graft, IHave, Prune, Push
from qpc_node.storefwd.gossip_wire import (
    GossipMalformed,
    GossipWireLimits,
    decode_request,
    encode_request,
)
from qpc_node.wire.gen.qpc.v1 import gossip_pb2

G = gossip_pb2
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "gossip"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
A, B = bytes(range(16)), bytes(range(16, 32))

MESSAGES: dict[str, Message] = {
    "gossip_request_push": G.GossipRequest(
        frames=[G.GossipFrame(push=G.GossipPush(msg_id=A, hops=1, payload=b"channel-message"))]
    ),
    "gossip_request_control": G.GossipRequest(
        frames=[
            G.GossipFrame(
                ihave=G.GossipIHave(
                    entries=[G.GossipIHaveEntry(msg_id=A, hops=2), G.GossipIHaveEntry(msg_id=B)]
                )
            ),
            G.GossipFrame(graft=G.GossipGraft(msg_ids=[A])),
            G.GossipFrame(graft=G.GossipGraft()),
            G.GossipFrame(prune=G.GossipPrune()),
            G.GossipFrame(ack=G.GossipAck(msg_ids=[A, B])),
        ]
    ),
    "gossip_response": G.GossipResponse(),
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
def test_message_bytes_are_pinned(name: str) -> None:
    message = MESSAGES[name]
    data = message.SerializeToString(deterministic=True)
    golden(f"msg_{name}", data)
    assert type(message).FromString(data) == message


def test_no_stray_fixtures() -> None:
    assert {p.name for p in FIXTURES.glob("*.hex")} == {f"msg_{n}.hex" for n in MESSAGES}


def test_core_frames_encode_to_the_pinned_bytes() -> None:
    """The codec writes exactly what the schema fixtures pin (field numbers, order)."""
    assert encode_request([Push(A, 1, b"channel-message")]) == MESSAGES[
        "gossip_request_push"
    ].SerializeToString(deterministic=True)
    frames = [IHave(((A, 2), (B, 0))), Graft((A,)), Graft(()), Prune(), Ack((A, B))]
    data = encode_request(frames)
    assert data == MESSAGES["gossip_request_control"].SerializeToString(deterministic=True)
    dec = decode_request(data)
    assert dec.frames == frames and dec.dropped == {}


def test_bad_frames_are_dropped_by_reason_and_the_rest_kept() -> None:
    lim = GossipWireLimits(max_ids=4, max_payload=10)
    req = G.GossipRequest(
        frames=[
            G.GossipFrame(push=G.GossipPush(msg_id=b"short", hops=1, payload=b"x")),
            G.GossipFrame(push=G.GossipPush(msg_id=A, hops=0, payload=b"x")),
            G.GossipFrame(push=G.GossipPush(msg_id=A, hops=300, payload=b"x")),
            G.GossipFrame(push=G.GossipPush(msg_id=A, hops=1, payload=b"x" * 11)),
            G.GossipFrame(ihave=G.GossipIHave(entries=[G.GossipIHaveEntry(msg_id=A)] * 5)),
            G.GossipFrame(graft=G.GossipGraft(msg_ids=[b"x" * 17])),
            G.GossipFrame(ack=G.GossipAck()),
            G.GossipFrame(),
            G.GossipFrame(push=G.GossipPush(msg_id=B, hops=2, payload=b"ok")),
        ]
    )
    dec = decode_request(req.SerializeToString(), lim)
    assert dec.frames == [Push(B, 2, b"ok")]
    assert dec.dropped == {
        "bad_id": 2,
        "bad_hops": 2,
        "too_large": 1,
        "too_many_ids": 1,
        "empty": 2,
    }


def test_unreadable_calls_are_typed_errors() -> None:
    with pytest.raises(GossipMalformed):
        decode_request(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(GossipMalformed):
        decode_request(b"\x00" * 20, GossipWireLimits(max_request_bytes=10))
    many = encode_request([Prune()] * 5)
    with pytest.raises(GossipMalformed):
        decode_request(many, GossipWireLimits(max_frames=4))
