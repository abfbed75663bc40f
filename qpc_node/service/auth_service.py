"""Auth.Challenge / Auth.Prove: bind a connection's session to a user identity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from qpc_node.errors import RemoteProtocolError
from qpc_node.mesh.routing import HomeBinding, Outcome
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.auth import AuthError, ChallengeBook
from qpc_node.service.guard import Auditor, Guard, short
from qpc_node.store.records import AuditEvent
from qpc_node.wire.gen.qpc.v1 import service_pb2


class AuthService:
    def __init__(
        self,
        guard: Guard,
        audit: Auditor,
        *,
        node_cert_fingerprint: bytes,
        on_authenticated: Callable[[bytes], Awaitable[None]],
        mesh_node_id: bytes = b"",
        on_home: Callable[[HomeBinding], Outcome] | None = None,
    ) -> None:
        """``mesh_node_id``/``on_home``: on a mesh, the challenge names the node and a
        client's signed home binding goes to ``on_home`` (the routing core)."""
        self._guard = guard
        self._audit = audit
        self._node_fpr = node_cert_fingerprint
        self._on_auth = on_authenticated
        self._mesh_node_id = mesh_node_id
        self._on_home = on_home
        self.bindings: dict[str, int] = {}
        self.book = ChallengeBook()

    def register(self, table: MethodTable) -> None:
        table.register(
            "qpc.v1.Auth/Challenge",
            service_pb2.AuthChallengeRequest,
            service_pb2.AuthChallengeResponse,
            self.challenge,
        )
        table.register(
            "qpc.v1.Auth/Prove",
            service_pb2.AuthProveRequest,
            service_pb2.AuthProveResponse,
            self.prove,
        )

    async def challenge(
        self, req: service_pb2.AuthChallengeRequest, ctx: CallContext
    ) -> service_pb2.AuthChallengeResponse:
        self._guard.check(ctx, auth=False)
        return service_pb2.AuthChallengeResponse(
            nonce=self.book.issue(ctx.session.data, trio.current_time()),
            node_id=self._mesh_node_id,
        )

    async def prove(
        self, req: service_pb2.AuthProveRequest, ctx: CallContext
    ) -> service_pb2.AuthProveResponse:
        self._guard.check(ctx, auth=False)
        addr = ctx.remote_address
        try:
            fpr = self.book.verify(
                ctx.session.data, req.public_key, req.signature, self._node_fpr, trio.current_time()
            )
        except AuthError as exc:
            self._audit(
                AuditEvent(
                    self._guard.wall_ms(),
                    "auth.failure",
                    addr[0] if addr else "?",
                    {"reason": exc.message},
                )
            )
            raise
        if req.HasField("home") and self._on_home is not None:
            self._home(req, fpr)
        ctx.session.user = fpr
        await self._on_auth(fpr)
        self._audit(AuditEvent(self._guard.wall_ms(), "auth.success", short(fpr)))
        return service_pb2.AuthProveResponse(fingerprint=fpr)

    def _home(self, req: service_pb2.AuthProveRequest, fpr: bytes) -> None:
        """Check the binding names this user's proving key and this node, hand it on.

        A binding the routing core finds forged, expired or too far ahead fails
        the Prove (typed): the client signed something wrong. An older seq than
        one already held (a clock that went back) is not the client's session
        problem: logged in the counters, the session goes on.
        """
        assert self._on_home is not None
        b = HomeBinding.from_proto(req.home)  # RemoteProtocolError on a malformed one
        if b.user != fpr or b.user_key != req.public_key:
            raise RemoteProtocolError("home binding is not signed by the proving identity")
        if b.node != self._mesh_node_id:
            raise RemoteProtocolError("home binding names another node")
        outcome = self._on_home(b)
        self.bindings[outcome.value] = self.bindings.get(outcome.value, 0) + 1
        if outcome in (Outcome.FORGED, Outcome.EXPIRED, Outcome.FUTURE, Outcome.FOREIGN):
            raise RemoteProtocolError(f"home binding refused: {outcome.value}")
