from pathlib import Path

import pytest

from qpc_node.crypto import Identity
from qpc_node.service.auth import AuthError, ChallengeBook, auth_message, fingerprint_of

NODE = b"\x42" * 32


def _keypair(tmp: Path, name: str = "u") -> tuple[Identity, bytes]:
    ident = Identity.create(str(tmp / name), b"s" * 32)
    return ident, ident.public_key


def test_valid_proof_gives_fingerprint_once(tmp_path: Path) -> None:
    book = ChallengeBook()
    c1: dict[str, object] = {}
    sk, pk = _keypair(tmp_path)
    nonce = book.issue(c1, now=0.0)
    sig = sk.sign(auth_message(nonce, NODE))
    assert book.verify(c1, pk, sig, NODE, now=1.0) == fingerprint_of(pk)
    with pytest.raises(AuthError):  # nonce is single use
        book.verify(c1, pk, sig, NODE, now=1.0)
    assert book.statistics().verified == 1 and book.statistics().failed == 1
    assert c1 == {}


def test_rejects_expired_other_conn_other_node_and_bad_sig(tmp_path: Path) -> None:
    book = ChallengeBook(ttl=10)
    c1: dict[str, object] = {}
    sk, pk = _keypair(tmp_path)
    n = book.issue(c1, now=0.0)
    with pytest.raises(AuthError, match="expired"):
        book.verify(c1, pk, sk.sign(auth_message(n, NODE)), NODE, now=11.0)
    n = book.issue(c1, now=0.0)
    with pytest.raises(AuthError):  # challenge is bound to its connection
        book.verify({}, pk, sk.sign(auth_message(n, NODE)), NODE, now=1.0)
    n = book.issue(c1, now=0.0)
    with pytest.raises(AuthError):  # signed for another node
        book.verify(c1, pk, sk.sign(auth_message(n, b"\x00" * 32)), NODE, now=1.0)
    n = book.issue(c1, now=0.0)
    other, _ = _keypair(tmp_path, "o")
    with pytest.raises(AuthError):
        book.verify(c1, pk, other.sign(auth_message(n, NODE)), NODE, now=1.0)
    n = book.issue(c1, now=0.0)
    with pytest.raises(AuthError, match="malformed"):
        book.verify(c1, pk[:5], b"x", NODE, now=1.0)
