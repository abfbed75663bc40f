"""Node/Mesh: the node's peer table and node routes over RPC, for ``/mesh peers|routes``.

Needs an authenticated session (and passes the rate limits like every call).
Answers what any neighbour could see anyway (node ids, their QUIC addresses,
route metrics); no user identities, only the number of bindings held.
"""

from __future__ import annotations

from qpc_node.mesh.service import MeshService
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.guard import Guard
from qpc_node.wire.gen.qpc.v1 import ops_pb2

MESH_METHOD = "qpc.v1.Node/Mesh"


class MeshStatusService:
    def __init__(self, mesh: MeshService | None, guard: Guard) -> None:
        self._mesh = mesh
        self._guard = guard

    def register(self, table: MethodTable) -> None:
        table.register(MESH_METHOD, ops_pb2.MeshRequest, ops_pb2.MeshResponse, self.mesh)

    async def mesh(self, request: ops_pb2.MeshRequest, ctx: CallContext) -> ops_pb2.MeshResponse:
        self._guard.check(ctx)  # authenticated session required
        m = self._mesh
        if m is None:
            return ops_pb2.MeshResponse(on_mesh=False)
        resp = ops_pb2.MeshResponse(
            on_mesh=True, node_id=m.node_id, bindings=m.router.statistics().bindings
        )
        for p in m.peers.peers():
            resp.peers.add(
                node_id=p.node,
                address=str(p.addresses[0]) if p.addresses else "",
                addresses=[str(a) for a in p.addresses],
                state=p.state.value,
                srtt_ms=(p.srtt or 0.0) * 1000,
                failures=p.failures,
                sources=sorted(s.value for s in p.sources),
            )
        for r in m.router.routes(m.wall_ms()):
            resp.routes.add(
                destination=r.destination,
                next_hop=r.next_hop,
                hops=r.hops,
                seq=r.seq,
                expires_ms=r.expires_ms,
            )
        return resp
