"""The Health method: answered before any authentication, reveals only liveness."""

from __future__ import annotations

from collections.abc import Callable

import trio

import qpc_node
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.wire.gen.qpc.v1 import health_pb2

HEALTH_METHOD = "qpc.v1.Health/Check"


class HealthService:
    """Reports SERVING while ``serving()`` is true (a draining node says NOT_SERVING).

    ``started`` is the trio.current_time() at which the node began serving; it
    defaults to when this object is made (must be inside trio.run).
    """

    def __init__(
        self,
        *,
        serving: Callable[[], bool] = lambda: True,
        started: float | None = None,
        version: str = qpc_node.__version__,
    ) -> None:
        self._serving = serving
        self._started = trio.current_time() if started is None else started
        self._version = version

    def register(self, methods: MethodTable) -> None:
        methods.register(
            HEALTH_METHOD,
            health_pb2.HealthRequest,
            health_pb2.HealthResponse,
            self.check,
            max_timeout=5.0,
        )

    async def check(
        self, request: health_pb2.HealthRequest, ctx: CallContext
    ) -> health_pb2.HealthResponse:
        status = (
            health_pb2.HealthResponse.SERVING
            if self._serving()
            else health_pb2.HealthResponse.NOT_SERVING
        )
        uptime_ms = max(0, int((trio.current_time() - self._started) * 1000))
        return health_pb2.HealthResponse(
            status=status, node_version=self._version, uptime_ms=uptime_ms
        )
