"""Broadcast channel messages on the wire: parse and the checks a relay can make.

A relay cannot read a channel message (the content, the sender and its signature
are inside the AEAD, see proto/qpc/v1/channel.proto); what it can check, it checks
here, once, for every copy that reaches it -- from a local client (Channel/Publish)
or from a neighbour (gossip): lengths, size, expiry (not past, not further ahead than
policy allows), hop limit. Each refusal is its own typed error (a RemoteProtocolError:
the sender is at fault) with a ``reason`` the callers count by.
"""

from __future__ import annotations

import msgspec
from google.protobuf.message import DecodeError

from qpc_node.errors import RemoteProtocolError, StatusCode
from qpc_node.wire.envelope import MSG_ID_LEN
from qpc_node.wire.gen.qpc.v1 import channel_pb2

CHANNEL_ID_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
MIN_SEALED = NONCE_LEN + TAG_LEN
"""A nonce and a tag around an empty plaintext: anything shorter cannot be a seal."""
DEFAULT_MAX_SEALED = 16 * 1024
"""Sealed bytes of one message at most (a chat line with room to spare, padded)."""
DEFAULT_MAX_EXPIRY_AHEAD_MS = 7 * 24 * 3600 * 1000
"""How far ahead a sender may set the expiry (the seeds' retention: 7 days)."""
DEFAULT_HOP_LIMIT = 32
MAX_HOP_LIMIT = 64
"""Channel messages spread over the whole mesh, not along one route: a city mesh of a
thousand routers has a diameter of tens of hops (the simulated 1,000-node graph: 40,
radius 21), so a broadcast needs far more than a DM's 16. Each hop forwards the copy at
most once (seen-filter), so the limit bounds reach, not cost."""
_FIELD_OVERHEAD = 96
"""Bytes of a ChannelMessage besides ``sealed`` at most (ids, varints, tags)."""


class ChannelMessageError(RemoteProtocolError):
    """A channel message a node must not store or forward; ``reason`` names the check."""

    reason = "malformed"


class ChannelMalformed(ChannelMessageError):
    reason = "malformed"


class ChannelTooLarge(ChannelMessageError):
    reason = "too_large"
    code = StatusCode.PAYLOAD_TOO_LARGE


class ChannelExpired(ChannelMessageError):
    reason = "expired"


class ChannelExpiryTooFar(ChannelMessageError):
    reason = "expiry_too_far"


class ChannelHopLimit(ChannelMessageError):
    reason = "hop_limit"


REASONS = ("malformed", "too_large", "expired", "expiry_too_far", "hop_limit")
"""Every ``reason`` a ChannelMessageError carries (counters are kept per reason)."""


class ChannelPolicy(msgspec.Struct, frozen=True):
    """What this node accepts: the relay checks' limits (config ``channels.*``)."""

    max_sealed: int = DEFAULT_MAX_SEALED
    max_expiry_ahead_ms: int = DEFAULT_MAX_EXPIRY_AHEAD_MS
    max_hop_limit: int = MAX_HOP_LIMIT


class ChannelMessage(msgspec.Struct, frozen=True):
    channel_id: bytes
    msg_id: bytes
    expiry_ms: int
    hop_limit: int
    sealed: bytes

    def to_proto(self) -> channel_pb2.ChannelMessage:
        return channel_pb2.ChannelMessage(
            channel_id=self.channel_id,
            msg_id=self.msg_id,
            expiry_ms=self.expiry_ms,
            hop_limit=self.hop_limit,
            sealed=self.sealed,
        )

    def encode(self) -> bytes:
        return self.to_proto().SerializeToString(deterministic=True)

    def expired(self, now_ms: int) -> bool:
        return now_ms >= self.expiry_ms

    def forwarded(self) -> ChannelMessage:
        """The copy a relay passes on: one hop less (callers check ``hop_limit > 0``)."""
        if self.hop_limit <= 0:
            raise ChannelHopLimit("hop_limit 0: not forwarded")
        return ChannelMessage(
            self.channel_id, self.msg_id, self.expiry_ms, self.hop_limit - 1, self.sealed
        )


def check_channel_message(
    msg: ChannelMessage, now_ms: int, policy: ChannelPolicy
) -> ChannelMessage:
    """Raise the typed error of the first check ``msg`` fails; return it when none does."""
    if len(msg.channel_id) != CHANNEL_ID_LEN:
        raise ChannelMalformed(
            f"channel_id must be {CHANNEL_ID_LEN} bytes, got {len(msg.channel_id)}"
        )
    if len(msg.msg_id) != MSG_ID_LEN:
        raise ChannelMalformed(f"msg_id must be {MSG_ID_LEN} bytes, got {len(msg.msg_id)}")
    if len(msg.sealed) > policy.max_sealed:
        raise ChannelTooLarge(f"sealed part of {len(msg.sealed)} bytes exceeds {policy.max_sealed}")
    if len(msg.sealed) < MIN_SEALED:
        raise ChannelMalformed(f"sealed part of {len(msg.sealed)} bytes is shorter than a seal")
    if msg.expiry_ms <= 0:
        raise ChannelMalformed("expiry_ms must be set")
    if msg.expired(now_ms):
        raise ChannelExpired(f"expired {now_ms - msg.expiry_ms} ms ago")
    if msg.expiry_ms - now_ms > policy.max_expiry_ahead_ms:
        raise ChannelExpiryTooFar(
            f"expiry {(msg.expiry_ms - now_ms) // 1000} s ahead exceeds the cap of"
            f" {policy.max_expiry_ahead_ms // 1000} s"
        )
    if msg.hop_limit > policy.max_hop_limit:
        raise ChannelHopLimit(f"hop_limit {msg.hop_limit} above the maximum {policy.max_hop_limit}")
    return msg


def from_proto(
    pb: channel_pb2.ChannelMessage, now_ms: int, policy: ChannelPolicy
) -> ChannelMessage:
    msg = ChannelMessage(
        bytes(pb.channel_id), bytes(pb.msg_id), pb.expiry_ms, pb.hop_limit, bytes(pb.sealed)
    )
    return check_channel_message(msg, now_ms, policy)


def decode_channel_message(
    data: bytes, now_ms: int, policy: ChannelPolicy | None = None
) -> ChannelMessage:
    """Parse a ChannelMessage from a peer and run every relay check on it.

    Any defect is a ChannelMessageError subclass (typed by what failed); the size is
    checked before protobuf parses anything.
    """
    policy = policy or ChannelPolicy()
    if len(data) > policy.max_sealed + _FIELD_OVERHEAD:
        raise ChannelTooLarge(f"channel message of {len(data)} bytes exceeds the cap")
    pb = channel_pb2.ChannelMessage()
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise ChannelMalformed(f"malformed channel message: {exc}") from None
    return from_proto(pb, now_ms, policy)
