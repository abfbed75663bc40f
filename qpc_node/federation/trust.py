"""Whom a node federates with: pinned node ids (mesh mode) or a community CA (managed).

Both policies plug into the QUIC layer's TLS hooks (:mod:`qpc_node.quic.tls`):
:class:`FederationServerTLS` and :class:`FederationClientTLS` call the policy
from inside the handshake, so a refused peer gets a TLS alert and never a
stream. A peer is always named by its node id (:mod:`qpc_node.mesh.nodeid`),
so a mesh node's certificate must carry an Ed25519 key.

Mesh mode is trust on first use. The handshake hook cannot see the peer's
address (the server side of aioquic's TLS has none), so the decision is taken
in two steps with the same rules: the handshake refuses what is wrong whatever
the address (no certificate, not Ed25519, expired, a node id we refused, not
the node id we dialled for); :meth:`MeshTrust.admit`, right after the
handshake and before any call is served, adds the address rule -- a different
key answering at an address where a trusted node answered before is a
*changed key*: refused and logged loudly until :meth:`MeshTrust.trust`
accepts the new node id (``qpc trust FPR`` / ``/mesh trust FPR``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from qpc_node.errors import ConfigError, QpcError, StatusCode
from qpc_node.mesh.nodeid import NotANodeKey, node_id, public_key_of_certificate, short
from qpc_node.ops.log import get_logger
from qpc_node.quic.tls import (
    ALPN_CLIENT,
    ALPN_FEDERATION,
    CertificateRejected,
    ClientTLS,
    NodeCredentials,
    ServerTLS,
    _verify_chain,
)
from qpc_node.store.federation import PinRecord, TrustChange, TrustSnapshot

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily

log = get_logger("qpc.federation.trust")

WallClock = Callable[[], dt.datetime]


class KeyChanged(CertificateRejected):
    """A node we know answered with another key (or a refused key came back)."""

    def __init__(
        self, message: str, *, new_node_id: bytes, persist: tuple[TrustChange, ...] = ()
    ) -> None:
        super().__init__(message, kind="bad_certificate")
        self.new_node_id = new_node_id
        self.persist = persist
        """Pin changes the refusal made (the refused key, for ``pending()``) to save."""


class Admitted(msgspec.Struct, frozen=True):
    """A peer the policy accepted, and what that changed in the pins (to persist)."""

    node_id: bytes
    public_key: bytes
    changes: tuple[TrustChange, ...] = ()


class TrustPolicy(Protocol):
    """What the federation layer asks about a peer; both modes implement it."""

    @property
    def mode(self) -> str: ...

    def check_handshake(self, chain_der: Sequence[bytes], *, expected: bytes | None) -> bytes:
        """In the TLS handshake: raise CertificateRejected, or return the peer's node id."""
        ...

    def admit(
        self, chain_der: Sequence[bytes], *, address: str, expected: bytes | None, now_ms: int
    ) -> Admitted:
        """After the handshake, before any call: the full decision (raises CertificateRejected)."""
        ...


def _now(clock: WallClock | None) -> dt.datetime:
    return clock() if clock is not None else dt.datetime.now(dt.UTC)


def _leaf_key(chain_der: Sequence[bytes]) -> tuple[bytes, bytes]:
    """(raw Ed25519 key, node id) of the leaf, or the TLS refusal."""
    if not chain_der:
        raise CertificateRejected("peer certificate required", kind="certificate_required")
    try:
        key = public_key_of_certificate(chain_der[0])
    except NotANodeKey as exc:
        raise CertificateRejected(f"not a mesh node certificate: {exc}") from exc
    return key, node_id(key)


def _check_dates(der: bytes, now: dt.datetime) -> None:
    cert = x509.load_der_x509_certificate(der)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateRejected(
            "peer certificate is outside its validity period", kind="certificate_expired"
        )


MAX_REFUSED_SEEN = 1024
"""Bound on refused node ids remembered in memory only (a peer could mint new keys)."""


class AmbiguousNode(QpcError):
    """A fingerprint prefix matches more than one node id; the message lists them."""

    code = StatusCode.INVALID_ARGUMENT


class UnknownNode(QpcError):
    """A fingerprint prefix matches no node id this node knows."""

    code = StatusCode.NOT_FOUND


def resolve_node_prefix(text: str, known: Iterable[bytes]) -> bytes:
    """The node id ``text`` names: all 64 hex digits (known or not), or a unique hex
    prefix of a ``known`` id (``:``/spaces ignored, case-insensitive)."""
    digits = "".join(c for c in text.lower() if c not in ": ")
    if not digits or any(c not in "0123456789abcdef" for c in digits) or len(digits) > 64:
        raise QpcError(
            f"not a node fingerprint or a hex prefix of one: {text!r}",
            code=StatusCode.INVALID_ARGUMENT,
        )
    if len(digits) == 64:
        return bytes.fromhex(digits)
    matches = sorted({k for k in known if k.hex().startswith(digits)})
    if not matches:
        raise UnknownNode(f"no known node id starts with {digits}")
    if len(matches) > 1:
        raise AmbiguousNode(
            f"{digits} matches {len(matches)} nodes: " + ", ".join(m.hex() for m in matches)
        )
    return matches[0]


class MeshTrust:
    """Trust on first use of node ids, pinned in the store (see the module docstring).

    State lives in memory (the handshake hook is synchronous) and is loaded from
    and written back to the store by the caller: :meth:`admit` and :meth:`trust`
    return the :class:`TrustChange` list to persist (``store.federation.save_trust``)
    before the peer is served.
    """

    mode = "mesh"

    def __init__(
        self,
        snapshot: TrustSnapshot | None = None,
        *,
        clock: WallClock | None = None,
    ) -> None:
        self._pins: dict[bytes, PinRecord] = {}
        self._addresses: dict[str, bytes] = {}
        self._clock = clock
        self.refusals = 0
        # Node ids refused inside a handshake (dialled for another id): not in the
        # store (the handshake cannot write), but the operator may trust them by prefix.
        self._refused_seen: dict[bytes, None] = {}
        if snapshot is not None:
            self._pins = {p.node_id: p for p in snapshot.pins}
            self._addresses = dict(snapshot.addresses)

    # -- what the REPL / CLI show and do
    def pins(self) -> list[PinRecord]:
        return sorted(self._pins.values(), key=lambda p: p.node_id)

    def pending(self) -> list[PinRecord]:
        """Node ids refused for a changed key, waiting for an operator's trust()."""
        return [p for p in self.pins() if p.state == "refused"]

    def node_at(self, address: str) -> bytes | None:
        return self._addresses.get(address)

    def known_ids(self) -> list[bytes]:
        """Every node id an operator may name by prefix: pinned, refused, or seen refused."""
        return sorted(set(self._pins) | set(self._refused_seen))

    def trust(self, nid: bytes, now_ms: int) -> tuple[TrustChange, ...]:
        """Accept ``nid`` (its key) explicitly; the address it was refused at is rebound."""
        pin = self._pins.get(nid)
        changes: list[TrustChange] = []
        if pin is None:
            pin = PinRecord(nid, None, "trusted", "", now_ms, now_ms)
        else:
            pin = msgspec.structs.replace(pin, state="trusted", last_seen_ms=now_ms)
            if pin.address:
                self._addresses[pin.address] = nid
                changes.append(TrustChange(bind=(pin.address, nid)))
        self._pins[nid] = pin
        changes.insert(0, TrustChange(pin=pin))
        log.warning("federation: node trusted explicitly", extra={"node": nid.hex()})
        return tuple(changes)

    # -- TrustPolicy
    def check_handshake(self, chain_der: Sequence[bytes], *, expected: bytes | None) -> bytes:
        _, nid = _leaf_key(chain_der)
        _check_dates(chain_der[0], _now(self._clock))
        pin = self._pins.get(nid)
        if pin is not None and pin.state == "refused":
            self._refuse(f"node {short(nid)} is refused until trusted (changed key)", nid)
        if expected is not None and nid != expected and not self._trusted(nid):
            self._refuse(
                f"KEY CHANGED: dialled node {expected.hex()} but the peer is {nid.hex()}", nid
            )
        return nid

    def admit(
        self, chain_der: Sequence[bytes], *, address: str, expected: bytes | None, now_ms: int
    ) -> Admitted:
        nid = self.check_handshake(chain_der, expected=expected)
        key, _ = _leaf_key(chain_der)
        bound = self._addresses.get(address)
        if bound is not None and bound != nid and self._trusted(bound) and not self._trusted(nid):
            # The loud case: someone else's key where a node we pinned answered before.
            pin = PinRecord(nid, key, "refused", address, now_ms, now_ms)
            self._pins[nid] = pin
            self._refuse(
                f"KEY CHANGED at {address}: pinned node {bound.hex()}, now {nid.hex()}; "
                f"refused until `qpc trust {nid.hex()}`",
                nid,
                persist=(TrustChange(pin=pin),),
            )
        old = self._pins.get(nid)
        first = old.first_seen_ms if old is not None else now_ms
        pin = PinRecord(nid, key, "trusted", address, first, now_ms)
        self._pins[nid] = pin
        changes = [TrustChange(pin=pin)]
        if bound != nid:
            self._addresses[address] = nid
            changes.append(TrustChange(bind=(address, nid)))
        if old is None:
            log.info(
                "federation: new node pinned (trust on first use)",
                extra={"node": nid.hex(), "addr": address},
            )
        return Admitted(nid, key, tuple(changes))

    def _trusted(self, nid: bytes) -> bool:
        pin = self._pins.get(nid)
        return pin is not None and pin.state == "trusted"

    def _refuse(self, message: str, nid: bytes, *, persist: tuple[TrustChange, ...] = ()) -> None:
        self.refusals += 1
        if len(self._refused_seen) < MAX_REFUSED_SEEN:
            self._refused_seen[nid] = None
        log.error("federation: peer refused: " + message, extra={"node": nid.hex()})
        raise KeyChanged(message, new_node_id=nid, persist=persist)


class ManagedTrust:
    """A community CA: peers must present a chain to it, in date, with an Ed25519 leaf."""

    mode = "managed"

    def __init__(self, ca_pem: bytes) -> None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise ConfigError(f"federation CA is not a PEM certificate: {exc}") from exc
        self.ca_pem = ca_pem
        self.refusals = 0

    def check_handshake(self, chain_der: Sequence[bytes], *, expected: bytes | None) -> bytes:
        try:
            _, nid = _leaf_key(chain_der)
            # Either purpose: every node both dials and accepts (issue_certificate sets both).
            _verify_chain(chain_der, self.ca_pem, purpose=ExtendedKeyUsageOID.CLIENT_AUTH)
            _verify_chain(chain_der, self.ca_pem, purpose=ExtendedKeyUsageOID.SERVER_AUTH)
            if expected is not None and nid != expected:
                raise CertificateRejected(
                    f"dialled node {expected.hex()} but the peer is {nid.hex()}"
                )
        except CertificateRejected as exc:
            self.refusals += 1
            log.error(
                "federation: peer refused (managed mode): " + str(exc),
                extra={"kind": exc.kind, "node": _peer_id_hex(chain_der)},
            )
            raise
        return nid

    def admit(
        self, chain_der: Sequence[bytes], *, address: str, expected: bytes | None, now_ms: int
    ) -> Admitted:
        nid = self.check_handshake(chain_der, expected=expected)
        key, _ = _leaf_key(chain_der)
        return Admitted(nid, key)


def _peer_id_hex(chain_der: Sequence[bytes]) -> str:
    """For a log line: the refused peer's node id, or what kept it from having one."""
    try:
        return _leaf_key(chain_der)[1].hex()
    except CertificateRejected as exc:
        return f"({exc})"


def load_managed_credentials(
    cert_path: str, key_path: str, ca_pem: bytes, *, now: dt.datetime
) -> NodeCredentials:
    """The node's CA-issued pair for managed mode (``federation.cert``/``key``).

    The pair becomes the node's credentials for its whole socket (see
    :class:`~qpc_node.ops.config.FederationSection`): refused with a ConfigError
    naming the key when unreadable, when the key is not Ed25519 (no node id) or
    does not match the certificate, or when the certificate does not chain to
    ``federation.ca``. Outside its validity period it is loaded with an error in
    the log: peers refuse it, but the node's own users keep their service.
    """
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"federation.cert/key: {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"federation.cert/key: not PEM: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"federation.key: a mesh node key must be Ed25519, not {type(key).__name__}"
        )
    raw = serialization.PublicFormat.Raw
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, raw)
    leaf = certs[0]
    leaf_pub = leaf.public_key()
    if not isinstance(leaf_pub, ed25519.Ed25519PublicKey) or (
        leaf_pub.public_bytes(serialization.Encoding.Raw, raw) != pub
    ):
        raise ConfigError(f"federation.key does not match federation.cert ({cert_path})")
    pem = serialization.Encoding.PEM
    creds = NodeCredentials(
        leaf.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        b"".join(c.public_bytes(pem) for c in certs[1:]),
    )
    chain = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    try:
        _verify_chain(chain, ca_pem, purpose=ExtendedKeyUsageOID.SERVER_AUTH)
        _verify_chain(chain, ca_pem, purpose=ExtendedKeyUsageOID.CLIENT_AUTH)
    except CertificateRejected as exc:
        if exc.kind != "certificate_expired":
            raise ConfigError(f"federation.cert is not usable with federation.ca: {exc}") from None
        log.error(
            "federation: our own certificate is outside its validity period; "
            "every peer will refuse it until it is renewed",
            extra={
                "not_before": str(leaf.not_valid_before_utc),
                "not_after": str(leaf.not_valid_after_utc),
                "now": str(now),
            },
        )
    return creds


class TrustRefusalsCollector:
    """``qpc_federation_trust_refusals_total{mode}``: peers the trust policy refused
    (foreign CA, out of date, not Ed25519, changed key). Registered with the node's
    metrics while its federation runs (``/metrics`` and the REPL's ``/stats``)."""

    def __init__(self, policy: TrustPolicy) -> None:
        self._policy = policy

    def collect(self) -> Iterator[CounterMetricFamily]:
        # Imported here: a node with metrics off never loads prometheus_client (ops/metrics.py).
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "qpc_federation_trust_refusals",
            "Federation peers refused by the trust policy",
            labels=["mode"],
        )
        family.add_metric([self._policy.mode], float(getattr(self._policy, "refusals", 0)))
        yield family


class FederationServerTLS(ServerTLS):
    """The node socket's server side with federation on: ``qpc/1`` for clients as
    before, ``qpc-fed/1`` for peers the policy accepts (checked in the handshake)."""

    def __init__(
        self,
        credentials: NodeCredentials,
        policy: TrustPolicy,
        *,
        alpns: Iterable[str] = (ALPN_CLIENT, ALPN_FEDERATION),
    ) -> None:
        wanted = tuple(alpns)
        super().__init__(credentials, alpns=wanted)
        self.policy = policy
        self.alpns = wanted  # the base drops qpc-fed/1 without pins/CA: the policy is ours

    def check_client_certificate(self, alpn: str | None, chain_der: Sequence[bytes]) -> None:
        if not self.requires_client_certificate(alpn):
            return
        self.policy.check_handshake(chain_der, expected=None)


class FederationClientTLS(ClientTLS):
    """Dialling a peer over ``qpc-fed/1``: present our certificate, check the peer's
    with the policy (and, when we know it, that it is the node id we dialled for)."""

    def __init__(
        self,
        credentials: NodeCredentials,
        policy: TrustPolicy,
        *,
        expected: bytes | None = None,
    ) -> None:
        # Not ClientTLS.__init__: it insists on a certificate pin or CA; the policy is both.
        self.alpn = ALPN_FEDERATION
        self.pin = None
        self.ca = None
        self.credentials = credentials
        self.server_name = None
        self.policy = policy
        self.expected = expected

    def check_server_certificate(self, chain_der: Sequence[bytes]) -> None:
        self.policy.check_handshake(chain_der, expected=self.expected)
