"""What a handler knows about the call it serves and the peer behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The transport's view of a connection, fixed when it was accepted.

    ``identity`` is what TLS proved (qpc_node.quic PeerIdentity: certificate
    fingerprint and names) or None for a client without a certificate.
    """

    connection_id: str
    remote_address: tuple[Any, ...] | None = None
    identity: Any = None
    alpn: str | None = None


@dataclass(slots=True)
class Session:
    """Per-connection state that outlives one call.

    Empty when a connection opens; the auth layer fills ``user`` once the
    peer proved its key, and later calls on the same connection see it.
    ``data`` is for other layers' per-connection state (keyed by their name).
    """

    user: bytes | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Passed to every handler next to its decoded request."""

    method: str
    call_id: int
    correlation_id: str
    deadline: float
    """trio.current_time() by which the answer must be sent."""
    peer: PeerInfo
    session: Session

    @property
    def peer_identity(self) -> Any:
        return self.peer.identity

    @property
    def remote_address(self) -> tuple[Any, ...] | None:
        return self.peer.remote_address

    def time_remaining(self) -> float:
        """Seconds left before the node answers DEADLINE_EXCEEDED for this call."""
        return max(0.0, self.deadline - trio.current_time())
