"""SQLite data layer: mailboxes, KeyPackage directory, audit trail, node state.

Services use :class:`AsyncStore` (every call runs on the store's worker thread);
tests and tools may use the synchronous :class:`Store` directly. See docs/storage.md.
"""

from qpc_node.store.async_store import AsyncStore, AsyncStoreStatistics
from qpc_node.store.backup import BackupInfo, Finalizer, verify_file
from qpc_node.store.errors import (
    BackupFailed,
    EnvelopeExpired,
    InvalidRecord,
    PayloadTooLarge,
    QuotaExceeded,
    SchemaTooNew,
    StoreClosed,
    StoreError,
)
from qpc_node.store.records import (
    AuditEvent,
    EnqueueResult,
    Envelope,
    FetchResult,
    KeyPackageCount,
    KeyPackageRecord,
    KeyPackageUpload,
    MailboxDepth,
    StoredAuditEvent,
    StoredMessage,
    StoreLimits,
    StoreStatistics,
    SweepResult,
)
from qpc_node.store.schema import SCHEMA_VERSION
from qpc_node.store.store import EnqueueBatch, EnqueueOutcome, Store

__all__ = [
    "SCHEMA_VERSION",
    "AsyncStore",
    "AsyncStoreStatistics",
    "AuditEvent",
    "BackupFailed",
    "BackupInfo",
    "EnqueueBatch",
    "EnqueueOutcome",
    "EnqueueResult",
    "Envelope",
    "EnvelopeExpired",
    "FetchResult",
    "Finalizer",
    "InvalidRecord",
    "KeyPackageCount",
    "KeyPackageRecord",
    "KeyPackageUpload",
    "MailboxDepth",
    "PayloadTooLarge",
    "QuotaExceeded",
    "SchemaTooNew",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreLimits",
    "StoreStatistics",
    "StoredAuditEvent",
    "StoredMessage",
    "SweepResult",
    "verify_file",
]
