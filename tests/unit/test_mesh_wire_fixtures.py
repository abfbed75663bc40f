"""Golden fixtures of the mesh routing wire format (proto/qpc/v1/mesh.proto).

Pinned: the protobuf bytes of each message *and* the exact bytes each signature
covers (the contract another implementation must meet: domain prefix, fixed
widths, big-endian). Keys are fixed seeds and Ed25519 is deterministic, so the
signatures are stable too; each pinned signature is checked against its pinned
signed bytes with the real verifier. Regenerate deliberately with

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_mesh_wire_fixtures.py

Files live in tests/fixtures/wire/mesh/ (lowercase hex, one line).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mesh_sim import ed25519_verify, raw_public

from qpc_node.mesh.routing import (
    INFINITY,
    Announcement,
    HomeBinding,
    RouteUpdate,
    SeqRequest,
    node_id_of,
    sign_announcement,
    sign_binding,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "mesh"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
EXPIRY = 1_800_000_300_000

NODE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
USER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
NODE_PUB = raw_public(NODE)
USER_PUB = raw_public(USER)

ANN = sign_announcement(NODE_PUB, NODE.sign, 7, EXPIRY)
RELAYED = Announcement(ANN.origin, ANN.origin_key, 7, EXPIRY, ANN.signature, 3)
RETRACTION = Announcement(ANN.origin, ANN.origin_key, 7, EXPIRY, ANN.signature, INFINITY)
BINDING = sign_binding(USER_PUB, USER.sign, node_id_of(NODE_PUB), 2, EXPIRY)
REQUEST = SeqRequest(ANN.origin, 8, 16)

MESSAGES: dict[str, bytes] = {
    "route_announcement_origin": ANN.encode(),
    "route_announcement_relayed": RELAYED.encode(),
    "route_announcement_retraction": RETRACTION.encode(),
    "home_binding": BINDING.encode(),
    "route_update": RouteUpdate((RELAYED, RETRACTION), (BINDING,), (REQUEST,)).encode(),
    "route_update_empty": RouteUpdate().encode(),
    "signed_route": ANN.signed_bytes(),
    "signed_binding": BINDING.signed_bytes(),
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


def pinned(name: str) -> bytes:
    return bytes.fromhex((FIXTURES / f"{name}.hex").read_text().strip())


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_mesh_bytes_are_pinned(name: str) -> None:
    golden(name, MESSAGES[name])


def test_pinned_bytes_decode_to_the_same_records() -> None:
    assert Announcement.decode(pinned("route_announcement_origin")) == ANN
    assert Announcement.decode(pinned("route_announcement_retraction")).retraction
    assert HomeBinding.decode(pinned("home_binding")) == BINDING
    upd = RouteUpdate.decode(pinned("route_update"))
    assert upd.routes == (RELAYED, RETRACTION) and upd.bindings == (BINDING,)
    assert upd.requests == (REQUEST,)
    assert RouteUpdate.decode(pinned("route_update_empty")) == RouteUpdate()


def test_pinned_signatures_cover_exactly_the_pinned_signed_bytes() -> None:
    ann = Announcement.decode(pinned("route_announcement_relayed"))
    signed = pinned("signed_route")
    assert signed.startswith(b"qpc-mesh-route-v1\x00") and len(signed) == 18 + 32 + 32 + 16
    assert ed25519_verify(ann.origin_key, signed, ann.signature)
    # hops is not covered: the relayed copy carries the origin's signature unchanged.
    assert ann.signature == Announcement.decode(pinned("route_announcement_origin")).signature
    b = HomeBinding.decode(pinned("home_binding"))
    signed_b = pinned("signed_binding")
    assert signed_b.startswith(b"qpc-mesh-home-v1\x00") and len(signed_b) == 17 + 3 * 32 + 16
    assert ed25519_verify(b.user_key, signed_b, b.signature)
    assert ann.origin == node_id_of(ann.origin_key) and b.user == node_id_of(b.user_key)


def test_no_stray_fixtures() -> None:
    assert {p.name for p in FIXTURES.glob("*.hex")} == {f"{n}.hex" for n in MESSAGES}
