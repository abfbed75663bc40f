"""Envelope encode/decode with validation, and ciphertext padding.

Nodes route on envelope headers only. Everything a peer sends us is checked
here once, so the layers above handle well-formed values or a typed error.
"""

from __future__ import annotations

import msgspec
from google.protobuf.message import DecodeError

from qpc_node.errors import LocalProtocolError, RemoteProtocolError, StatusCode
from qpc_node.wire.gen.qpc.v1 import envelope_pb2

MSG_ID_LEN = 16
FINGERPRINT_LEN = 32
MAX_HOP_LIMIT = 16
DEFAULT_HOP_LIMIT = 8
#: Payload cap (seeds: 5 MB). Padded ciphertext above this is refused.
MAX_CIPHERTEXT = 5 * 1024 * 1024
PAD_BUCKET = 256
_LEN_PREFIX = 4


class Envelope(msgspec.Struct, frozen=True):
    msg_id: bytes
    recipient: bytes
    expiry_ms: int
    hop_limit: int
    ciphertext: bytes

    def validate(self, *, remote: bool = False) -> None:
        """Raise a typed error if a field is out of range.

        ``remote`` picks who is at fault: a peer's bad envelope is a
        RemoteProtocolError, our own a LocalProtocolError.
        """
        err = RemoteProtocolError if remote else LocalProtocolError
        if len(self.msg_id) != MSG_ID_LEN:
            raise err(f"msg_id must be {MSG_ID_LEN} bytes, got {len(self.msg_id)}")
        if len(self.recipient) != FINGERPRINT_LEN:
            raise err(f"recipient must be {FINGERPRINT_LEN} bytes, got {len(self.recipient)}")
        if self.expiry_ms <= 0:
            raise err("expiry_ms must be set")
        if not 0 <= self.hop_limit <= MAX_HOP_LIMIT:
            raise err(f"hop_limit must be in 0..{MAX_HOP_LIMIT}")
        if len(self.ciphertext) > MAX_CIPHERTEXT:
            raise err(
                f"ciphertext of {len(self.ciphertext)} bytes exceeds {MAX_CIPHERTEXT}",
                code=StatusCode.PAYLOAD_TOO_LARGE,
            )
        if not self.ciphertext:
            raise err("ciphertext is empty")

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expiry_ms

    def to_proto(self) -> envelope_pb2.Envelope:
        return envelope_pb2.Envelope(
            msg_id=self.msg_id,
            recipient=self.recipient,
            expiry_ms=self.expiry_ms,
            hop_limit=self.hop_limit,
            ciphertext=self.ciphertext,
        )

    @classmethod
    def from_proto(cls, pb: envelope_pb2.Envelope, *, remote: bool = True) -> Envelope:
        env = cls(pb.msg_id, pb.recipient, pb.expiry_ms, pb.hop_limit, pb.ciphertext)
        env.validate(remote=remote)
        return env

    def encode(self) -> bytes:
        self.validate()
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Parse bytes from a peer; any defect is a RemoteProtocolError."""
        if len(data) > MAX_CIPHERTEXT + 1024:
            raise RemoteProtocolError("envelope too large", code=StatusCode.PAYLOAD_TOO_LARGE)
        pb = envelope_pb2.Envelope()
        try:
            pb.ParseFromString(data)
        except DecodeError as exc:
            raise RemoteProtocolError(f"malformed envelope: {exc}") from None
        return cls.from_proto(pb)


def pad(plaintext: bytes, bucket: int = PAD_BUCKET) -> bytes:
    """Length-prefix and zero-fill to a multiple of ``bucket``.

    Nodes see sizes; bucketing hides the exact length of what is inside.
    """
    if bucket <= _LEN_PREFIX:
        raise LocalProtocolError("bucket too small")
    n = len(plaintext)
    if n >= 1 << 32:
        raise LocalProtocolError("payload too large to pad")
    total = _LEN_PREFIX + n
    padded_len = -(-total // bucket) * bucket
    return n.to_bytes(_LEN_PREFIX, "big") + plaintext + bytes(padded_len - total)


def unpad(padded: bytes) -> bytes:
    """Inverse of :func:`pad`; a malformed buffer is the sender's fault."""
    if len(padded) < _LEN_PREFIX:
        raise RemoteProtocolError("padded payload shorter than its length prefix")
    n = int.from_bytes(padded[:_LEN_PREFIX], "big")
    end = _LEN_PREFIX + n
    if end > len(padded):
        raise RemoteProtocolError("padded payload length prefix exceeds buffer")
    if any(padded[end:]):
        raise RemoteProtocolError("padding bytes are not zero")
    return padded[_LEN_PREFIX:end]
