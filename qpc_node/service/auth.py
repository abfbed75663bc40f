"""Challenge-response proof of a user's Ed25519 identity (sans-IO).

The node hands out a fresh nonce per connection; the client signs
``"qpc-auth-v1" || nonce || node_cert_fingerprint`` with its identity key. The
certificate fingerprint binds the proof to this node (a malicious node cannot
replay it elsewhere); the nonce binds it to this connection and moment. A nonce
is single use and expires after ``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from qpc_node.errors import QpcError, StatusCode

AUTH_DOMAIN = b"qpc-auth-v1"
NONCE_LEN = 32
PUBKEY_LEN = 32
SIG_LEN = 64


class AuthError(QpcError):
    code = StatusCode.UNAUTHENTICATED


def auth_message(nonce: bytes, node_cert_fingerprint: bytes) -> bytes:
    """The exact bytes a client signs (both sides build them here)."""
    return AUTH_DOMAIN + nonce + node_cert_fingerprint


def fingerprint_of(public_key: bytes) -> bytes:
    """A user's address: SHA-256 of the raw Ed25519 public key."""
    return hashlib.sha256(public_key).digest()


@dataclass(slots=True)
class _Pending:
    nonce: bytes
    expires: float


class ChallengeBook:
    """Outstanding challenges, one per connection key, bounded in number."""

    def __init__(self, *, ttl: float = 60.0, max_pending: int = 65536) -> None:
        self._ttl = ttl
        self._max = max_pending
        self._pending: dict[object, _Pending] = {}
        self.issued = 0
        self.verified = 0
        self.failed = 0

    def issue(self, conn: object, now: float) -> bytes:
        if len(self._pending) >= self._max:
            self._sweep(now)
            if len(self._pending) >= self._max:
                # Oldest first: dicts keep insertion order.
                self._pending.pop(next(iter(self._pending)))
        nonce = secrets.token_bytes(NONCE_LEN)
        self._pending.pop(conn, None)
        self._pending[conn] = _Pending(nonce, now + self._ttl)
        self.issued += 1
        return nonce

    def verify(
        self,
        conn: object,
        public_key: bytes,
        signature: bytes,
        node_cert_fingerprint: bytes,
        now: float,
    ) -> bytes:
        """Return the proven fingerprint or raise AuthError. Consumes the nonce either way."""
        pending = self._pending.pop(conn, None)
        try:
            if pending is None:
                raise AuthError("no outstanding challenge on this connection")
            if now > pending.expires:
                raise AuthError("challenge expired")
            if len(public_key) != PUBKEY_LEN or len(signature) != SIG_LEN:
                raise AuthError("malformed public key or signature")
            try:
                Ed25519PublicKey.from_public_bytes(public_key).verify(
                    signature, auth_message(pending.nonce, node_cert_fingerprint)
                )
            except (InvalidSignature, ValueError):
                raise AuthError("signature does not verify") from None
        except AuthError:
            self.failed += 1
            raise
        self.verified += 1
        return fingerprint_of(public_key)

    def forget(self, conn: object) -> None:
        self._pending.pop(conn, None)

    def _sweep(self, now: float) -> None:
        for k in [k for k, p in self._pending.items() if now > p.expires]:
            del self._pending[k]

    def statistics(self) -> dict[str, int]:
        return {
            "pending": len(self._pending),
            "issued": self.issued,
            "verified": self.verified,
            "failed": self.failed,
        }
