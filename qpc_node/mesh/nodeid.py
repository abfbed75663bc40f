"""Node ids: who a mesh node is, independent of its address or certificate.

A node id is the SHA-256 of the node's raw 32-byte Ed25519 public key -- the key
in its key dir (``node.key``) that is also the key of its TLS certificate. The
certificate may be reissued (new validity, a community CA's signature) without
changing the id; a new key is a new node. The hex form is the mesh's "node
fingerprint" (mDNS TXT ``node``, pins, route tables). It is deliberately *not*
the certificate-DER fingerprint clients pin with ``pin=``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qpc_node.errors import ConfigError, RemoteProtocolError, StatusCode
from qpc_node.quic.tls import NodeCredentials

NODE_ID_SIZE = 32
PUBLIC_KEY_SIZE = 32


class NotANodeKey(RemoteProtocolError):
    """A certificate whose key is not Ed25519 cannot name a mesh node."""

    code = StatusCode.UNAUTHENTICATED


def node_id(public_key_raw: bytes) -> bytes:
    """SHA-256 of the raw Ed25519 public key (32 bytes in, 32 bytes out)."""
    if len(public_key_raw) != PUBLIC_KEY_SIZE:
        raise NotANodeKey(f"an Ed25519 public key is 32 bytes, got {len(public_key_raw)}")
    return hashlib.sha256(public_key_raw).digest()


def node_id_hex(nid: bytes) -> str:
    return nid.hex()


def short(nid: bytes) -> str:
    """Eight hex digits: for logs and tables, never for a trust decision."""
    return nid[:4].hex()


def parse_node_id(value: str | bytes) -> bytes:
    """A node id from its 64-digit hex form (``:`` separators allowed) or 32 raw bytes."""
    if isinstance(value, bytes):
        if len(value) != NODE_ID_SIZE:
            raise ConfigError(f"a node id is {NODE_ID_SIZE} bytes, got {len(value)}")
        return value
    text = value.replace(":", "").strip().lower()
    if len(text) != 2 * NODE_ID_SIZE or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"not a node fingerprint (64 hex digits): {value!r}")
    return bytes.fromhex(text)


def _raw_ed25519(key: object) -> bytes:
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise NotANodeKey(f"mesh nodes need an Ed25519 key, not {type(key).__name__}")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_of_certificate(der: bytes) -> bytes:
    """The raw Ed25519 public key in a DER certificate (typed error otherwise)."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise NotANodeKey(f"unparseable certificate: {exc}") from exc
    return _raw_ed25519(cert.public_key())


def node_id_of_certificate(der: bytes) -> bytes:
    return node_id(public_key_of_certificate(der))


def node_id_of_peer(chain_der: Sequence[bytes]) -> bytes:
    """The node id a TLS peer proved (its leaf certificate's key)."""
    if not chain_der:
        raise NotANodeKey("peer presented no certificate")
    return node_id_of_certificate(chain_der[0])


def node_id_of_credentials(credentials: NodeCredentials) -> bytes:
    """Our own node id; a node whose key is not Ed25519 cannot join the mesh."""
    try:
        return node_id(_raw_ed25519(credentials.certificate.public_key()))
    except NotANodeKey as exc:
        raise ConfigError(f"node key cannot be used on the mesh: {exc}") from exc
