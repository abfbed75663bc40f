"""Node credentials on disk and the TLS policy objects (no network)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from qpc_node.errors import ConfigError
from qpc_node.quic.testing import make_test_pki
from qpc_node.quic.tls import (
    ALPN_CLIENT,
    ALPN_FEDERATION,
    CertificateRejected,
    ClientTLS,
    ServerTLS,
    load_or_create_node_credentials,
    make_ca,
    normalize_fingerprint,
)


@pytest.mark.parametrize("key_type", ["ed25519", "p256"])
def test_created_once_then_loaded(tmp_path: Path, key_type: str) -> None:
    first = load_or_create_node_credentials(tmp_path / "node", key_type=key_type)  # type: ignore[arg-type]
    key_file = tmp_path / "node" / "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # the certificate too: the key dir's files are 0600 (else every fresh node warns)
    assert stat.S_IMODE((tmp_path / "node" / "node.crt").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == ["node.crt", "node.key"]
    again = load_or_create_node_credentials(tmp_path / "node")
    assert again.fingerprint == first.fingerprint
    assert first.fingerprint == hashlib.sha256(first.certificate_der).hexdigest()
    assert "PRIVATE" not in repr(first)


def test_community_ca_repr_hides_its_key() -> None:
    ca = make_ca("repr CA")
    assert b"PRIVATE" in ca.private_key_pem
    assert "PRIVATE" not in repr(ca) and "PRIVATE" not in str(ca)


def test_half_present_or_mismatched_files_refused(tmp_path: Path) -> None:
    a = load_or_create_node_credentials(tmp_path / "a")
    b = load_or_create_node_credentials(tmp_path / "b")
    (tmp_path / "b" / "node.key").write_bytes(a.private_key_pem)
    with pytest.raises(ConfigError):
        load_or_create_node_credentials(tmp_path / "b")
    (tmp_path / "a" / "node.crt").unlink()
    with pytest.raises(ConfigError):
        load_or_create_node_credentials(tmp_path / "a")
    assert b.fingerprint != a.fingerprint


def test_operator_supplied_ca_chain_is_loaded(tmp_path: Path) -> None:
    pki = make_test_pki()
    d = tmp_path / "managed"
    d.mkdir()
    (d / "node.crt").write_bytes(pki.server.certificate_pem + pki.ca.certificate_pem)
    (d / "node.key").write_bytes(pki.server.private_key_pem)
    creds = load_or_create_node_credentials(d)
    assert creds.fingerprint == pki.server.fingerprint
    assert len(creds.chain) == 1


def test_fingerprint_normalization() -> None:
    fp = "AB" * 32
    assert normalize_fingerprint(":".join([fp[i : i + 2] for i in range(0, 64, 2)])) == fp.lower()
    with pytest.raises(ConfigError):
        normalize_fingerprint("abcd")


def test_client_tls_refuses_to_trust_everything() -> None:
    with pytest.raises(ConfigError):
        ClientTLS(ALPN_CLIENT)


def test_server_offers_federation_only_with_trust() -> None:
    pki = make_test_pki()
    assert ServerTLS(pki.server).alpns == (ALPN_CLIENT,)
    assert ServerTLS(pki.server, pinned_peers=frozenset({"a" * 64})).alpns == (
        ALPN_CLIENT,
        ALPN_FEDERATION,
    )
    with pytest.raises(ConfigError):
        ServerTLS(pki.server, alpns=("h3",))


def test_policy_decisions() -> None:
    pki = make_test_pki()
    server = ServerTLS(pki.server, federation_ca=make_ca().certificate_pem + pki.ca.certificate_pem)
    server.check_client_certificate(ALPN_CLIENT, [])  # user clients: no certificate asked
    server.check_client_certificate(ALPN_FEDERATION, [pki.client.certificate_der])
    for creds, kind in (
        (pki.other_ca_client, "unknown_ca"),
        (pki.expired_client, "certificate_expired"),
    ):
        with pytest.raises(CertificateRejected) as info:
            server.check_client_certificate(ALPN_FEDERATION, [creds.certificate_der])
        assert info.value.kind == kind
    with pytest.raises(CertificateRejected) as info:
        server.check_client_certificate(ALPN_FEDERATION, [])
    assert info.value.kind == "certificate_required"
