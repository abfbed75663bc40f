"""The seam between the Trio driver and a sans-IO QUIC implementation.

Everything backend-specific (aioquic's private hooks for client-certificate
verification, flow control and send backlog) lives behind these two protocols;
the driver, the streams and everything in ``rpc/`` only use them. aioquic is
implemented in :mod:`qpc_node.quic._aioquic`; qh3 could be a second one.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from qpc_node.quic.address import Address
from qpc_node.quic.admission import ResetTokens
from qpc_node.quic.events import QuicEvent
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.tls import ClientTLS, ServerTLS


class PacketHeader(msgspec.Struct, frozen=True):
    destination_cid: bytes
    is_initial: bool
    version_supported: bool
    version: int | None = None  # None: short header (1-RTT)
    source_cid: bytes = b""
    token: bytes = b""  # Initial only: a Retry token, if the client has one


class QuicCore(Protocol):
    """One connection's protocol state. Time is always passed in (``now``)."""

    @property
    def host_cid(self) -> bytes: ...

    @property
    def is_client(self) -> bool: ...

    def connect(self, addr: Address, now: float) -> None: ...

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> QuicEvent | None: ...

    def can_open_stream(self) -> bool:
        """True if the peer's MAX_STREAMS lets us open one more bidirectional stream."""
        ...

    def open_stream(self) -> int: ...

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...

    def send_backlog(self, stream_id: int) -> int:
        """Bytes of this stream held by the core (unsent plus unacknowledged)."""
        ...

    def stream_consumed(self, stream_id: int, nbytes: int) -> None:
        """The reader took ``nbytes``: the core may extend the receive windows."""
        ...

    def stream_released(self, stream_id: int) -> None:
        """We dropped the stream; everything it delivered counts as consumed."""
        ...

    def reset_stream(self, stream_id: int, error_code: int) -> None: ...

    def stop_stream(self, stream_id: int, error_code: int) -> None: ...

    def send_ping(self, uid: int) -> None: ...

    def close(self, error_code: int, reason: str) -> None: ...

    def peer_certificate_chain(self) -> list[bytes]:
        """The verified peer's certificate chain, leaf first, DER ([] if none)."""
        ...

    @property
    def receive_buffered(self) -> int:
        """Bytes delivered to us but not yet consumed by readers."""
        ...

    @property
    def peer_reset_token(self) -> bytes | None:
        """The stateless reset token of the CID we send to (None before the handshake)."""
        ...

    def stateless_reset_received(self) -> None:
        """The peer sent a stateless reset: end at once, sending nothing (RFC 9000 10.3.1)."""
        ...


class QuicBackend(Protocol):
    name: str

    def parse_header(self, data: bytes) -> PacketHeader | None:
        """Routing view of a datagram, or None if it is not QUIC we can route."""
        ...

    def initial_decrypts(self, data: bytes) -> bool:
        """The datagram starts with a client Initial that decrypts (stateless check)."""
        ...

    def retry_packet(self, header: PacketHeader, retry_scid: bytes, token: bytes) -> bytes: ...

    def invalid_token_close(self, header: PacketHeader) -> bytes: ...

    def new_cid(self) -> bytes:
        """A fresh random connection ID of the length this backend routes on."""
        ...

    def create_client(
        self, tls: ClientTLS, settings: QuicSettings, *, reset_tokens: ResetTokens | None = None
    ) -> QuicCore: ...

    def create_server(
        self,
        tls: ServerTLS,
        settings: QuicSettings,
        original_dcid: bytes,
        *,
        retry_source_cid: bytes | None = None,
        reset_tokens: ResetTokens | None = None,
    ) -> QuicCore:
        """``original_dcid``: the client's first DCID (from the token after a Retry)."""
        ...
