"""Golden wire fixtures: the exact bytes of every RPC message and frame header.

A failure here means an encoding changed. If that was deliberate (a new
field, a new wire version), regenerate and commit the fixtures with the
change, and say why in the commit:

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_rpc_wire_fixtures.py

Files are lowercase hex (one line) so a change shows up in a diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import Message

from qpc_node.errors import StatusCode
from qpc_node.rpc import HEALTH_METHOD
from qpc_node.rpc.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_frame, encode_varint
from qpc_node.wire.gen.qpc.v1 import (
    envelope_pb2,
    health_pb2,
    mesh_pb2,
    ops_pb2,
    rpc_pb2,
    service_pb2,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"

HEALTH_RESPONSE = health_pb2.HealthResponse(
    status=health_pb2.HealthResponse.SERVING, node_version="0.1.0", uptime_ms=86_400_123
)
MESSAGES: dict[str, Message] = {
    "health_request": health_pb2.HealthRequest(),
    "health_response": HEALTH_RESPONSE,
    "health_response_not_serving": health_pb2.HealthResponse(
        status=health_pb2.HealthResponse.NOT_SERVING, node_version="0.1.0", uptime_ms=0
    ),
    "request_health": rpc_pb2.Request(
        version=1,
        method=HEALTH_METHOD,
        call_id=1,
        body=b"",
        deadline_ms=5000,
        correlation_id="node-a/1",
    ),
    "request_minimal": rpc_pb2.Request(version=1, method="qpc.v1.X/Y", call_id=2**64 - 1),
    "response_ok_health": rpc_pb2.Response(
        version=1,
        call_id=1,
        body=HEALTH_RESPONSE.SerializeToString(),
        status=rpc_pb2.STATUS_CODE_OK,
    ),
    "response_error": rpc_pb2.Response(
        version=1,
        call_id=300,
        status=rpc_pb2.STATUS_CODE_UNSUPPORTED_VERSION,
        message="unsupported wire version 2 (supported: 1)",
    ),
    "response_refused": rpc_pb2.Response(
        version=1,
        call_id=0,
        status=rpc_pb2.STATUS_CODE_RESOURCE_EXHAUSTED,
        message="too many concurrent calls on this connection (limit 32)",
    ),
}
# Enqueue answers one result per envelope (issue 10): an OK result encodes exactly as
# before the status field existed (readers that predate it keep working), a refused one
# carries status + detail.
ENQUEUE_OK = service_pb2.EnqueueResult(msg_id=bytes(range(16)), seq=7)
ENQUEUE_REFUSED = service_pb2.EnqueueResult(
    msg_id=bytes(range(16, 32)),
    status=rpc_pb2.STATUS_CODE_NOT_FOUND,
    detail="recipient 04040404 is not homed here",
)
MESSAGES.update(
    {
        "enqueue_result_ok": ENQUEUE_OK,
        "enqueue_result_duplicate": service_pb2.EnqueueResult(
            msg_id=bytes(range(16)), seq=7, duplicate=True
        ),
        "enqueue_result_refused": ENQUEUE_REFUSED,
        # Accepted for relay toward a home 2 node-to-node hops away (field 6).
        "enqueue_result_relayed": service_pb2.EnqueueResult(msg_id=bytes(range(16)), hops=2),
        # Held on the node until a route to the home appears (field 7, storefwd).
        "enqueue_result_held": service_pb2.EnqueueResult(msg_id=bytes(range(16)), held=True),
        "enqueue_result_aborted": service_pb2.EnqueueResult(
            msg_id=bytes(range(48, 64)),
            status=rpc_pb2.STATUS_CODE_ABORTED,
            detail="not stored: another envelope of this all-or-nothing batch was refused",
        ),
        # A commit's fan-out: all or nothing (EnqueueRequest.atomic).
        "enqueue_request_atomic": service_pb2.EnqueueRequest(
            envelopes=[
                envelope_pb2.Envelope(
                    msg_id=bytes(range(16)),
                    recipient=bytes(range(32)),
                    expiry_ms=1_800_000_000_000,
                    hop_limit=8,
                    ciphertext=b"\x00" * 16,
                )
            ],
            atomic=True,
        ),
        "enqueue_response_mixed": service_pb2.EnqueueResponse(
            results=[
                ENQUEUE_OK,
                ENQUEUE_REFUSED,
                service_pb2.EnqueueResult(
                    msg_id=bytes(range(32, 48)),
                    status=rpc_pb2.STATUS_CODE_RESOURCE_EXHAUSTED,
                    detail="mailbox messages quota exceeded: limit 3, would reach 4",
                ),
            ]
        ),
    }
)
# Issue 12: on a mesh the challenge names the node, and Prove carries the client's
# signed home binding (new fields; a node off the mesh leaves node_id empty and the
# bytes are as before).
MESSAGES.update(
    {
        "auth_challenge_response_mesh": service_pb2.AuthChallengeResponse(
            nonce=bytes(range(32)), node_id=bytes(range(100, 132))
        ),
        "auth_prove_request_home": service_pb2.AuthProveRequest(
            public_key=bytes(range(32)),
            signature=bytes(range(64)),
            home=mesh_pb2.HomeBinding(
                user=bytes(range(32, 64)),
                user_key=bytes(range(32)),
                node=bytes(range(100, 132)),
                seq=1_800_000_000_000,
                expiry_ms=1_800_172_800_000,
                signature=bytes(range(64, 128)),
            ),
        ),
    }
)
# /mesh peers and /mesh routes (qpc.v1.Node/Mesh).
MESSAGES.update(
    {
        "mesh_request": ops_pb2.MeshRequest(),
        "mesh_response_off": ops_pb2.MeshResponse(on_mesh=False),
        # A peer with every address it is known by (MeshPeer.addresses, field 7).
        "mesh_peer_addresses": ops_pb2.MeshPeer(
            node_id=bytes(range(32, 64)),
            address="[fe80::1%3]:4201",
            state="up",
            addresses=["[fe80::1%3]:4201", "10.0.0.2:4201"],
        ),
        # Per peer and per destination: route hops and users homed (fields 8, 9; 6).
        "mesh_peer_hops_users": ops_pb2.MeshPeer(
            node_id=bytes(range(32, 64)), state="up", hops=1, users=12
        ),
        "mesh_route_users": ops_pb2.MeshRoute(
            destination=bytes(range(64, 96)), next_hop=bytes(range(32, 64)), hops=3, users=2
        ),
        "mesh_response": ops_pb2.MeshResponse(
            on_mesh=True,
            node_id=bytes(range(32)),
            bindings=3,
            peers=[
                ops_pb2.MeshPeer(
                    node_id=bytes(range(32, 64)),
                    address="[fe80::1%3]:4201",
                    state="up",
                    srtt_ms=1.5,
                    sources=["mdns", "static"],
                )
            ],
            routes=[
                ops_pb2.MeshRoute(
                    destination=bytes(range(64, 96)),
                    next_hop=bytes(range(32, 64)),
                    hops=2,
                    seq=1025,
                    expires_ms=1_800_000_300_000,
                )
            ],
        ),
    }
)
# The node's mDNS discovery in /mesh peers (MeshResponse.discovery, field 6).
MESSAGES.update(
    {
        "mesh_discovery": ops_pb2.MeshDiscovery(
            running=False,
            interfaces=["mesh0"],
            peers=0,
            start_failures=3,
            last_error="mesh0: no such interface or not up",
            announced=False,
        ),
        "mesh_response_discovery": ops_pb2.MeshResponse(
            on_mesh=True,
            node_id=bytes(range(32)),
            discovery=ops_pb2.MeshDiscovery(
                running=True, interfaces=["br-lan"], peers=4, announced=True
            ),
        ),
    }
)
# /mesh trust and `qpc trust` (qpc.v1.Node/MeshTrust).
MESSAGES.update(
    {
        "mesh_trust_request": ops_pb2.MeshTrustRequest(fingerprint="0a1b2c3d"),
        "mesh_trust_response": ops_pb2.MeshTrustResponse(
            node_id=bytes(range(32)), was_refused=True, address="[fe80::1%3]:4201"
        ),
    }
)
HEADER_LENGTHS = [0, 1, 127, 128, 300, 16383, 16384, 2**21 - 1, 2**21, DEFAULT_MAX_FRAME_SIZE]


def golden(name: str, data: bytes) -> None:
    path = FIXTURES / f"{name}.hex"
    if REGEN:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_text(data.hex() + "\n")
        return
    assert path.exists(), f"missing fixture {path.name}: regenerate with QPC_REGEN_FIXTURES=1"
    expected = bytes.fromhex(path.read_text().strip())
    assert data == expected, (
        f"wire encoding of {name} changed; if deliberate, regenerate (QPC_REGEN_FIXTURES=1)"
    )


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_bytes_are_pinned(name: str) -> None:
    message = MESSAGES[name]
    data = message.SerializeToString(deterministic=True)
    golden(f"msg_{name}", data)
    # ...and the pinned bytes still parse to the same message.
    assert type(message).FromString(data) == message


@pytest.mark.parametrize(
    "name", [n for n in sorted(MESSAGES) if n.startswith(("request", "response"))]
)
def test_framed_bytes_are_pinned(name: str) -> None:
    payload = MESSAGES[name].SerializeToString(deterministic=True)
    frame = encode_frame(payload)
    golden(f"frame_{name}", frame)
    assert FrameDecoder().feed(frame) == [payload]


@pytest.mark.parametrize("length", HEADER_LENGTHS)
def test_frame_header_bytes_are_pinned(length: int) -> None:
    golden(f"frame_header_{length}", encode_varint(length))


def test_enqueue_result_ok_is_readable_as_before_the_status_field() -> None:
    """The pre-issue-10 EnqueueResult (fields 1-3) parses the new OK bytes unchanged,
    and the new reader sees OK in bytes an old node wrote."""
    old_bytes = bytes.fromhex("0a10" + bytes(range(16)).hex() + "1007")
    assert ENQUEUE_OK.SerializeToString(deterministic=True) == old_bytes
    parsed = service_pb2.EnqueueResult.FromString(old_bytes)
    assert (parsed.status, parsed.detail) == (rpc_pb2.STATUS_CODE_OK, "")


def test_enqueue_result_hops_is_optional_both_ways() -> None:
    """A relayed OK read by an old client is a plain OK; an old node's OK reads hops 0."""
    relayed = service_pb2.EnqueueResult(msg_id=bytes(range(16)), hops=2).SerializeToString()
    assert relayed == bytes.fromhex("0a10" + bytes(range(16)).hex() + "3002")
    old = service_pb2.EnqueueResult.FromString(ENQUEUE_OK.SerializeToString())
    assert (old.status, old.hops) == (rpc_pb2.STATUS_CODE_OK, 0)


def test_auth_messages_off_the_mesh_encode_as_before() -> None:
    """Without the new fields, Challenge/Prove bytes are the pre-issue-12 ones."""
    ch = service_pb2.AuthChallengeResponse(nonce=b"\x01" * 32)
    assert ch.SerializeToString() == bytes.fromhex("0a20" + "01" * 32)
    prove = service_pb2.AuthProveRequest(public_key=b"\x02" * 32, signature=b"\x03" * 64)
    assert prove.SerializeToString() == bytes.fromhex("0a20" + "02" * 32 + "1240" + "03" * 64)


def test_status_enum_mirrors_error_codes() -> None:
    """rpc.proto StatusCode and qpc_node.errors.StatusCode must agree number for number."""
    wire = {
        name.removeprefix("STATUS_CODE_"): number for name, number in rpc_pb2.StatusCode.items()
    }
    assert wire == {code.name: code.value for code in StatusCode}


def test_no_stray_fixtures() -> None:
    """A fixture no test checks is a fixture nobody notices going stale."""
    expected = {f"msg_{n}.hex" for n in MESSAGES}
    expected |= {f"frame_{n}.hex" for n in MESSAGES if n.startswith(("request", "response"))}
    expected |= {f"frame_header_{n}.hex" for n in HEADER_LENGTHS}
    present = {p.name for p in FIXTURES.glob("*.hex")}
    assert present == expected
