"""Typed errors of the data layer, each carrying the wire code the service returns.

The service layer maps these straight onto RPC statuses, so each class says who is at
fault: a caller that sent too much (quota, payload size) or an invalid record is a
``LocalProtocolError`` from the store's point of view; a database file we cannot use is
a ``StoreError`` the operator has to look at.
"""

from __future__ import annotations

from qpc_node.errors import LocalProtocolError, QpcError, StatusCode


class StoreError(QpcError):
    """The database itself cannot serve (closed, corrupt, wrong version)."""

    code = StatusCode.INTERNAL


class StoreClosed(StoreError):
    """A call arrived after ``close()``; the node is shutting down."""

    code = StatusCode.UNAVAILABLE


class SchemaTooNew(StoreError):
    """The file was written by a newer qpc; refusing avoids silently corrupting it."""

    code = StatusCode.FAILED_PRECONDITION

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than this qpc supports ({supported})"
        )
        self.found = found
        self.supported = supported


class BackupFailed(StoreError):
    """The backup copy did not pass ``PRAGMA integrity_check``; it was removed."""


class InvalidRecord(LocalProtocolError):
    """A field is malformed (wrong id length, empty payload, expired envelope...)."""

    code = StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"item {index}: {message}")
        self.index = index


class PayloadTooLarge(LocalProtocolError):
    """One payload exceeds the per-message cap; the whole batch is refused."""

    code = StatusCode.PAYLOAD_TOO_LARGE

    def __init__(self, size: int, limit: int, *, index: int) -> None:
        super().__init__(f"item {index}: payload of {size} bytes exceeds the cap of {limit}")
        self.size = size
        self.limit = limit
        self.index = index


class QuotaExceeded(LocalProtocolError):
    """Accepting the batch would overflow a quota; nothing of it was stored.

    ``reason`` names the ceiling (a :class:`~qpc_node.store.fairness.Reason` value:
    the whole mailbox, or the pool / per-sender share of senders the recipient has not
    accepted); it is what the refusal metrics count by.
    """

    code = StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self, what: str, *, limit: int, requested: int, reason: str = "mailbox_full"
    ) -> None:
        super().__init__(f"{what} quota exceeded: limit {limit}, would reach {requested}")
        self.what = what
        self.limit = limit
        self.requested = requested
        self.reason = reason


class EnvelopeExpired(InvalidRecord):
    """The envelope's expiry is not in the future: no node stores or delivers it."""
