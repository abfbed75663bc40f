"""Errors typed by who is at fault, each carrying a wire status code.

As in h11: ``LocalProtocolError`` means *we* (our caller) misused an API or sent
something invalid; ``RemoteProtocolError`` means the peer violated the protocol.
A remote violation closes that stream or connection with its code and never
takes the node down.
"""

from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    """Wire status codes (mirrored in proto/qpc/v1/rpc.proto ``Status``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16
    UNSUPPORTED_VERSION = 17
    PAYLOAD_TOO_LARGE = 18

    @property
    def retriable(self) -> bool:
        """Codes a client may retry with backoff (the call had no effect or is idempotent)."""
        return self in _RETRIABLE


_RETRIABLE = frozenset(
    {
        StatusCode.UNAVAILABLE,
        StatusCode.DEADLINE_EXCEEDED,
        StatusCode.RESOURCE_EXHAUSTED,
        StatusCode.ABORTED,
    }
)


class QpcError(Exception):
    """Base of every error this package raises on purpose."""

    code: StatusCode = StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class LocalProtocolError(QpcError):
    """We (or our caller) did something the protocol or API forbids."""

    code = StatusCode.INVALID_ARGUMENT


class RemoteProtocolError(QpcError):
    """The peer sent something the protocol forbids (bad frame, version, size...)."""

    code = StatusCode.INVALID_ARGUMENT


class ConfigError(QpcError):
    """A configuration value is invalid; the message names the key."""

    code = StatusCode.FAILED_PRECONDITION
