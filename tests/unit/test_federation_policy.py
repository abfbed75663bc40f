"""Trust decisions without sockets: node ids, mesh TOFU pins, managed CA, static routes."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qpc_node.errors import ConfigError, QpcError, StatusCode
from qpc_node.federation.routes import Local, NextHop, NoRoute, StaticRoutes
from qpc_node.federation.trust import (
    AmbiguousNode,
    KeyChanged,
    ManagedTrust,
    MeshTrust,
    UnknownNode,
    load_managed_credentials,
    resolve_node_prefix,
)
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


def test_managed_refuses_a_certificate_not_yet_valid() -> None:
    t = ManagedTrust(CA.certificate_pem)
    now = dt.datetime.now(dt.UTC)
    early = creds(not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=9))
    with pytest.raises(CertificateRejected) as info:
        t.check_handshake(chain(early), expected=None)
    assert info.value.kind == "certificate_expired" and t.refusals == 1


def _write_pair(tmp: Path, c: NodeCredentials, key_pem: bytes | None = None) -> tuple[str, str]:
    cert, key = tmp / "fed.crt", tmp / "fed.key"
    cert.write_bytes(c.certificate_pem + c.chain_pem)
    key.write_bytes(key_pem if key_pem is not None else c.private_key_pem)
    return str(cert), str(key)


def test_managed_credentials_load_a_ca_issued_ed25519_pair(tmp_path: Path) -> None:
    b = creds("b")
    got = load_managed_credentials(
        *_write_pair(tmp_path, b), CA.certificate_pem, now=dt.datetime.now(dt.UTC)
    )
    # The pair is the node's identity: same node id, same certificate clients pin.
    assert node_id_of_credentials(got) == node_id_of_credentials(b)
    assert got.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("p256", "must be Ed25519"),
        ("other_ca", "not usable with federation.ca"),
        ("other_key", "does not match"),
        ("missing", "No such file"),
        ("garbage", "not PEM"),
    ],
)
def test_managed_credentials_refuse_what_cannot_federate(
    tmp_path: Path, case: str, match: str
) -> None:
    b = creds("b")
    if case == "p256":
        paths = _write_pair(tmp_path, creds("p", key_type="p256"))
    elif case == "other_ca":
        paths = _write_pair(tmp_path, issue_certificate(make_ca(), "x"))
    elif case == "other_key":
        paths = _write_pair(tmp_path, b, creds("c").private_key_pem)
    elif case == "missing":
        paths = (str(tmp_path / "none.crt"), str(tmp_path / "none.key"))
    else:
        paths = _write_pair(tmp_path, b, b"garbage")
    with pytest.raises(ConfigError, match=match):
        load_managed_credentials(*paths, CA.certificate_pem, now=dt.datetime.now(dt.UTC))


def test_managed_credentials_out_of_date_load_with_an_error_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = dt.datetime.now(dt.UTC)
    old = creds(not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
    got = load_managed_credentials(*_write_pair(tmp_path, old), CA.certificate_pem, now=now)
    assert got.fingerprint == old.fingerprint  # the node's own users keep their service
    assert any("outside its validity period" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- trust FPR


def test_a_node_id_is_named_by_its_full_hex_or_a_unique_prefix() -> None:
    a, b, c = b"\x0a" * 32, b"\x0a\x0b" + b"\0" * 30, b"\xab" * 32
    known = [a, b, c]
    assert resolve_node_prefix(c.hex(), []) == c  # all 64 digits: known or not
    assert resolve_node_prefix("AB", known) == c
    assert resolve_node_prefix("0a:0a", known) == a
    with pytest.raises(AmbiguousNode) as info:
        resolve_node_prefix("0a", known)
    assert a.hex() in str(info.value) and b.hex() in str(info.value)
    assert info.value.code is StatusCode.INVALID_ARGUMENT
    with pytest.raises(UnknownNode) as unknown:
        resolve_node_prefix("ff", known)
    assert unknown.value.code is StatusCode.NOT_FOUND
    for bad in ("", "zz", "f" * 65):
        with pytest.raises(QpcError) as err:
            resolve_node_prefix(bad, known)
        assert err.value.code is StatusCode.INVALID_ARGUMENT


def test_ids_refused_in_a_handshake_can_be_named_by_prefix() -> None:
    """A node dialled for its pinned id that answers with a new key is refused inside
    the handshake (nothing stored); the operator must still be able to trust it by prefix."""
    t = MeshTrust()
    b, new = creds("b"), creds("b2")
    new_id = node_id_of_credentials(new)
    with pytest.raises(KeyChanged):
        t.check_handshake(chain(new), expected=node_id_of_credentials(b))
    assert new_id in t.known_ids()
    assert resolve_node_prefix(new_id.hex()[:10], t.known_ids()) == new_id
    t.trust(new_id, NOW)
    assert t.check_handshake(chain(new), expected=node_id_of_credentials(b)) == new_id


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
