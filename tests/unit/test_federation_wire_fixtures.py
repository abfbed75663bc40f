"""Golden wire fixtures of the federation messages (proto/qpc/v1/federation.proto).

Kept under ``tests/fixtures/wire/federation/`` (own directory: the RPC fixture
test owns the top level and refuses files it does not know). A failure means an
encoding changed; if deliberate, regenerate and commit with the schema change:

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_federation_wire_fixtures.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from qpc_node.federation.core import M_PING, status_name
from qpc_node.rpc.framing import FrameDecoder, encode_frame
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2, rpc_pb2

F = federation_pb2
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "federation"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"

ENVELOPE = envelope_pb2.Envelope(
    msg_id=bytes(range(16)),
    recipient=bytes(range(32)),
    expiry_ms=1_800_000_000_000,
    hop_limit=7,
    ciphertext=b"\x00" * 16,
)
MESSAGES: dict[str, Message] = {
    "relay_enqueue_request": F.RelayEnqueueRequest(envelopes=[ENVELOPE, ENVELOPE]),
    # Declared origins (field 2): one per envelope, the second unknown (empty).
    "relay_enqueue_request_origins": F.RelayEnqueueRequest(
        envelopes=[ENVELOPE, ENVELOPE], origins=[bytes(range(32, 64)), b""]
    ),
    "relay_enqueue_response": F.RelayEnqueueResponse(
        results=[
            F.RelayResult(msg_id=bytes(range(16)), status=F.RELAY_QUEUED),
            F.RelayResult(msg_id=bytes(range(16)), status=F.RELAY_DUPLICATE),
            F.RelayResult(
                msg_id=bytes(range(16, 32)), status=F.RELAY_HOP_LIMIT_EXCEEDED, detail="hop_limit 0"
            ),
            F.RelayResult(
                msg_id=bytes(range(32, 48)), status=F.RELAY_QUEUE_FULL, detail="source full"
            ),
        ]
    ),
    "relay_enqueue_response_fairness": F.RelayEnqueueResponse(
        results=[
            F.RelayResult(
                msg_id=bytes(range(16)),
                status=F.RELAY_STRANGER_LIMIT,
                detail="stranger_share_used: share of a sender the recipient has not accepted,"
                " messages",
            ),
            F.RelayResult(
                msg_id=bytes(range(16, 32)), status=F.RELAY_MAILBOX_FULL, detail="mailbox_full"
            ),
        ]
    ),
    "relay_result_stored_local": F.RelayResult(
        msg_id=bytes(range(16)), status=F.RELAY_STORED_LOCAL
    ),
    "proxy_keypackage_request": F.ProxyKeyPackageFetchRequest(identity=bytes(range(32))),
    "proxy_keypackage_response": F.ProxyKeyPackageFetchResponse(
        key_package=b"\x01\x02" * 8, last_resort=True
    ),
    "announce_request": F.AnnounceRequest(payload=b"route-update-bytes"),
    "announce_response": F.AnnounceResponse(accepted=True),
    "ping_request": F.PingRequest(nonce=2**63 + 5),
    "ping_response": F.PingResponse(nonce=2**63 + 5, node_id=bytes(range(32)), relay_queue=3),
    # Boot ids (field 2 / 4): a restarted neighbour is told apart from a second dial.
    "ping_request_boot": F.PingRequest(nonce=2**63 + 5, boot_id=bytes(range(100, 116))),
    "ping_response_boot": F.PingResponse(
        nonce=2**63 + 5, node_id=bytes(range(32)), relay_queue=3, boot_id=bytes(range(16))
    ),
    # Store-and-forward: origin nodes (field 3) and spray tokens (field 4), parallel to
    # the envelopes; the second envelope's origin node unknown, ordinary custody.
    "relay_enqueue_request_storefwd": F.RelayEnqueueRequest(
        envelopes=[ENVELOPE, ENVELOPE],
        origins=[bytes(range(32, 64)), b""],
        origin_nodes=[bytes(range(64, 96)), b""],
        spray_tokens=[2, 0],
    ),
    # Hand-over copies (field 5), parallel to the envelopes: the first one a re-homed
    # user's old home handed over, the second ordinary custody.
    "relay_enqueue_request_handover": F.RelayEnqueueRequest(
        envelopes=[ENVELOPE, ENVELOPE],
        origins=[bytes(range(32, 64)), b""],
        origin_nodes=[bytes(range(64, 96)), b""],
        handover=[True, False],
    ),
    "relay_enqueue_response_storefwd": F.RelayEnqueueResponse(
        results=[
            F.RelayResult(
                msg_id=bytes(range(16)), status=F.RELAY_HELD, detail="held until a route appears"
            ),
            F.RelayResult(
                msg_id=bytes(range(16, 32)),
                status=F.RELAY_EXPIRY_TOO_FAR,
                detail="expiry more than 604800 s ahead",
            ),
        ]
    ),
    # Carrier flag (PingRequest 3 / PingResponse 5).
    "ping_request_carrier": F.PingRequest(
        nonce=2**63 + 5, boot_id=bytes(range(100, 116)), carrier=True
    ),
    "ping_response_carrier": F.PingResponse(
        nonce=2**63 + 5,
        node_id=bytes(range(32)),
        relay_queue=3,
        boot_id=bytes(range(16)),
        carrier=True,
    ),
    "delivery_receipt": F.DeliveryReceipt(
        msg_id=bytes(range(16)),
        recipient=bytes(range(32)),
        home_key=bytes(range(32, 64)),
        delivered_ms=1_800_000_000_123,
        signature=bytes(range(64)),
    ),
    "receipt_request": F.ReceiptRequest(
        receipts=[
            F.DeliveryReceipt(
                msg_id=bytes(range(16)),
                recipient=bytes(range(32)),
                home_key=bytes(range(32, 64)),
                delivered_ms=1_800_000_000_123,
                signature=bytes(range(64)),
            )
        ]
        * 2
    ),
    "receipt_response": F.ReceiptResponse(taken=2),
    "request_ping": rpc_pb2.Request(
        version=1,
        method=M_PING,
        call_id=9,
        body=F.PingRequest(nonce=1).SerializeToString(),
        deadline_ms=2500,
    ),
}

# The numbers are the wire: renumbering a status would make old relays misread answers.
STATUS_NUMBERS = {
    "RELAY_STATUS_UNSPECIFIED": 0,
    "RELAY_STORED_LOCAL": 1,
    "RELAY_QUEUED": 2,
    "RELAY_DUPLICATE": 3,
    "RELAY_HOP_LIMIT_EXCEEDED": 4,
    "RELAY_EXPIRED": 5,
    "RELAY_NO_ROUTE": 6,
    "RELAY_QUEUE_FULL": 7,
    "RELAY_INVALID": 8,
    "RELAY_LOOP": 9,
    "RELAY_REFUSED": 10,
    "RELAY_STRANGER_LIMIT": 11,
    "RELAY_MAILBOX_FULL": 12,
    "RELAY_HELD": 13,
    "RELAY_EXPIRY_TOO_FAR": 14,
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


def test_framed_ping_request_is_pinned() -> None:
    payload = MESSAGES["request_ping"].SerializeToString(deterministic=True)
    frame = encode_frame(payload)
    golden("frame_request_ping", frame)
    assert FrameDecoder().feed(frame) == [payload]


def test_relay_status_numbers() -> None:
    assert dict(F.RelayStatus.items()) == STATUS_NUMBERS


def _old_relay_request_type() -> type[Message]:
    """RelayEnqueueRequest as a peer built before ``origins`` (field 2) knows it."""
    fdp = descriptor_pb2.FileDescriptorProto()
    F.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "old/qpc/v1/federation.proto"
    fdp.package = "old.qpc.v1"
    fdp.dependency[:] = []
    fdp.ClearField("enum_type")
    fdp.ClearField("service")
    (req,) = [m for m in fdp.message_type if m.name == "RelayEnqueueRequest"]
    env = descriptor_pb2.DescriptorProto()
    envelope_pb2.Envelope.DESCRIPTOR.CopyToProto(env)
    fdp.ClearField("message_type")
    fdp.message_type.extend([env, req])
    del req.field[1:]  # keeps only envelopes = 1
    fdp.message_type[1].field[0].type_name = ".old.qpc.v1.Envelope"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("old.qpc.v1.RelayEnqueueRequest")
    )


def test_origins_are_a_compatible_extension() -> None:
    """Old and new peers read each other's RelayEnqueue: without origins the bytes are
    what they were before the field existed; an old peer reads a new request's
    envelopes unchanged (it skips field 2); a new peer reads an old request as having
    no origins (every origin unknown)."""
    new = MESSAGES["relay_enqueue_request_origins"]
    assert isinstance(new, F.RelayEnqueueRequest)
    old_type = _old_relay_request_type()
    old = old_type.FromString(new.SerializeToString())
    assert [e.SerializeToString() for e in old.envelopes] == [  # type: ignore[attr-defined]
        e.SerializeToString() for e in new.envelopes
    ]
    old_bytes = bytes.fromhex((FIXTURES / "msg_relay_enqueue_request.hex").read_text().strip())
    parsed = F.RelayEnqueueRequest.FromString(old_bytes)
    assert len(parsed.envelopes) == 2 and list(parsed.origins) == []
    assert F.RelayEnqueueRequest(envelopes=new.envelopes).SerializeToString() == old_bytes


def test_boot_id_is_a_compatible_extension() -> None:
    """Without a boot id a Ping is the bytes it was before the field; an old peer's
    Ping reads as stating none (the link then falls back to the timing rule)."""
    old_req = bytes.fromhex((FIXTURES / "msg_ping_request.hex").read_text().strip())
    assert F.PingRequest.FromString(old_req).boot_id == b""
    assert F.PingRequest(nonce=2**63 + 5).SerializeToString() == old_req
    new = MESSAGES["ping_response_boot"]
    assert isinstance(new, F.PingResponse)
    assert F.PingResponse.FromString(new.SerializeToString()).boot_id == bytes(range(16))


def test_no_stray_fixtures() -> None:
    expected = {f"msg_{n}.hex" for n in MESSAGES} | {"frame_request_ping.hex"}
    assert {p.name for p in FIXTURES.glob("*.hex")} == expected


def test_a_status_from_a_newer_peer_is_named_not_raised() -> None:
    """Enums are open on the wire: a value this build lacks must not raise in the
    drainer (which names every refusal it counts); it is a final refusal, by number."""
    assert status_name(F.RELAY_MAILBOX_FULL) == "RELAY_MAILBOX_FULL"
    assert status_name(99) == "RELAY_STATUS_99"


def test_storefwd_fields_are_a_compatible_extension() -> None:
    """Without origin nodes, spray tokens or the carrier flag the bytes are what they
    were before those fields; a new peer reads an old request as declaring none."""
    old_req = bytes.fromhex(
        (FIXTURES / "msg_relay_enqueue_request_origins.hex").read_text().strip()
    )
    parsed = F.RelayEnqueueRequest.FromString(old_req)
    assert list(parsed.origin_nodes) == [] and list(parsed.spray_tokens) == []
    new = MESSAGES["relay_enqueue_request_storefwd"]
    assert isinstance(new, F.RelayEnqueueRequest)
    stripped = F.RelayEnqueueRequest(envelopes=new.envelopes, origins=new.origins)
    assert stripped.SerializeToString() == old_req
    old_ping = bytes.fromhex((FIXTURES / "msg_ping_request_boot.hex").read_text().strip())
    assert F.PingRequest.FromString(old_ping).carrier is False
    assert (
        F.PingRequest(nonce=2**63 + 5, boot_id=bytes(range(100, 116))).SerializeToString()
        == old_ping
    )


def test_handover_flags_are_a_compatible_extension() -> None:
    """A batch without hand-overs is sent without field 5 (the bytes an older peer
    sent); an older request reads as no hand-over at all."""
    new = MESSAGES["relay_enqueue_request_handover"]
    assert isinstance(new, F.RelayEnqueueRequest)
    assert list(F.RelayEnqueueRequest.FromString(new.SerializeToString()).handover) == [
        True,
        False,
    ]
    old_req = bytes.fromhex(
        (FIXTURES / "msg_relay_enqueue_request_storefwd.hex").read_text().strip()
    )
    assert list(F.RelayEnqueueRequest.FromString(old_req).handover) == []
    stripped = F.RelayEnqueueRequest(
        envelopes=new.envelopes, origins=new.origins, origin_nodes=new.origin_nodes
    )
    assert len(stripped.SerializeToString()) + 4 == len(new.SerializeToString())
