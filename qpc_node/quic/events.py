"""Events a QUIC core reports, in our own terms (frozen, backend-independent).

The Trio driver only ever sees these, so a second backend (qh3) plugs in by
translating its events, without touching the driver or anything above it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    alpn: str | None


@dataclass(frozen=True, slots=True)
class HandshakeConfirmed:
    """Both sides agree the handshake is done: for a client, the server accepted us."""


@dataclass(frozen=True, slots=True)
class StreamDataReceived:
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer sent RESET_STREAM: it will send nothing more on this stream."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class StopSendingReceived:
    """The peer sent STOP_SENDING: our sending direction is reset."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionIdIssued:
    connection_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionIdRetired:
    connection_id: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosing:
    """CONNECTION_CLOSE sent or received: no more application data, fail fast.

    The core still lingers (closing/draining period, RFC 9000 10.2) until
    :class:`ConnectionTerminated`.
    """

    error_code: int
    frame_type: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    error_code: int
    frame_type: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
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
