"""Events a QUIC core reports, in our own terms (frozen, backend-independent).

The Trio driver only ever sees these, so a second backend (qh3) plugs in by
translating its events, without touching the driver or anything above it.
"""

from __future__ import annotations

import msgspec


class HandshakeCompleted(msgspec.Struct, frozen=True):
    alpn: str | None


class HandshakeConfirmed(msgspec.Struct, frozen=True):
    """Both sides agree the handshake is done: for a client, the server accepted us."""


class StreamDataReceived(msgspec.Struct, frozen=True):
    stream_id: int
    data: bytes
    end_stream: bool


class StreamReset(msgspec.Struct, frozen=True):
    """The peer sent RESET_STREAM: it will send nothing more on this stream."""

    stream_id: int
    error_code: int


class StopSendingReceived(msgspec.Struct, frozen=True):
    """The peer sent STOP_SENDING: our sending direction is reset."""

    stream_id: int
    error_code: int


class ConnectionIdIssued(msgspec.Struct, frozen=True):
    connection_id: bytes


class ConnectionIdRetired(msgspec.Struct, frozen=True):
    connection_id: bytes


class ConnectionClosing(msgspec.Struct, frozen=True):
    """CONNECTION_CLOSE sent or received: no more application data, fail fast.

    The core still lingers (closing/draining period, RFC 9000 10.2) until
    :class:`ConnectionTerminated`.
    """

    error_code: int
    frame_type: int | None
    reason: str


class ConnectionTerminated(msgspec.Struct, frozen=True):
    error_code: int
    frame_type: int | None
    reason: str


class PingAcknowledged(msgspec.Struct, frozen=True):
    uid: int


QuicEvent = (
    HandshakeCompleted
    | HandshakeConfirmed
    | StreamDataReceived
    | StreamReset
    | StopSendingReceived
    | ConnectionIdIssued
    | ConnectionIdRetired
    | ConnectionClosing
    | ConnectionTerminated
    | PingAcknowledged
)
