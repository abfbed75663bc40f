"""Delivery receipts: the home node's signed DELIVERED(msg_id), sans-IO.

The recipient's home node signs a :class:`Receipt` when it stores a relayed
envelope in the recipient's mailbox (federation.proto, ``DeliveryReceipt``).
It travels back hop by hop along the trail (the node each hop got the envelope
from, kept in its seen row, and carriers a spray copy went to, ``relay_trail``); each node that accepts it
purges its held and queued replicas and keeps a tombstone until the envelope's
expiry (:func:`qpc_node.store.held.apply_receipt`).

A node accepts a receipt only if (:func:`judge`):

- its fields have the right lengths (else ``MALFORMED``);
- the signature verifies under ``home_key`` (else ``FORGED``);
- ``SHA-256(home_key)`` is the recipient's home in this node's routing bindings
  (else ``WRONG_HOME``). If this node knows no home for the recipient it cannot
  tell a relay on the path (which saw msg_id and recipient, and has a key) from
  the home: the receipt is dropped as ``UNKNOWN_HOME`` and counted, nothing is
  purged and no tombstone is kept -- purging on an unverifiable claim would let
  any relay suppress delivery. The replicas then live until delivery elsewhere
  or expiry; the home's mailbox de-duplicates on msg_id, so delivery stays
  exactly once either way.

Receipts for msg_ids this node never handled are dropped and counted by the
caller (``UNKNOWN_MSG``): the store tells.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from enum import Enum

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.message import DecodeError

from qpc_node.errors import RemoteProtocolError
from qpc_node.wire.gen.qpc.v1 import federation_pb2

DOMAIN = b"qpc-receipt-v1"
MSG_ID_LEN = 16
FINGERPRINT_LEN = 32
KEY_LEN = 32
SIG_LEN = 64
MAX_RECEIPTS = 256
"""Receipts per Federation/Receipt call."""
MAX_REQUEST_BYTES = MAX_RECEIPTS * 256
"""A request above this is refused whole (each receipt is about 160 bytes)."""


class Verdict(Enum):
    OK = "ok"
    MALFORMED = "malformed"
    FORGED = "forged"
    WRONG_HOME = "wrong_home"
    UNKNOWN_HOME = "unknown_home"


class Receipt(msgspec.Struct, frozen=True):
    msg_id: bytes
    recipient: bytes
    home_key: bytes
    delivered_ms: int
    signature: bytes

    @property
    def home_node(self) -> bytes:
        """The signer's node id (SHA-256 of its Ed25519 key, as node ids are)."""
        return hashlib.sha256(self.home_key).digest()

    def to_proto(self) -> federation_pb2.DeliveryReceipt:
        return federation_pb2.DeliveryReceipt(
            msg_id=self.msg_id,
            recipient=self.recipient,
            home_key=self.home_key,
            delivered_ms=self.delivered_ms,
            signature=self.signature,
        )


def signed_bytes(msg_id: bytes, recipient: bytes, delivered_ms: int) -> bytes:
    return DOMAIN + msg_id + recipient + delivered_ms.to_bytes(8, "big")


def make_receipt(
    sign: Callable[[bytes], bytes],
    home_key: bytes,
    msg_id: bytes,
    recipient: bytes,
    delivered_ms: int,
) -> Receipt:
    """The home node's receipt (``sign``: its Ed25519 key's raw signature)."""
    sig = sign(signed_bytes(msg_id, recipient, delivered_ms))
    return Receipt(msg_id, recipient, home_key, delivered_ms, sig)


def from_proto(pb: federation_pb2.DeliveryReceipt) -> Receipt:
    """Lengths checked; a bad one is a RemoteProtocolError (MALFORMED)."""
    for name, value, want in (
        ("msg_id", pb.msg_id, MSG_ID_LEN),
        ("recipient", pb.recipient, FINGERPRINT_LEN),
        ("home_key", pb.home_key, KEY_LEN),
        ("signature", pb.signature, SIG_LEN),
    ):
        if len(value) != want:
            raise RemoteProtocolError(f"receipt {name} must be {want} bytes, got {len(value)}")
    if pb.delivered_ms == 0 or pb.delivered_ms >= 1 << 63:
        raise RemoteProtocolError("receipt delivered_ms out of range")
    return Receipt(pb.msg_id, pb.recipient, pb.home_key, pb.delivered_ms, pb.signature)


def parse_request(data: bytes) -> list[Receipt | RemoteProtocolError]:
    """A ReceiptRequest's bytes: each receipt parsed alone (a bad one does not
    spoil the rest); a malformed or oversized request raises RemoteProtocolError."""
    if len(data) > MAX_REQUEST_BYTES:
        raise RemoteProtocolError(f"receipt request over {MAX_REQUEST_BYTES} bytes")
    req = federation_pb2.ReceiptRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as exc:  # the sender's fault
        raise RemoteProtocolError(f"malformed receipt request: {exc}") from None
    return parse_receipts(req.receipts)


def parse_receipts(
    pbs: Sequence[federation_pb2.DeliveryReceipt],
) -> list[Receipt | RemoteProtocolError]:
    if len(pbs) > MAX_RECEIPTS:
        raise RemoteProtocolError(f"more than {MAX_RECEIPTS} receipts in one call")
    out: list[Receipt | RemoteProtocolError] = []
    for pb in pbs:
        try:
            out.append(from_proto(pb))
        except RemoteProtocolError as exc:
            out.append(exc)
    return out


def signature_ok(r: Receipt) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(r.home_key).verify(
            r.signature, signed_bytes(r.msg_id, r.recipient, r.delivered_ms)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def judge(r: Receipt, home_of: Callable[[bytes], bytes | None]) -> Verdict:
    """Accept ``r``? ``home_of(recipient)``: the recipient's home node id in this
    node's routing bindings, None if unknown (see the module docstring)."""
    if not signature_ok(r):
        return Verdict.FORGED
    home = home_of(r.recipient)
    if home is None:
        return Verdict.UNKNOWN_HOME
    if home != r.home_node:
        return Verdict.WRONG_HOME
    return Verdict.OK
