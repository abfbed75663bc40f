"""Transport errors, typed by fault as in h11 (see :mod:`qpc_node.errors`).

They also subclass :class:`trio.BrokenResourceError`, so generic Trio stream
code (``StapledStream``, ``SSLStream`` users...) sees the usual "stream broken"
exception while our callers can match on the precise type and code.
"""

from __future__ import annotations

import trio

from qpc_node.errors import QpcError, RemoteProtocolError, StatusCode


class ConnectionClosed(QpcError, trio.BrokenResourceError):
    """The QUIC connection is gone (closed by either side, idle timeout, shutdown).

    ``error_code`` is the QUIC CONNECTION_CLOSE code (transport or application),
    ``reason`` the peer's or our reason phrase, ``by_peer`` who closed it.
    """

    code = StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, error_code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code
        self.reason = reason


class HandshakeError(ConnectionClosed):
    """connect() failed before the server confirmed the handshake (TLS refusal, timeout)."""


class StreamReset(RemoteProtocolError, trio.BrokenResourceError):
    """The peer aborted this stream (RESET_STREAM, or STOP_SENDING for our direction)."""

    code = StatusCode.ABORTED

    def __init__(self, stream_id: int, error_code: int, *, direction: str = "receive") -> None:
        super().__init__(f"stream {stream_id} reset by peer ({direction}), code {error_code}")
        self.stream_id = stream_id
        self.error_code = error_code
