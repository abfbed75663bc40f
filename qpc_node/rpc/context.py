"""What a handler knows about the call it serves and the peer behind it."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
import trio

from qpc_node.errors import QpcError, StatusCode
from qpc_node.rpc.framing import DEFAULT_MAX_FRAME_SIZE


class PeerInfo(msgspec.Struct, frozen=True):
    """The transport's view of a connection, fixed when it was accepted.

    ``identity`` is what TLS proved (qpc_node.quic PeerIdentity: certificate
    fingerprint and names) or None for a client without a certificate.
    """

    connection_id: str
    remote_address: tuple[Any, ...] | None = None
    identity: Any = None
    alpn: str | None = None


class Session(msgspec.Struct):
    """Per-connection state that outlives one call.

    Empty when a connection opens; the auth layer fills ``user`` once the
    peer proved its key, and later calls on the same connection see it.
    ``data`` is for other layers' per-connection state (keyed by their name).
    """

    user: bytes | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class AnswerBytes(Protocol):
    """The call's share of the node's send budget, reserved *before* its answer exists.

    A handler whose answer can be large (Fetch: up to a frame of stored messages)
    reserves what it is about to read, so the bytes are bounded before they are
    materialized, not after; the server then keeps the reservation for the frame.
    """

    @property
    def frame_cap(self) -> int:
        """The largest answer the server can frame (what asking for more is pointless)."""
        ...

    def reserve(self, nbytes: int) -> int:
        """Hold up to ``nbytes`` in total; returns what is held (may be less, >= 0)."""
        ...

    def shrink(self, nbytes: int) -> None:
        """Hold at most ``nbytes`` from now on (give the rest back)."""
        ...


class UnbudgetedAnswer:
    """Grants everything: for contexts built outside an RpcServer (tests, tools)."""

    __slots__ = ()

    @property
    def frame_cap(self) -> int:
        return DEFAULT_MAX_FRAME_SIZE

    def reserve(self, nbytes: int) -> int:
        return nbytes

    def shrink(self, nbytes: int) -> None:
        return None


class AnswerOverBudget(QpcError):
    """Not even the smallest possible answer fits the send budget now (retriable).

    The server counts it as a send-budget refusal.
    """

    code = StatusCode.RESOURCE_EXHAUSTED


class CallContext(msgspec.Struct, frozen=True):
    """Passed to every handler next to its decoded request."""

    method: str
    call_id: int
    correlation_id: str
    deadline: float
    """trio.current_time() by which the answer must be sent."""
    peer: PeerInfo
    session: Session
    answer: AnswerBytes = msgspec.field(default_factory=UnbudgetedAnswer)
    """Where a handler reserves its answer's bytes before building it."""

    @property
    def peer_identity(self) -> Any:
        return self.peer.identity

    @property
    def remote_address(self) -> tuple[Any, ...] | None:
        return self.peer.remote_address

    def time_remaining(self) -> float:
        """Seconds left before the node answers DEADLINE_EXCEEDED for this call."""
        return max(0.0, self.deadline - trio.current_time())
