"""Delivery receipts (qpc_node/storefwd/receipts.py): signed by the recipient's home,
judged by every node on the way back; bad ones are typed verdicts, never crashes."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_node.errors import RemoteProtocolError
from qpc_node.storefwd import receipts as rc
from qpc_node.wire.gen.qpc.v1 import federation_pb2

NOW = 1_800_000_000_000
USER, OTHER = b"\x01" * 32, b"\x02" * 32
MSG = bytes(range(16))


def key(i: int) -> tuple[Ed25519PrivateKey, bytes, bytes]:
    k = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"receipt-test-%d" % i).digest())
    pub = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return k, pub, hashlib.sha256(pub).digest()


HOME_K, HOME_PUB, HOME = key(0)
RELAY_K, RELAY_PUB, RELAY = key(1)


def homes(user: bytes) -> bytes | None:
    return {USER: HOME}.get(user)


def test_the_homes_receipt_is_accepted_and_survives_the_wire() -> None:
    r = rc.make_receipt(HOME_K.sign, HOME_PUB, MSG, USER, NOW)
    assert r.home_node == HOME
    (back,) = rc.parse_request(
        federation_pb2.ReceiptRequest(receipts=[r.to_proto()]).SerializeToString()
    )
    assert back == r and rc.judge(back, homes) is rc.Verdict.OK


def test_forged_wrong_home_and_unknown_home_are_refused() -> None:
    good = rc.make_receipt(HOME_K.sign, HOME_PUB, MSG, USER, NOW)
    # A relay on the path signs with its own key: valid signature, not the home.
    assert rc.judge(rc.make_receipt(RELAY_K.sign, RELAY_PUB, MSG, USER, NOW), homes) is (
        rc.Verdict.WRONG_HOME
    )
    # ... or claims the home's key without its signature.
    forged = rc.Receipt(MSG, USER, HOME_PUB, NOW, RELAY_K.sign(rc.signed_bytes(MSG, USER, NOW)))
    assert rc.judge(forged, homes) is rc.Verdict.FORGED
    # Any field changed after signing breaks the signature.
    for changed in (
        rc.Receipt(bytes(16), USER, HOME_PUB, NOW, good.signature),
        rc.Receipt(MSG, OTHER, HOME_PUB, NOW, good.signature),
        rc.Receipt(MSG, USER, HOME_PUB, NOW + 1, good.signature),
    ):
        assert rc.judge(changed, homes) is rc.Verdict.FORGED
    # Home unknown here: not accepted (nothing purged on an unverifiable claim).
    other = rc.make_receipt(HOME_K.sign, HOME_PUB, MSG, OTHER, NOW)
    assert rc.judge(other, homes) is rc.Verdict.UNKNOWN_HOME
    # An invalid public key is a forged receipt, not a crash.
    bad_key = rc.Receipt(MSG, USER, b"\xff" * 32, NOW, good.signature)
    assert rc.judge(bad_key, homes) in (rc.Verdict.FORGED,)


@pytest.mark.parametrize(
    "field,value",
    [
        ("msg_id", b"\x00" * 15),
        ("recipient", b"\x00" * 33),
        ("home_key", b""),
        ("signature", b"\x00" * 63),
        ("delivered_ms", 0),
    ],
)
def test_malformed_receipts_are_typed_one_by_one(field: str, value: object) -> None:
    good = rc.make_receipt(HOME_K.sign, HOME_PUB, MSG, USER, NOW).to_proto()
    bad = federation_pb2.DeliveryReceipt()
    bad.CopyFrom(good)
    setattr(bad, field, value)
    got = rc.parse_receipts([good, bad])
    assert isinstance(got[0], rc.Receipt) and isinstance(got[1], RemoteProtocolError)


def test_oversized_or_undecodable_requests_are_refused_whole() -> None:
    r = rc.make_receipt(HOME_K.sign, HOME_PUB, MSG, USER, NOW).to_proto()
    with pytest.raises(RemoteProtocolError):
        rc.parse_receipts([r] * (rc.MAX_RECEIPTS + 1))
    with pytest.raises(RemoteProtocolError):
        rc.parse_request(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(RemoteProtocolError):
        rc.parse_request(b"\x00" * (rc.MAX_REQUEST_BYTES + 1))
