"""Node/Mesh: the node's peer table and node routes over RPC, for ``/mesh peers|routes``;
Node/MeshTrust: accept a node's changed federation key (``/mesh trust``, ``qpc trust``).

Both need an authenticated session (and pass the rate limits like every call).
Node/Mesh answers what any neighbour could see anyway (node ids, their QUIC
addresses, route metrics); no user identities, only the number of bindings held.
Besides, the node's mDNS state: the interface names it uses (they are in its
announcements too) and why discovery is off, if it is (an OS error text such as
"interface not up" or "address in use": no paths, keys or user data).
Node/MeshTrust changes whom the node federates with: only the node's operator
may, so it is answered only on a connection from a loopback address (the
operator's shell on the router, or the laptop user whose ``qpc`` runs the
node); a community user connecting over the mesh gets PERMISSION_DENIED
(docs/threat-model.md).
"""

from __future__ import annotations

from qpc_node.errors import QpcError, StatusCode
from qpc_node.federation.trust import MeshTrust, resolve_node_prefix
from qpc_node.mesh.service import MeshService
from qpc_node.ops.config import is_loopback_host
from qpc_node.ops.log import get_logger
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.guard import Auditor, Guard
from qpc_node.service.guard import short as short_user
from qpc_node.store.records import AuditEvent
from qpc_node.wire.gen.qpc.v1 import ops_pb2

MESH_METHOD = "qpc.v1.Node/Mesh"
MESH_TRUST_METHOD = "qpc.v1.Node/MeshTrust"

log = get_logger("qpc.mesh.trust")


class NotTheOperator(QpcError):
    """A trust change asked for over a non-loopback connection."""

    code = StatusCode.PERMISSION_DENIED


class MeshStatusService:
    def __init__(
        self, mesh: MeshService | None, guard: Guard, audit: Auditor | None = None
    ) -> None:
        self._mesh = mesh
        self._guard = guard
        self._audit = audit
        """Trust changes and refused attempts go to the audit trail (who, which node)."""

    def _record(self, kind: str, subject: str, detail: dict[str, str]) -> None:
        if self._audit is not None:
            self._audit(AuditEvent(self._guard.wall_ms(), kind, subject, detail))

    def register(self, table: MethodTable) -> None:
        table.register(MESH_METHOD, ops_pb2.MeshRequest, ops_pb2.MeshResponse, self.mesh)
        table.register(
            MESH_TRUST_METHOD, ops_pb2.MeshTrustRequest, ops_pb2.MeshTrustResponse, self.trust
        )

    async def trust(
        self, request: ops_pb2.MeshTrustRequest, ctx: CallContext
    ) -> ops_pb2.MeshTrustResponse:
        user = self._guard.check(ctx)  # authenticated session required
        addr = ctx.remote_address
        host = str(addr[0]) if addr else ""
        if not is_loopback_host(host):
            log.warning(
                "mesh: trust change refused: not from loopback", extra={"addr": host or "?"}
            )
            self._record("federation.trust_denied", host or "?", {"user": short_user(user)})
            raise NotTheOperator(
                "only the node's operator may trust a node key: run `qpc trust` or "
                "/mesh trust on the node's own machine (loopback)"
            )
        m = self._mesh
        fed = m.federation if m is not None else None
        if m is None or fed is None:
            raise QpcError("this node is not on a mesh", code=StatusCode.FAILED_PRECONDITION)
        policy = fed.policy
        if not isinstance(policy, MeshTrust):
            raise QpcError(
                f"{policy.mode} mode trusts the community CA, not node ids",
                code=StatusCode.FAILED_PRECONDITION,
            )
        known = [*policy.known_ids(), *(p.node for p in m.peers.peers())]
        nid = resolve_node_prefix(request.fingerprint, known)
        before = next((p for p in policy.pins() if p.node_id == nid), None)
        await fed.trust(nid)
        self._record("federation.trust", short_user(user), {"node": nid.hex()})
        after = next((p for p in policy.pins() if p.node_id == nid), None)
        address = after.address if after is not None else ""
        if address:
            m.redial(nid, address)
        return ops_pb2.MeshTrustResponse(
            node_id=nid,
            was_refused=before is not None and before.state == "refused",
            address=address,
        )

    async def mesh(self, request: ops_pb2.MeshRequest, ctx: CallContext) -> ops_pb2.MeshResponse:
        self._guard.check(ctx)  # authenticated session required
        m = self._mesh
        if m is None:
            return ops_pb2.MeshResponse(on_mesh=False)
        resp = ops_pb2.MeshResponse(
            on_mesh=True, node_id=m.node_id, bindings=m.router.statistics().bindings
        )
        if m.discovery is not None:
            d = m.discovery.statistics()
            # those it listens on; before a start succeeded, those it was told to use
            chosen = d.interfaces or m.discovery.config.interfaces or ()
            resp.discovery.CopyFrom(
                ops_pb2.MeshDiscovery(
                    running=d.running,
                    interfaces=list(chosen),
                    peers=d.peers,
                    start_failures=d.start_failures,
                    last_error=d.last_error,
                    announced=d.announced,
                )
            )
        now_ms = m.wall_ms()
        homed = m.router.users_homed(now_ms)
        routes = m.router.routes(now_ms)
        hops = {r.destination: r.hops for r in routes}
        for p in m.peers.peers():
            resp.peers.add(
                node_id=p.node,
                address=str(p.addresses[0]) if p.addresses else "",
                addresses=[str(a) for a in p.addresses],
                state=p.state.value,
                srtt_ms=(p.srtt or 0.0) * 1000,
                failures=p.failures,
                sources=sorted(s.value for s in p.sources),
                hops=hops.get(p.node, 0),
                users=homed[p.node],
            )
        for r in routes:
            resp.routes.add(
                destination=r.destination,
                next_hop=r.next_hop,
                hops=r.hops,
                seq=r.seq,
                expires_ms=r.expires_ms,
                users=homed[r.destination],
            )
        return resp
