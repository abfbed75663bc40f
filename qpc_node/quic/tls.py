"""TLS policy for the node's one QUIC socket: who may talk to us, and whom we trust.

Kept apart from the QUIC backend so the policy (ALPNs, pins, CA checks, what
identity a handler sees) is the same whichever QUIC core drives the handshake.
The backend calls :meth:`ServerTLS.check_client_certificate` and
:meth:`ClientTLS.check_server_certificate` from inside the handshake, so a
refusal becomes a TLS alert before any application data flows.

TLS 1.3 is the only version the QUIC core speaks (RFC 9001); ALPN is mandatory.

Also holds the small CA toolkit (:func:`make_ca`, :func:`issue_certificate`) an
operator of a community CA needs and the tests use to mint certificates.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import msgspec
from aioquic import tls as _aioquic_tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qpc_node.errors import ConfigError, LocalProtocolError, RemoteProtocolError, StatusCode

ALPN_CLIENT = "qpc/1"
ALPN_FEDERATION = "qpc-fed/1"
KNOWN_ALPNS = (ALPN_CLIENT, ALPN_FEDERATION)

KeyType = Literal["ed25519", "p256"]
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
RejectKind = Literal["bad_certificate", "certificate_expired", "certificate_required", "unknown_ca"]

CERT_FILE = "node.crt"
KEY_FILE = "node.key"


class CertificateRejected(RemoteProtocolError):
    """The peer's certificate does not satisfy our policy; ``kind`` names the TLS alert."""

    code = StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, *, kind: RejectKind = "bad_certificate") -> None:
        super().__init__(message)
        self.kind: RejectKind = kind


def fingerprint(der: bytes) -> str:
    """Certificate fingerprint as pinned everywhere: hex SHA-256 of the DER encoding."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(value: str) -> str:
    """Accept ``AB:CD:..`` or ``abcd..``; pins are compared lowercase without separators."""
    fp = value.replace(":", "").strip().lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ConfigError(f"not a sha256 certificate fingerprint: {value!r}")
    return fp


class PeerIdentity(msgspec.Struct, frozen=True):
    """What a handler may rely on about a verified peer (never the raw TLS object)."""

    cert_fingerprint: str
    subject: str
    san_names: tuple[str, ...] = ()

    @classmethod
    def from_der(cls, der: bytes) -> PeerIdentity:
        cert = x509.load_der_x509_certificate(der)
        return cls(fingerprint(der), cert.subject.rfc4514_string(), _san_names(cert))


def _san_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    names: list[str] = []
    names += san.get_values_for_type(x509.DNSName)
    names += san.get_values_for_type(x509.UniformResourceIdentifier)
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(names)


# --------------------------------------------------------------------------- credentials


class NodeCredentials(msgspec.Struct, frozen=True):
    """A certificate (optionally with intermediates) and its private key, PEM-encoded."""

    certificate_pem: bytes
    private_key_pem: bytes
    chain_pem: bytes = b""

    def __repr__(self) -> str:  # never the private key
        return f"NodeCredentials({len(self.certificate_pem)} B certificate, {len(self.chain_pem)} B chain)"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate_der)

    @property
    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem) if self.chain_pem else []

    def private_key(self) -> PrivateKey:
        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"unsupported node key type {type(key).__name__}")
        return key


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise LocalProtocolError(f"unknown key type {key_type!r}")


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _utcnow(now: dt.datetime | None) -> dt.datetime:
    # Certificates are about wall-clock time; callers (and tests) may inject it.
    return now if now is not None else dt.datetime.now(dt.UTC)


def _san(
    dns_names: Iterable[str], uris: Iterable[str], ip_addresses: Iterable[str]
) -> x509.SubjectAlternativeName | None:
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    general += [x509.UniformResourceIdentifier(u) for u in uris]
    general += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    return x509.SubjectAlternativeName(general) if general else None


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _self_signed(
    key: PrivateKey,
    common_name: str,
    *,
    now: dt.datetime,
    days: int,
    ca: bool,
    san: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, _sign_hash(key))


class CertificateAuthority(msgspec.Struct, frozen=True):
    """A community (federation) CA: its certificate is what nodes configure as trust."""

    certificate_pem: bytes
    private_key_pem: bytes

    def __repr__(self) -> str:  # never the private key
        return f"CertificateAuthority({len(self.certificate_pem)} B certificate)"


def make_ca(
    common_name: str = "qpc community CA",
    *,
    key_type: KeyType = "p256",
    days: int = 3650,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    key = _new_key(key_type)
    cert = _self_signed(key, common_name, now=_utcnow(now), days=days, ca=True)
    return CertificateAuthority(_cert_pem(cert), _key_pem(key))


def issue_certificate(
    ca: CertificateAuthority,
    common_name: str,
    *,
    key_type: KeyType = "ed25519",
    dns_names: Sequence[str] = (),
    uris: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> NodeCredentials:
    """Issue a node certificate (both server and client auth: nodes are both)."""
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    ca_key = serialization.load_pem_private_key(ca.private_key_pem, password=None)
    if not isinstance(ca_key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError("CA key must be Ed25519 or ECDSA")
    t = _utcnow(now)
    key = _new_key(key_type)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or t - dt.timedelta(minutes=5))
        .not_valid_after(not_after or t + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    san = _san(dns_names, uris, ip_addresses)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, _sign_hash(ca_key))
    return NodeCredentials(_cert_pem(cert), _key_pem(key))


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write-then-rename so a crash never leaves a half-written key or certificate."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with contextlib.ExitStack() as on_error:
        on_error.callback(Path(tmp).unlink, missing_ok=True)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        on_error.pop_all()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create_node_credentials(
    directory: str | os.PathLike[str],
    *,
    key_type: KeyType = "ed25519",
    common_name: str = "qpc-node",
    days: int = 3650,
    now: dt.datetime | None = None,
) -> NodeCredentials:
    """Load ``node.crt``/``node.key`` from ``directory``, or make a self-signed pair.

    An operator may drop a CA-issued pair (cert plus intermediates in ``node.crt``)
    in place; it is loaded as is. One file without the other is a configuration
    error, never silently replaced: the fingerprint is what peers have pinned.
    """
    d = Path(directory)
    cert_path, key_path = d / CERT_FILE, d / KEY_FILE
    if cert_path.exists() or key_path.exists():
        if not (cert_path.exists() and key_path.exists()):
            raise ConfigError(f"{d}: found only one of {CERT_FILE}/{KEY_FILE}")
        return _load_credentials(cert_path, key_path)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _new_key(key_type)
    cert = _self_signed(key, common_name, now=_utcnow(now), days=days, ca=False)
    creds = NodeCredentials(_cert_pem(cert), _key_pem(key))
    _atomic_write(key_path, creds.private_key_pem, 0o600)
    # 0600 as well: the key dir is private (0700, its files 0600: ops/lockfile.py), and a
    # 0644 certificate made every fresh node warn that it had to fix its own file.
    _atomic_write(cert_path, creds.certificate_pem, 0o600)
    return creds


def _load_credentials(cert_path: Path, key_path: Path) -> NodeCredentials:
    certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    creds = NodeCredentials(
        _cert_pem(certs[0]),
        key_path.read_bytes(),
        b"".join(_cert_pem(c) for c in certs[1:]),
    )
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    key_pub = creds.private_key().public_key().public_bytes(enc, pub)
    if key_pub != certs[0].public_key().public_bytes(enc, pub):
        raise ConfigError(f"{key_path} does not match {cert_path}")
    return creds


# --------------------------------------------------------------------------- policy


def _verify_chain(
    chain_der: Sequence[bytes], ca_pem: bytes, *, purpose: x509.ObjectIdentifier
) -> None:
    """Chain + validity dates against ``ca_pem``, then the EKU (if the cert has one)."""
    certs = [x509.load_der_x509_certificate(d) for d in chain_der]
    try:
        # aioquic's public helper: X509Store chain check and not-before/after.
        _aioquic_tls.verify_certificate(certificate=certs[0], chain=certs[1:], cadata=ca_pem)
    except _aioquic_tls.AlertCertificateExpired as exc:
        raise CertificateRejected(str(exc), kind="certificate_expired") from exc
    except _aioquic_tls.Alert as exc:
        raise CertificateRejected(f"chain not trusted: {exc}", kind="unknown_ca") from exc
    try:
        eku = certs[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if purpose not in eku:
        raise CertificateRejected("certificate lacks the required extended key usage")


class ServerTLS:
    """Server side of the node socket: our certificate and who may federate with us.

    Plain user clients (``qpc/1``) are not asked for a certificate (they prove
    their key inside the protocol). Nodes (``qpc-fed/1``) must present one that
    chains to ``federation_ca`` (managed mode) or whose fingerprint is in
    ``pinned_peers`` (mesh mode); either suffices if both are configured. With
    neither configured, ``qpc-fed/1`` is simply not offered, so it is refused.
    """

    def __init__(
        self,
        credentials: NodeCredentials,
        *,
        federation_ca: bytes | None = None,
        pinned_peers: frozenset[str] | None = None,
        alpns: Sequence[str] = KNOWN_ALPNS,
    ) -> None:
        unknown = [a for a in alpns if a not in KNOWN_ALPNS]
        if unknown or not alpns:
            raise ConfigError(f"alpns must be a non-empty subset of {KNOWN_ALPNS}: {alpns!r}")
        self.credentials = credentials
        self.federation_ca = federation_ca
        self.pinned_peers = frozenset(normalize_fingerprint(p) for p in pinned_peers or ())
        has_trust = federation_ca is not None or bool(self.pinned_peers)
        self.alpns: tuple[str, ...] = tuple(a for a in alpns if a != ALPN_FEDERATION or has_trust)

    def requires_client_certificate(self, alpn: str | None) -> bool:
        return alpn == ALPN_FEDERATION

    def check_client_certificate(self, alpn: str | None, chain_der: Sequence[bytes]) -> None:
        """Raise :class:`CertificateRejected` unless the client may use ``alpn``."""
        if not self.requires_client_certificate(alpn):
            return
        if not chain_der:
            raise CertificateRejected("client certificate required", kind="certificate_required")
        if fingerprint(chain_der[0]) in self.pinned_peers:
            return
        if self.federation_ca is None:
            raise CertificateRejected("peer fingerprint is not pinned")
        _verify_chain(chain_der, self.federation_ca, purpose=ExtendedKeyUsageOID.CLIENT_AUTH)


class ClientTLS:
    """Client side: which ALPN we speak and how we authenticate the node we dial.

    ``pin`` (hex SHA-256 of the node certificate) is the mesh default; ``ca``
    verifies the chain (and ``server_name`` against the SAN when given).
    ``node_id`` (32 bytes) pins a mesh node by its key, as the mesh names it: the
    certificate's Ed25519 public key must hash to it (``mesh/nodeid.py``), so a
    node learned from another node's peer list is trusted without knowing its
    certificate, and keeps that trust across a reissued certificate. Every pin
    and the CA given must hold. ``credentials`` are presented when the server
    asks (``qpc-fed/1``).
    """

    def __init__(
        self,
        alpn: str,
        *,
        pin: str | None = None,
        ca: bytes | None = None,
        credentials: NodeCredentials | None = None,
        server_name: str | None = None,
        node_id: bytes | None = None,
    ) -> None:
        if pin is None and ca is None and node_id is None:
            raise ConfigError("ClientTLS needs a pin or a CA: refusing to trust any server")
        if node_id is not None and len(node_id) != 32:
            raise ConfigError(f"a node id is 32 bytes, got {len(node_id)}")
        self.alpn = alpn
        self.pin = normalize_fingerprint(pin) if pin is not None else None
        self.ca = ca
        self.credentials = credentials
        self.server_name = server_name
        self.node_id = node_id

    def check_server_certificate(self, chain_der: Sequence[bytes]) -> None:
        if not chain_der:
            raise CertificateRejected("server sent no certificate")
        if self.pin is not None and fingerprint(chain_der[0]) != self.pin:
            raise CertificateRejected("server certificate does not match the pinned fingerprint")
        if self.node_id is not None and _node_id_of(chain_der[0]) != self.node_id:
            raise CertificateRejected("server key does not match the pinned node id")
        if self.ca is not None:
            _verify_chain(chain_der, self.ca, purpose=ExtendedKeyUsageOID.SERVER_AUTH)
            if self.server_name is not None:
                self._check_name(x509.load_der_x509_certificate(chain_der[0]))

    def _check_name(self, cert: x509.Certificate) -> None:
        if self.server_name not in _san_names(cert):
            raise CertificateRejected(f"certificate is not valid for {self.server_name!r}")


def _node_id_of(der: bytes) -> bytes | None:
    """SHA-256 of the certificate's raw Ed25519 key (the mesh node id); None when the
    certificate does not parse or its key is not Ed25519 (no node id matches it).

    The same rule as ``mesh.nodeid.node_id_of_certificate``, which imports this
    module (so it cannot be imported here)."""
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return None
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()
