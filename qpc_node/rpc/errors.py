"""The one error a caller of the RPC client sees."""

from __future__ import annotations

from qpc_node.errors import QpcError, StatusCode


class RpcError(QpcError):
    """A call ended with a non-OK status (from the node, or decided locally).

    ``code`` is the wire status; ``code.retriable`` says whether trying again
    can help. ``attempts`` counts the attempts the client made.
    """

    def __init__(
        self, code: StatusCode, message: str, *, call_id: int = 0, attempts: int = 1
    ) -> None:
        super().__init__(message, code=code)
        self.call_id = call_id
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.message!r}, attempts={self.attempts})"
