"""What every user-facing call passes first: rate limits and, where needed, auth.

Limits apply per source IP always and per identity once authenticated (seeds:
50 req/s each). A refused call gets RESOURCE_EXHAUSTED and an audit event, and
never reaches the store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec
import trio

from qpc_node.errors import QpcError, StatusCode
from qpc_node.ops.log import get_logger
from qpc_node.rpc.context import CallContext
from qpc_node.store.records import AuditEvent

log = get_logger("qpc.service.guard")


class Unauthenticated(QpcError):
    code = StatusCode.UNAUTHENTICATED


class PermissionDenied(QpcError):
    code = StatusCode.PERMISSION_DENIED


class RateLimited(QpcError):
    code = StatusCode.RESOURCE_EXHAUSTED


class Limiter(Protocol):
    rate: float
    burst: float

    def allow(self, key: str, now: float) -> bool: ...


class Auditor(Protocol):
    def __call__(self, event: AuditEvent) -> None: ...


def short(fpr: bytes) -> str:
    """Audit/log subject: a short fingerprint, never key material."""
    return fpr[:4].hex()


class Guard:
    def __init__(
        self,
        *,
        per_ip: Limiter,
        per_identity: Limiter,
        audit: Auditor,
        wall_ms: Callable[[], int],
    ) -> None:
        self._per_ip = per_ip
        self._per_identity = per_identity
        self._audit = audit
        self.wall_ms = wall_ms
        self.refused = 0

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(refused=self.refused)

    def set_rate(self, rate: float, burst: float) -> None:
        """Live reload (SIGHUP): new limits apply from the next refill."""
        for lim in (self._per_ip, self._per_identity):
            lim.rate, lim.burst = rate, burst

    def check(self, ctx: CallContext, *, auth: bool = True) -> bytes:
        """Apply limits; with ``auth`` also require a proven identity and return it."""
        now = trio.current_time()
        addr = ctx.remote_address
        ip = addr[0] if addr else "?"
        if not self._per_ip.allow(ip, now):
            self._refuse(ctx, "ip", ip)
        user = ctx.session.user
        if user is not None and not self._per_identity.allow(user.hex(), now):
            self._refuse(ctx, "identity", short(user))
        if auth and user is None:
            self._audit(AuditEvent(self.wall_ms(), "auth.required", ip, {"method": ctx.method}))
            raise Unauthenticated(f"{ctx.method} needs an authenticated session (Auth.Prove)")
        return user or b""

    def _refuse(self, ctx: CallContext, scope: str, subject: str) -> None:
        self.refused += 1
        self._audit(AuditEvent(self.wall_ms(), "ratelimit.hit", subject, {"scope": scope}))
        log.info("rate limited", extra={"scope": scope, "method": ctx.method})
        raise RateLimited(f"rate limit exceeded ({scope}); slow down")


class GuardStatistics(msgspec.Struct, frozen=True):
    refused: int  # calls refused by a rate limit (per IP or per identity)
