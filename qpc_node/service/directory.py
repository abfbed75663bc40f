"""KeyPackage directory: users upload batches, others fetch one to invite them.

Every uploaded package is parsed and verified by the MLS core before it is
stored: it must be signed by the uploader's own identity and use an allowed
ciphersuite. A fetched package is consumed; a last-resort package is handed
out (and kept) only when no other is left.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from qpc_node import crypto
from qpc_node.errors import QpcError, RemoteProtocolError, StatusCode
from qpc_node.rpc.context import CallContext
from qpc_node.rpc.methods import MethodTable
from qpc_node.service.guard import Auditor, Guard, PermissionDenied, short
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.records import AuditEvent, KeyPackageUpload
from qpc_node.wire.gen.qpc.v1 import service_pb2

#: Seeds: ciphersuite allowlist. 0x0001 = MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
DEFAULT_ALLOWED_SUITES = frozenset({0x0001})
MAX_UPLOAD_BATCH = 100


class SuiteNotAllowed(QpcError):
    code = StatusCode.INVALID_ARGUMENT


class NoKeyPackage(QpcError):
    code = StatusCode.NOT_FOUND


def _inspect_all(blobs: list[bytes]) -> list[crypto.KeyPackageInfo]:
    return [crypto.inspect_key_package(b) for b in blobs]


class DirectoryService:
    def __init__(
        self,
        store: AsyncStore,
        guard: Guard,
        audit: Auditor,
        *,
        wall_ms: Callable[[], int],
        ttl_ms: int = 24 * 3600 * 1000,
        allowed_suites: frozenset[int] = DEFAULT_ALLOWED_SUITES,
        remote: Callable[[bytes], Awaitable[tuple[bytes, bool] | None]] | None = None,
    ) -> None:
        """``remote(identity)``: a KeyPackage of a user homed elsewhere (the mesh's
        proxied fetch via the next hop), None when it knows no route to them."""
        self._store = store
        self._remote = remote
        self._guard = guard
        self._audit = audit
        self._wall_ms = wall_ms
        self._ttl_ms = ttl_ms
        self._allowed = allowed_suites

    def register(self, table: MethodTable) -> None:
        table.register(
            "qpc.v1.Directory/Upload",
            service_pb2.UploadKeyPackagesRequest,
            service_pb2.UploadKeyPackagesResponse,
            self.upload,
        )
        table.register(
            "qpc.v1.Directory/Fetch",
            service_pb2.FetchKeyPackageRequest,
            service_pb2.FetchKeyPackageResponse,
            self.fetch,
        )
        table.register(
            "qpc.v1.Directory/Count",
            service_pb2.CountKeyPackagesRequest,
            service_pb2.CountKeyPackagesResponse,
            self.count,
        )

    async def upload(
        self, req: service_pb2.UploadKeyPackagesRequest, ctx: CallContext
    ) -> service_pb2.UploadKeyPackagesResponse:
        user = self._guard.check(ctx)
        if not 0 < len(req.packages) <= MAX_UPLOAD_BATCH:
            raise RemoteProtocolError(f"upload 1..{MAX_UPLOAD_BATCH} packages per call")
        blobs = [p.key_package for p in req.packages]
        # Verification costs ~0.1 ms per package: off the event loop for batches.
        infos = await trio.to_thread.run_sync(_inspect_all, blobs)
        now_ms = self._wall_ms()
        uploads: list[KeyPackageUpload] = []
        for p, info in zip(req.packages, infos, strict=True):
            if info.fingerprint != user.hex():
                raise PermissionDenied("a KeyPackage must be signed by the uploader's identity")
            if info.ciphersuite not in self._allowed:
                raise SuiteNotAllowed(f"ciphersuite 0x{info.ciphersuite:04x} is not allowed here")
            not_after_ms = min(info.not_after * 1000, now_ms + self._ttl_ms)
            if not_after_ms <= now_ms:
                raise RemoteProtocolError("KeyPackage lifetime already ended")
            uploads.append(
                KeyPackageUpload(
                    p.key_package,
                    info.ciphersuite,
                    last_resort=p.last_resort or info.last_resort,
                    not_after_ms=not_after_ms,
                )
            )
        stored = await self._store.upload_keypackages(user, uploads, now_ms)
        count = await self._store.count_keypackages(user, now_ms)
        self._audit(AuditEvent(now_ms, "keypackage.upload", short(user), {"n": stored}))
        return service_pb2.UploadKeyPackagesResponse(stored=stored, available=count.normal)

    async def fetch(
        self, req: service_pb2.FetchKeyPackageRequest, ctx: CallContext
    ) -> service_pb2.FetchKeyPackageResponse:
        self._guard.check(ctx)
        if len(req.identity) != 32:
            raise RemoteProtocolError("identity must be a 32-byte fingerprint")
        now_ms = self._wall_ms()
        rec = await self._store.fetch_keypackage(req.identity, now_ms)
        if rec is None and self._remote is not None:
            got = await self._remote(req.identity)
            if got is not None:
                return self._checked_remote(req.identity, *got)
        if rec is None:
            self._audit(AuditEvent(now_ms, "keypackage.exhausted", short(req.identity)))
            raise NoKeyPackage(f"no KeyPackage available for {short(req.identity)}")
        return service_pb2.FetchKeyPackageResponse(
            key_package=rec.data, last_resort=rec.last_resort
        )

    def _checked_remote(
        self, identity: bytes, key_package: bytes, last_resort: bool
    ) -> service_pb2.FetchKeyPackageResponse:
        """A proxied package must be the requested user's: a relay cannot swap in another."""
        try:
            owner = crypto.key_package_identity(key_package)
        except crypto.MlsError as exc:
            raise QpcError(
                f"remote KeyPackage for {short(identity)} is invalid: {exc}",
                code=StatusCode.UNAVAILABLE,
            ) from None
        if owner != identity.hex():
            raise QpcError(
                f"remote KeyPackage for {short(identity)} belongs to someone else",
                code=StatusCode.UNAVAILABLE,
            )
        return service_pb2.FetchKeyPackageResponse(key_package=key_package, last_resort=last_resort)

    async def count(
        self, req: service_pb2.CountKeyPackagesRequest, ctx: CallContext
    ) -> service_pb2.CountKeyPackagesResponse:
        user = self._guard.check(ctx)
        c = await self._store.count_keypackages(user, self._wall_ms())
        return service_pb2.CountKeyPackagesResponse(available=c.normal)
