"""Channel messages on the wire (wire/channel.py): every relay check refuses with its
own typed error, checked before anything is stored; golden bytes of channel.proto.

Fixtures live in ``tests/fixtures/wire/channel/`` (own directory: the RPC fixture
test owns the top level). If an encoding changed on purpose, regenerate:

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_channel_wire.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import Message

from qpc_node.errors import RemoteProtocolError, StatusCode
from qpc_node.wire.channel import (
    REASONS,
    ChannelExpired,
    ChannelExpiryTooFar,
    ChannelHopLimit,
    ChannelMalformed,
    ChannelMessage,
    ChannelMessageError,
    ChannelPolicy,
    ChannelTooLarge,
    decode_channel_message,
)
from qpc_node.wire.gen.qpc.v1 import channel_pb2, rpc_pb2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "channel"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
NOW = 1_800_000_000_000
DAY = 24 * 3600 * 1000
POLICY = ChannelPolicy()


def message(**kw: object) -> ChannelMessage:
    fields: dict[str, object] = {
        "channel_id": bytes(range(32)),
        "msg_id": bytes(range(16)),
        "expiry_ms": NOW + DAY,
        "hop_limit": 8,
        "sealed": b"\x05" * 284,
    }
    fields.update(kw)
    return ChannelMessage(**fields)  # type: ignore[arg-type]


def test_a_good_message_round_trips() -> None:
    m = message()
    assert decode_channel_message(m.encode(), NOW, POLICY) == m
    assert m.forwarded().hop_limit == 7
    with pytest.raises(ChannelHopLimit):
        message(hop_limit=0).forwarded()


@pytest.mark.parametrize(
    ("fields", "error", "reason"),
    [
        ({"channel_id": b"\x01" * 31}, ChannelMalformed, "malformed"),
        ({"channel_id": b""}, ChannelMalformed, "malformed"),
        ({"msg_id": b"\x01" * 17}, ChannelMalformed, "malformed"),
        ({"sealed": b"\x01" * 27}, ChannelMalformed, "malformed"),
        ({"expiry_ms": 0}, ChannelMalformed, "malformed"),
        ({"sealed": b"\x01" * (16 * 1024 + 1)}, ChannelTooLarge, "too_large"),
        ({"expiry_ms": NOW}, ChannelExpired, "expired"),
        ({"expiry_ms": NOW - 1}, ChannelExpired, "expired"),
        ({"expiry_ms": NOW + 7 * DAY + 1}, ChannelExpiryTooFar, "expiry_too_far"),
        ({"expiry_ms": 2**64 - 1}, ChannelExpiryTooFar, "expiry_too_far"),
        ({"hop_limit": 17}, ChannelHopLimit, "hop_limit"),
        ({"hop_limit": 2**32 - 1}, ChannelHopLimit, "hop_limit"),
    ],
)
def test_each_relay_check_refuses_typed(
    fields: dict[str, object], error: type[ChannelMessageError], reason: str
) -> None:
    data = message(**fields).encode()
    with pytest.raises(error) as info:
        decode_channel_message(data, NOW, POLICY)
    assert isinstance(info.value, RemoteProtocolError)  # the sender is at fault
    assert info.value.reason == reason and reason in REASONS
    want = StatusCode.PAYLOAD_TOO_LARGE if reason == "too_large" else StatusCode.INVALID_ARGUMENT
    assert info.value.code == want


def test_the_limits_are_the_policy() -> None:
    tight = ChannelPolicy(max_sealed=100, max_expiry_ahead_ms=1000, max_hop_limit=2)
    for fields in ({"sealed": b"\x00" * 101}, {"expiry_ms": NOW + 1001}, {"hop_limit": 3}):
        with pytest.raises(ChannelMessageError):
            decode_channel_message(message(**fields).encode(), NOW, tight)
    edge = message(sealed=b"\x00" * 100, expiry_ms=NOW + 1000, hop_limit=2)
    assert decode_channel_message(edge.encode(), NOW, tight) == edge


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\x0a\x20", b"\x0a\x05abc", bytes([0x2A, 0x80, 0x80, 0x80, 0x80, 0x80])],
)
def test_malformed_protobuf_is_typed(data: bytes) -> None:
    with pytest.raises(ChannelMalformed):
        decode_channel_message(data, NOW, POLICY)


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(ChannelTooLarge):
        decode_channel_message(b"\xff" * (POLICY.max_sealed + 1024), NOW, POLICY)


# -- golden bytes ------------------------------------------------------------------------

MESSAGE = channel_pb2.ChannelMessage(
    channel_id=bytes(range(32)),
    msg_id=bytes(range(32, 48)),
    expiry_ms=1_800_086_400_000,
    hop_limit=8,
    sealed=bytes(range(48, 48 + 44)),
)
MESSAGES: dict[str, Message] = {
    "channel_message": MESSAGE,
    "channel_plaintext": channel_pb2.ChannelPlaintext(
        sender_key=bytes(range(32)),
        created_ms=1_800_000_000_000,
        body="the bridge is closed",
        signature=bytes(range(64)),
    ),
    "publish_request": channel_pb2.ChannelPublishRequest(message=MESSAGE),
    "publish_response_ok": channel_pb2.ChannelPublishResponse(seq=42),
    "publish_response_duplicate": channel_pb2.ChannelPublishResponse(duplicate=True, seq=42),
    "publish_response_refused": channel_pb2.ChannelPublishResponse(
        status=rpc_pb2.STATUS_CODE_INVALID_ARGUMENT, detail="hop_limit 17 above the maximum 16"
    ),
    "fetch_request": channel_pb2.ChannelFetchRequest(
        cursors=[
            channel_pb2.ChannelCursor(channel_id=bytes(range(32)), after_seq=7),
            channel_pb2.ChannelCursor(channel_id=bytes(range(1, 33))),
        ],
        limit=128,
        wait_ms=20_000,
    ),
    "fetch_response": channel_pb2.ChannelFetchResponse(
        messages=[channel_pb2.StoredChannelMessage(seq=8, message=MESSAGE)], more=True
    ),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_channel_message_bytes_are_pinned(name: str) -> None:
    message = MESSAGES[name]
    data = message.SerializeToString(deterministic=True)
    path = FIXTURES / f"{name}.hex"
    if REGEN:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_text(data.hex() + "\n")
    assert path.exists(), f"missing fixture {path.name}: regenerate with QPC_REGEN_FIXTURES=1"
    assert data == bytes.fromhex(path.read_text().strip()), f"encoding of {name} changed"
    assert type(message).FromString(data) == message


def test_no_stray_channel_fixtures() -> None:
    assert {p.name for p in FIXTURES.glob("*.hex")} == {f"{n}.hex" for n in MESSAGES}


def test_the_fixture_message_passes_the_relay_checks() -> None:
    data = bytes.fromhex((FIXTURES / "channel_message.hex").read_text().strip())
    m = decode_channel_message(data, 1_800_000_000_000, POLICY)
    assert (m.hop_limit, len(m.sealed)) == (8, 44)
