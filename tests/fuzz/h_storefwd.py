"""Store-and-forward receipts: the Federation/Receipt request parser and the
verdict every parsed receipt gets (qpc_node/storefwd/receipts.py).

Seeds are real signed receipts (one by the recipient's home, one by another
node), so mutants stay close to valid: flipped signature bits, swapped keys,
wrong lengths, odd timestamps, oversized batches.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_node.errors import RemoteProtocolError
from qpc_node.storefwd import receipts as rc
from qpc_node.wire.gen.qpc.v1 import federation_pb2
from tests.fuzz.registry import Invariant, pure

NOW = 1_800_000_000_000


def _key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz-receipt-%d" % i).digest())


KEYS = [_key(i) for i in range(2)]
PUBS = [k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for k in KEYS]
RECIPIENT = bytes(range(32))
HOME = hashlib.sha256(PUBS[0]).digest()


def _seeds() -> list[bytes]:
    good = rc.make_receipt(KEYS[0].sign, PUBS[0], bytes(16), RECIPIENT, NOW)
    other = rc.make_receipt(KEYS[1].sign, PUBS[1], bytes(range(16)), RECIPIENT, NOW + 1)
    return [
        federation_pb2.ReceiptRequest(receipts=[good.to_proto()]).SerializeToString(),
        federation_pb2.ReceiptRequest(
            receipts=[good.to_proto(), other.to_proto()]
        ).SerializeToString(),
        b"",
    ]


def _target(data: bytes) -> None:
    parsed = rc.parse_request(data)
    if len(parsed) > rc.MAX_RECEIPTS:
        raise Invariant("more receipts parsed than a request may hold")
    for r in parsed:
        if isinstance(r, RemoteProtocolError):
            continue
        verdict = rc.judge(r, lambda u: HOME if u == RECIPIENT else None)
        if verdict is rc.Verdict.OK and (r.home_node != HOME or not rc.signature_ok(r)):
            raise Invariant("a receipt not signed by the recipient's home was accepted")


pure(
    "storefwd.receipts",
    seeds=_seeds,
    target=_target,
    allowed=(RemoteProtocolError,),
)
