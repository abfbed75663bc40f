"""ClientTLS pinned by mesh node id: the certificate's Ed25519 key must hash to it."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from qpc_node.errors import ConfigError
from qpc_node.mesh.nodeid import node_id_of_credentials
from qpc_node.quic import ALPN_CLIENT, ClientTLS
from qpc_node.quic.testing import make_test_pki
from qpc_node.quic.tls import CertificateRejected, _self_signed, fingerprint


def test_node_id_pin_accepts_the_node_and_refuses_another() -> None:
    pki = make_test_pki()
    nid = node_id_of_credentials(pki.server)
    tls = ClientTLS(ALPN_CLIENT, node_id=nid)
    tls.check_server_certificate([pki.server.certificate_der])
    with pytest.raises(CertificateRejected, match="node id"):
        tls.check_server_certificate([pki.client.certificate_der])


def test_node_id_pin_holds_across_a_reissued_certificate() -> None:
    """The id is the key's: a new self-signed certificate on the same key still
    matches, which a certificate-fingerprint pin refuses."""
    pki = make_test_pki()
    nid = node_id_of_credentials(pki.server)
    key = pki.server.private_key()
    reissued = _self_signed(key, "renewed", now=dt.datetime.now(dt.UTC), days=1, ca=False)
    der = reissued.public_bytes(serialization.Encoding.DER)
    assert der != pki.server.certificate_der
    ClientTLS(ALPN_CLIENT, node_id=nid).check_server_certificate([der])
    with pytest.raises(CertificateRejected):
        ClientTLS(
            ALPN_CLIENT, pin=fingerprint(pki.server.certificate_der)
        ).check_server_certificate([der])


def test_node_id_pin_refuses_non_ed25519_keys_garbage_and_bad_ids() -> None:
    p256 = make_test_pki(key_type="p256")
    tls = ClientTLS(ALPN_CLIENT, node_id=b"\x01" * 32)
    with pytest.raises(CertificateRejected):
        tls.check_server_certificate([p256.server.certificate_der])
    with pytest.raises(CertificateRejected):
        tls.check_server_certificate([b"not a certificate"])
    with pytest.raises(CertificateRejected):
        tls.check_server_certificate([])
    with pytest.raises(ConfigError):
        ClientTLS(ALPN_CLIENT, node_id=b"short")
