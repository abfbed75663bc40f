"""Trust decisions without sockets: node ids, mesh TOFU pins, managed CA, static routes."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qpc_node.errors import ConfigError
from qpc_node.federation.routes import Local, NextHop, NoRoute, StaticRoutes
from qpc_node.federation.trust import KeyChanged, ManagedTrust, MeshTrust
from qpc_node.mesh.nodeid import (
    NotANodeKey,
    node_id,
    node_id_of_certificate,
    node_id_of_credentials,
    node_id_of_peer,
    parse_node_id,
)
from qpc_node.quic.tls import CertificateRejected, NodeCredentials, issue_certificate, make_ca
from qpc_node.store.federation import TrustSnapshot

NOW = 1_700_000_000_000
CA = make_ca()


def creds(common_name: str = "n", **kw: object) -> NodeCredentials:
    return issue_certificate(CA, common_name, **kw)  # type: ignore[arg-type]


def chain(c: NodeCredentials) -> list[bytes]:
    return [c.certificate_der]


def raw_key(c: NodeCredentials) -> bytes:
    key = c.certificate.public_key()
    assert isinstance(key, ed25519.Ed25519PublicKey)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------- node ids


def test_node_id_is_sha256_of_the_raw_ed25519_key() -> None:
    c = creds()
    expected = hashlib.sha256(raw_key(c)).digest()
    assert node_id(raw_key(c)) == expected
    assert node_id_of_credentials(c) == expected
    assert node_id_of_certificate(c.certificate_der) == expected
    assert node_id_of_peer(chain(c)) == expected
    # A reissued certificate for the same key keeps the id (it is the key, not the cert).
    assert parse_node_id(expected.hex()) == expected
    assert parse_node_id(":".join(f"{b:02X}" for b in expected)) == expected


def test_node_id_refuses_what_is_not_an_ed25519_node_key() -> None:
    with pytest.raises(NotANodeKey):
        node_id(b"short")
    with pytest.raises(NotANodeKey):
        node_id_of_certificate(creds(key_type="p256").certificate_der)
    with pytest.raises(NotANodeKey):
        node_id_of_certificate(b"not der")
    with pytest.raises(NotANodeKey):
        node_id_of_peer([])
    with pytest.raises(ConfigError):
        node_id_of_credentials(creds(key_type="p256"))
    with pytest.raises(ConfigError):
        parse_node_id("abc")


# --------------------------------------------------------------------------- mesh TOFU


def test_first_use_pins_and_binds_the_address() -> None:
    t = MeshTrust()
    b = creds("b")
    got = t.admit(chain(b), address="10.0.0.2:4201", expected=None, now_ms=NOW)
    assert got.node_id == node_id_of_credentials(b)
    assert [ch.pin.state for ch in got.changes if ch.pin] == ["trusted"]
    assert [ch.bind for ch in got.changes if ch.bind] == [("10.0.0.2:4201", got.node_id)]
    assert t.node_at("10.0.0.2:4201") == got.node_id
    # The same node again: no new binding to persist.
    again = t.admit(chain(b), address="10.0.0.2:4201", expected=None, now_ms=NOW + 1)
    assert [ch.bind for ch in again.changes if ch.bind] == []


def test_changed_key_at_a_known_address_is_refused_until_trusted() -> None:
    t = MeshTrust()
    old, new = creds("b"), creds("b")
    t.admit(chain(old), address="10.0.0.2:4201", expected=None, now_ms=NOW)
    with pytest.raises(KeyChanged) as info:
        t.admit(chain(new), address="10.0.0.2:4201", expected=None, now_ms=NOW)
    new_id = node_id_of_credentials(new)
    assert info.value.new_node_id == new_id
    assert [p.state for ch in info.value.persist if (p := ch.pin)] == ["refused"]
    assert [p.node_id for p in t.pending()] == [new_id]
    # Now refused anywhere, even inside the handshake and at another address.
    with pytest.raises(KeyChanged):
        t.check_handshake(chain(new), expected=None)
    with pytest.raises(KeyChanged):
        t.admit(chain(new), address="10.0.0.9:4201", expected=None, now_ms=NOW)
    changes = t.trust(new_id, NOW + 5)
    assert [ch.bind for ch in changes if ch.bind] == [("10.0.0.2:4201", new_id)]
    assert t.admit(chain(new), address="10.0.0.2:4201", expected=None, now_ms=NOW).node_id == new_id
    assert t.pending() == []


def test_dialling_for_a_node_id_refuses_another_key() -> None:
    t = MeshTrust()
    b, other = creds("b"), creds("x")
    with pytest.raises(KeyChanged):
        t.check_handshake(chain(other), expected=node_id_of_credentials(b))
    assert t.check_handshake(chain(b), expected=node_id_of_credentials(b)) == (
        node_id_of_credentials(b)
    )


def test_a_known_node_at_a_new_address_is_not_a_key_change() -> None:
    t = MeshTrust()
    b, c = creds("b"), creds("c")
    t.admit(chain(b), address="10.0.0.2:4201", expected=None, now_ms=NOW)
    t.admit(chain(c), address="10.0.0.3:4201", expected=None, now_ms=NOW)
    # c moves to b's old address (b moved away, c was pinned already): accepted.
    assert t.admit(chain(c), address="10.0.0.2:4201", expected=None, now_ms=NOW).node_id == (
        node_id_of_credentials(c)
    )


def test_mesh_refuses_no_certificate_wrong_key_type_and_expired() -> None:
    t = MeshTrust()
    now = dt.datetime.now(dt.UTC)
    expired = creds(not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
    with pytest.raises(CertificateRejected) as info:
        t.check_handshake([], expected=None)
    assert info.value.kind == "certificate_required"
    with pytest.raises(CertificateRejected):
        t.check_handshake(chain(creds(key_type="p256")), expected=None)
    with pytest.raises(CertificateRejected) as info:
        t.check_handshake(chain(expired), expected=None)
    assert info.value.kind == "certificate_expired"


def test_pins_come_back_from_a_snapshot() -> None:
    t = MeshTrust()
    b = creds("b")
    got = t.admit(chain(b), address="a:1", expected=None, now_ms=NOW)
    snap = TrustSnapshot(
        tuple(ch.pin for ch in got.changes if ch.pin),
        tuple(ch.bind for ch in got.changes if ch.bind),
    )
    t2 = MeshTrust(snap)
    with pytest.raises(KeyChanged):
        t2.admit(chain(creds("b")), address="a:1", expected=None, now_ms=NOW)


# --------------------------------------------------------------------------- managed


def test_managed_trusts_the_community_ca_only() -> None:
    t = ManagedTrust(CA.certificate_pem)
    b = creds("b")
    assert t.admit(chain(b), address="x:1", expected=None, now_ms=NOW).node_id == (
        node_id_of_credentials(b)
    )
    with pytest.raises(CertificateRejected) as info:
        t.check_handshake(chain(issue_certificate(make_ca(), "x")), expected=None)
    assert info.value.kind == "unknown_ca"
    now = dt.datetime.now(dt.UTC)
    old = creds(not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
    with pytest.raises(CertificateRejected) as info:
        t.check_handshake(chain(old), expected=None)
    assert info.value.kind == "certificate_expired"
    with pytest.raises(CertificateRejected):
        t.check_handshake(chain(b), expected=b"\0" * 32)
    with pytest.raises(CertificateRejected):  # CA-issued but not a mesh (Ed25519) key
        t.check_handshake(chain(creds(key_type="p256")), expected=None)
    assert t.refusals == 4
    with pytest.raises(ConfigError):
        ManagedTrust(b"not pem")


# --------------------------------------------------------------------------- routes


def test_static_routes() -> None:
    me, b, c = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
    u_me, u_b, u_c = b"\x1a" * 32, b"\x1b" * 32, b"\x1c" * 32
    r = StaticRoutes(me, {u_me: me, u_b: b, u_c: c}, via={c: b})
    assert r(u_me) == Local()
    assert r(u_b) == NextHop(b)  # a direct neighbour is its own next hop
    assert r(u_c) == NextHop(b)
    assert r(b"\x1d" * 32) == NoRoute()
    r.home(b"\x1d" * 32, c)
    assert r(b"\x1d" * 32) == NextHop(b)
    with pytest.raises(ConfigError):
        StaticRoutes(me, via={me: b})
    with pytest.raises(ConfigError):
        StaticRoutes(me, {b"short": b})
