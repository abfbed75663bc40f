"""Records crossing the store boundary: plain, immutable, cheap to copy between threads.

They are msgspec Structs (frozen) rather than protobuf messages so the store does not
depend on the wire layer; the service converts ``qpc.v1.Envelope`` to :class:`Envelope`
field by field.
"""

from __future__ import annotations

from typing import Any

import msgspec

MSG_ID_LEN = 16
FINGERPRINT_LEN = 32
MIB = 1024 * 1024
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


class Envelope(msgspec.Struct, frozen=True):
    """What the node routes and stores; mirrors ``proto/qpc/v1/envelope.proto``."""

    msg_id: bytes
    recipient: bytes
    expiry_ms: int
    hop_limit: int
    ciphertext: bytes


class EnqueueResult(msgspec.Struct, frozen=True):
    """Outcome of one envelope of a batch.

    ``duplicate`` is true when the msg_id was already known for this recipient (a
    retry); ``seq`` is then the sequence number of the first copy, so a retrying
    client learns the same seq it would have got the first time.
    """

    msg_id: bytes
    seq: int
    duplicate: bool
    held: bool = False
    """Relayed: no route to the recipient's home yet, held on this node until one
    appears (store-and-forward)."""


class StoredMessage(msgspec.Struct, frozen=True):
    """A queued envelope with its per-recipient sequence number."""

    seq: int
    envelope: Envelope
    enqueued_ms: int


class FetchResult(msgspec.Struct, frozen=True):
    """A page of a mailbox; ``more`` says whether a later fetch would return more."""

    messages: tuple[StoredMessage, ...]
    more: bool
    last_seq: int  # highest seq ever assigned in this mailbox (0 = none yet)


class MailboxDepth(msgspec.Struct, frozen=True):
    messages: int
    bytes: int
    last_seq: int
    # Of these, stored from senders the recipient had not accepted (the stranger pool).
    stranger_messages: int = 0
    stranger_bytes: int = 0


class KeyPackageUpload(msgspec.Struct, frozen=True):
    """An opaque KeyPackage; the service has validated the bytes and the suite."""

    data: bytes
    ciphersuite: int
    last_resort: bool = False
    not_after_ms: int | None = None  # None: now + the configured TTL (24 h)


class KeyPackageRecord(msgspec.Struct, frozen=True):
    identity: bytes
    data: bytes
    ciphersuite: int
    last_resort: bool
    not_after_ms: int
    uploaded_ms: int


class KeyPackageCount(msgspec.Struct, frozen=True):
    normal: int
    last_resort: int


class AuditEvent(msgspec.Struct, frozen=True):
    """One audit line. ``subject`` must already be redacted by the caller (a short
    fingerprint, never a key); ``detail`` is stored as JSON."""

    ts_ms: int
    kind: str
    subject: str = ""
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class StoredAuditEvent(msgspec.Struct, frozen=True):
    id: int
    event: AuditEvent


class StoreLimits(msgspec.Struct, frozen=True):
    """Policy numbers (see docs/storage.md for where the defaults come from)."""

    max_payload_bytes: int = 5 * MIB
    mailbox_max_messages: int = 10_000
    mailbox_max_bytes: int = 64 * MIB
    message_retention_ms: int = 7 * DAY_MS
    keypackage_ttl_ms: int = 24 * HOUR_MS
    keypackage_max_per_identity: int = 100
    keypackage_max_bytes: int = 64 * 1024
    # Fairness (store/fairness.py): senders the recipient has not accepted share this
    # percentage of the mailbox, split into this many per-sender shares; an acceptance
    # (the recipient sent to that peer) lapses after this long without a new send.
    stranger_pool_percent: int = 10
    stranger_shares: int = 10
    accepted_ttl_ms: int = 90 * DAY_MS


class StoreStatistics(msgspec.Struct, frozen=True):
    schema_version: int
    transactions: int
    enqueued: int
    duplicates: int
    fetched: int
    acked: int
    expired_messages: int
    quota_rejections: int  # envelope batches refused by any quota (all reasons below)
    keypackages_uploaded: int
    keypackages_served: int
    refused_stranger_pool: int = 0  # of those: the stranger pool was full
    refused_stranger_share: int = 0  # of those: the stranger had used its own share


class SweepResult(msgspec.Struct, frozen=True):
    """What one retention sweep removed; ``more`` asks the caller to sweep again soon
    (sweeps are bounded so one call never holds the write lock for long)."""

    expired: int  # unacked messages (or unused KeyPackages) dropped at expiry
    tombstones: int  # acked-message markers whose idempotency window closed
    more: bool


RowRef = tuple[int, bytes]
"""``(id, msg_id)`` of a custody (or held) row read earlier. Row ids are SQLite rowids,
which a later insert reuses once the row is gone (a receipt may purge it while its
batch is still in flight), so every statement acting on a row read before an await
matches the msg_id too: a stale id then matches nothing instead of someone else's
envelope."""
