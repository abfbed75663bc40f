"""Node/Stats: the /metrics numbers over RPC, for the REPL's ``/stats``.

Needs an authenticated session (and passes the rate limits like every call);
answers only aggregate counters: the registry holds no identities or addresses
(labels are method names, status codes and fixed reasons).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from qpc_node.ops.metrics import Sample
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.guard import Guard
from qpc_node.wire.gen.qpc.v1 import ops_pb2

STATS_METHOD = "qpc.v1.Node/Stats"

Snapshot = Callable[..., Awaitable[list[Sample]]]
"""``await snapshot(buckets=bool)``, e.g. ``NodeMetrics.snapshot``."""


def samples_to_proto(samples: Iterable[Sample]) -> ops_pb2.StatsResponse:
    resp = ops_pb2.StatsResponse()
    for s in samples:
        resp.samples.add(name=s.name, labels=dict(s.labels), value=s.value)
    return resp


def samples_from_proto(resp: ops_pb2.StatsResponse) -> list[Sample]:
    return [Sample(s.name, tuple(sorted(s.labels.items())), s.value) for s in resp.samples]


class StatsService:
    def __init__(self, snapshot: Snapshot, guard: Guard) -> None:
        self._snapshot = snapshot
        self._guard = guard

    def register(self, table: MethodTable) -> None:
        table.register(
            STATS_METHOD, ops_pb2.StatsRequest, ops_pb2.StatsResponse, self.stats, max_timeout=10.0
        )

    async def stats(self, request: ops_pb2.StatsRequest, ctx: CallContext) -> ops_pb2.StatsResponse:
        self._guard.check(ctx)  # authenticated session required
        return samples_to_proto(await self._snapshot(buckets=request.histogram_buckets))
