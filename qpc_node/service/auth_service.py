"""Auth.Challenge / Auth.Prove: bind a connection's session to a user identity."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

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
    ) -> None:
        self._guard = guard
        self._audit = audit
        self._node_fpr = node_cert_fingerprint
        self._on_auth = on_authenticated
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
            nonce=self.book.issue(ctx.session.data, trio.current_time())
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
        ctx.session.user = fpr
        await self._on_auth(fpr)
        self._audit(AuditEvent(self._guard.wall_ms(), "auth.success", short(fpr)))
        return service_pb2.AuthProveResponse(fingerprint=fpr)
