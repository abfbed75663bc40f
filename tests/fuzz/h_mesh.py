"""Mesh routing decoders and the router fed with whatever decodes.

Seeds are real signed announcements and bindings (and the golden fixtures), so
mutants stay close to valid: bad signatures, swapped keys, odd hops, expired or
far-future expiries, oversized batches.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_node.errors import RemoteProtocolError
from qpc_node.mesh.routing import (
    INFINITY,
    Announcement,
    HomeBinding,
    Router,
    RouteUpdate,
    RoutingPolicy,
    SeqRequest,
    node_id_of,
    sign_announcement,
    sign_binding,
)
from tests.fuzz.registry import Invariant, pure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "mesh"
NOW = 1_800_000_000_000


def _key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz-mesh-%d" % i).digest())


def _pub(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _verify(pk: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True


KEYS = [_key(i) for i in range(4)]
PUBS = [_pub(k) for k in KEYS]


def _anns() -> list[Announcement]:
    return [
        sign_announcement(PUBS[1], KEYS[1].sign, 5, NOW + 60_000, 1),
        sign_announcement(PUBS[2], KEYS[2].sign, 9, NOW + 120_000, 4),
        sign_announcement(PUBS[3], KEYS[3].sign, 1, NOW + 1, INFINITY),
    ]


def _bindings() -> list[HomeBinding]:
    return [
        sign_binding(PUBS[3], KEYS[3].sign, node_id_of(PUBS[1]), 2, NOW + 3_600_000),
        sign_binding(PUBS[2], KEYS[2].sign, node_id_of(PUBS[0]), 1, NOW + 10),
    ]


def _fixtures(prefix: str) -> list[bytes]:
    return [
        bytes.fromhex("".join(p.read_text().split()))
        for p in sorted(FIXTURES.glob(f"{prefix}*.hex"))
    ]


def _update_seeds() -> list[bytes]:
    a, b = _anns(), _bindings()
    reqs = (SeqRequest(node_id_of(PUBS[2]), 10, 3),)
    return [
        *_fixtures("route_update"),
        RouteUpdate(tuple(a), tuple(b), reqs).encode(),
        RouteUpdate(tuple(a[:1])).encode(),
        RouteUpdate(bindings=tuple(b)).encode(),
        RouteUpdate(requests=reqs).encode(),
    ]


def decode_update(data: bytes) -> str:
    u = RouteUpdate.decode(data)
    if RouteUpdate.decode(u.encode()) != u:
        raise Invariant("route update does not round-trip")
    return f"routes={min(len(u.routes), 2)} bindings={min(len(u.bindings), 2)}"


def decode_announcement(data: bytes) -> str:
    a = Announcement.decode(data)
    if Announcement.decode(a.encode()) != a:
        raise Invariant("announcement does not round-trip")
    return "retraction" if a.retraction else "valid"


def decode_binding(data: bytes) -> str:
    b = HomeBinding.decode(data)
    if HomeBinding.decode(b.encode()) != b:
        raise Invariant("binding does not round-trip")
    return "valid"


def route_update(data: bytes) -> str:
    """Whatever decodes goes into a router on a link; nothing may raise, tables stay sane."""
    u = RouteUpdate.decode(data)
    r = Router(
        PUBS[0],
        KEYS[0].sign,
        _verify,
        policy=RoutingPolicy(),
        rand=random.Random(0).random,
        now_ms=NOW,
    )
    nb = node_id_of(PUBS[1])
    r.link_up(nb, NOW)
    r.poll(NOW)
    report = r.receive(nb, u, NOW)
    r.poll(NOW + 1)
    for dest, (hop, hops) in r.next_hops().items():
        if hop != nb or not 1 <= hops <= RoutingPolicy().max_hops or dest == r.node_id:
            raise Invariant(f"bad route {dest.hex()[:8]} via {hop.hex()[:8]} hops {hops}")
    for b in u.bindings:
        r.resolve(b.user, NOW)
    outcomes = sorted({o.value for o in (*report.routes, *report.bindings)})
    return ",".join(outcomes) or "empty"


pure("mesh.route_update", seeds=_update_seeds, target=decode_update, allowed=(RemoteProtocolError,))
pure(
    "mesh.announcement",
    seeds=lambda: [*_fixtures("route_announcement"), *(a.encode() for a in _anns())],
    target=decode_announcement,
    allowed=(RemoteProtocolError,),
)
pure(
    "mesh.binding",
    seeds=lambda: [*_fixtures("home_binding"), *(b.encode() for b in _bindings())],
    target=decode_binding,
    allowed=(RemoteProtocolError,),
)
pure(
    "mesh.router",
    seeds=_update_seeds,
    target=route_update,
    allowed=(RemoteProtocolError,),
    cost=2.0,
)
