"""Challenge-response proof of a user's Ed25519 identity (sans-IO).

The node hands out a fresh nonce per connection; the client signs
``"qpc-auth-v1" || nonce || node_cert_fingerprint`` with its identity key (``Identity.sign``). The
certificate fingerprint binds the proof to this node (a malicious node cannot
replay it elsewhere); the nonce binds it to this connection and moment. A nonce
is single use and expires after ``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import MutableMapping
from typing import Any

import msgspec

from qpc_node import crypto
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


class _Pending(msgspec.Struct):
    nonce: bytes
    expires: float


_SLOT = "qpc.auth.challenge"


class ChallengeBook:
    """Issues and checks challenges kept in a per-connection ``slot`` (a dict).

    Keeping the pending nonce in the connection's own session state ties it to
    that connection and bounds memory by the number of connections.
    """

    def __init__(self, *, ttl: float = 60.0) -> None:
        self._ttl = ttl
        self.issued = 0
        self.verified = 0
        self.failed = 0

    def issue(self, slot: MutableMapping[str, Any], now: float) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        slot[_SLOT] = _Pending(nonce, now + self._ttl)
        self.issued += 1
        return nonce

    def verify(
        self,
        slot: MutableMapping[str, Any],
        public_key: bytes,
        signature: bytes,
        node_cert_fingerprint: bytes,
        now: float,
    ) -> bytes:
        """Return the proven fingerprint or raise AuthError. Consumes the nonce either way."""
        pending = slot.pop(_SLOT, None)
        try:
            if not isinstance(pending, _Pending):
                raise AuthError("no outstanding challenge on this connection")
            if now > pending.expires:
                raise AuthError("challenge expired")
            if len(public_key) != PUBKEY_LEN or len(signature) != SIG_LEN:
                raise AuthError("malformed public key or signature")
            try:
                # The MLS core's identity signatures are domain-separated; verify with it.
                crypto.verify(
                    public_key, auth_message(pending.nonce, node_cert_fingerprint), signature
                )
            except crypto.MlsError:
                raise AuthError("signature does not verify") from None
        except AuthError:
            self.failed += 1
            raise
        self.verified += 1
        return fingerprint_of(public_key)

    def statistics(self) -> ChallengeStatistics:
        return ChallengeStatistics(issued=self.issued, verified=self.verified, failed=self.failed)


class ChallengeStatistics(msgspec.Struct, frozen=True):
    """Auth.Challenge nonces issued; Auth.Prove outcomes (a snapshot)."""

    issued: int
    verified: int
    failed: int
