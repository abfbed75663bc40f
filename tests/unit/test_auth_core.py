import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_node.service.auth import AuthError, ChallengeBook, auth_message, fingerprint_of

NODE = b"\x42" * 32


def _keypair() -> tuple[Ed25519PrivateKey, bytes]:
    sk = Ed25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_valid_proof_gives_fingerprint_once() -> None:
    book = ChallengeBook()
    sk, pk = _keypair()
    nonce = book.issue("c1", now=0.0)
    sig = sk.sign(auth_message(nonce, NODE))
    assert book.verify("c1", pk, sig, NODE, now=1.0) == fingerprint_of(pk)
    with pytest.raises(AuthError):  # nonce is single use
        book.verify("c1", pk, sig, NODE, now=1.0)
    assert book.statistics()["verified"] == 1 and book.statistics()["failed"] == 1


def test_rejects_expired_other_conn_other_node_and_bad_sig() -> None:
    book = ChallengeBook(ttl=10)
    sk, pk = _keypair()
    n = book.issue("c1", now=0.0)
    with pytest.raises(AuthError, match="expired"):
        book.verify("c1", pk, sk.sign(auth_message(n, NODE)), NODE, now=11.0)
    n = book.issue("c1", now=0.0)
    with pytest.raises(AuthError):  # challenge is bound to its connection
        book.verify("c2", pk, sk.sign(auth_message(n, NODE)), NODE, now=1.0)
    n = book.issue("c1", now=0.0)
    with pytest.raises(AuthError):  # signed for another node
        book.verify("c1", pk, sk.sign(auth_message(n, b"\x00" * 32)), NODE, now=1.0)
    n = book.issue("c1", now=0.0)
    other, _ = _keypair()
    with pytest.raises(AuthError):
        book.verify("c1", pk, other.sign(auth_message(n, NODE)), NODE, now=1.0)
    n = book.issue("c1", now=0.0)
    with pytest.raises(AuthError, match="malformed"):
        book.verify("c1", pk[:5], b"x", NODE, now=1.0)


def test_pending_is_bounded() -> None:
    book = ChallengeBook(max_pending=100)
    for i in range(1000):
        book.issue(i, now=float(i))
    assert 0 < book.statistics()["pending"] <= 100
    assert book.statistics()["issued"] == 1000
