"""The node: one Trio nursery holding the store, the QUIC endpoint, the RPC
server with the user services, and housekeeping (retention sweeps, audit).

Start with ``await nursery.start(Node(cfg).run)``; it reports a ``NodeInfo``
(bound address, certificate fingerprint to pin) once it accepts calls.
Cancelling it drains: refuse new calls, let running ones finish within the
grace period, close connections, flush the audit trail, close the store.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import trio

from qpc_node import __version__
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.config import Config, parse_hostport
from qpc_node.ops.http import HttpServer, serve_metrics
from qpc_node.ops.lockfile import DataDirLock
from qpc_node.ops.log import get_logger, setup_logging
from qpc_node.ops.metrics import NodeMetrics
from qpc_node.quic import Connection, Endpoint, QuicStream, open_endpoint
from qpc_node.quic.settings import AdmissionLimits
from qpc_node.quic.tls import ServerTLS, load_or_create_node_credentials
from qpc_node.rpc import HealthService, MethodTable, PeerInfo, RpcServer, ServerConfig
from qpc_node.rpc.server import ServerConnection
from qpc_node.service.audit import AuditSink
from qpc_node.service.auth_service import AuthService
from qpc_node.service.delivery import DeliveryService
from qpc_node.service.directory import DirectoryService
from qpc_node.service.guard import Guard
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.service.stats import StatsService
from qpc_node.store import AsyncStore, AuditEvent, StoreLimits

log = get_logger("qpc.node")

DB_FILE = "node.db"
KEYS_SUBDIR = "node-keys"
SWEEP_INTERVAL = 60.0
#: Frame cap = payload cap + room for the envelope and RPC headers.
FRAME_OVERHEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class NodeInfo:
    host: str
    port: int
    cert_fingerprint: str  # hex SHA-256 of the node certificate: what clients pin
    data_dir: Path


async def _set_when_cancelled(event: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        event.set()


def resolve_dirs(cfg: Config, default_data: Path) -> tuple[Path, Path]:
    data = Path(cfg.node.data_dir) if cfg.node.data_dir else default_data
    keys = Path(cfg.node.key_dir) if cfg.node.key_dir else data / KEYS_SUBDIR
    return data, keys


class Node:
    def __init__(
        self, cfg: Config, *, default_data: Path, wall_ms: WallClock = system_wall_ms
    ) -> None:
        self.cfg = cfg
        self.data_dir, self.key_dir = resolve_dirs(cfg, default_data)
        self._wall_ms = wall_ms
        self._conns: weakref.WeakKeyDictionary[Connection, ServerConnection] = (
            weakref.WeakKeyDictionary()
        )
        self._serving = False
        self.store: AsyncStore | None = None
        self.rpc: RpcServer | None = None
        self.delivery: DeliveryService | None = None
        self.audit: AuditSink | None = None
        self.guard: Guard | None = None
        self.auth: AuthService | None = None
        self.endpoint: Endpoint | None = None
        self.metrics = NodeMetrics(self)
        self.metrics_http: HttpServer | None = None

    def serving(self) -> bool:
        return self._serving

    def _build(self, store: AsyncStore, cert_fpr: bytes) -> RpcServer:
        lim = self.cfg.limits
        audit = self.audit = AuditSink(store)
        guard = self.guard = Guard(
            per_ip=TokenBucketLimiter[str](rate=lim.rate_per_second, burst=lim.rate_burst),
            per_identity=TokenBucketLimiter[str](rate=lim.rate_per_second, burst=lim.rate_burst),
            audit=audit,
            wall_ms=self._wall_ms,
        )
        table = MethodTable()
        HealthService(serving=self.serving, version=__version__).register(table)
        delivery = self.delivery = DeliveryService(store, guard, wall_ms=self._wall_ms)
        delivery.register(table)
        DirectoryService(
            store,
            guard,
            audit,
            wall_ms=self._wall_ms,
            ttl_ms=lim.keypackage_ttl_s * 1000,
            allowed_suites=frozenset(self.cfg.mls.ciphersuites),
        ).register(table)
        self.auth = AuthService(
            guard, audit, node_cert_fingerprint=cert_fpr, on_authenticated=delivery.mark_local
        )
        self.auth.register(table)
        StatsService(self.metrics.snapshot, guard).register(table)
        return RpcServer(
            table,
            ServerConfig(max_frame_size=lim.max_payload + FRAME_OVERHEAD),
            observer=self.metrics.observe_call,
        )

    async def _handle_stream(self, conn: Connection, stream: QuicStream) -> None:
        assert self.rpc is not None
        state = self._conns.get(conn)
        if state is None:
            addr = conn.remote_address
            peer = PeerInfo(
                connection_id=f"{addr[0]}:{addr[1]}",
                remote_address=(addr[0], addr[1]),
                identity=conn.peer_identity,
                alpn=conn.alpn,
            )
            state = self._conns[conn] = self.rpc.open_connection(peer)
        await self.rpc.handle_stream(state, stream)

    async def sweep_once(self) -> tuple[int, int]:
        """Retention: drop expired messages and KeyPackages (audited), rotate the audit trail."""
        store = self.store
        assert store is not None
        now = self._wall_ms()
        expired_msgs = expired_kps = 0
        for _ in range(100):  # bounded catch-up per round
            m = await store.expire_messages(now)
            k = await store.expire_keypackages(now)
            expired_msgs += m.expired
            expired_kps += k.expired
            if not (m.more or k.more):
                break
        if (expired_msgs or expired_kps) and self.audit is not None:
            self.audit(
                AuditEvent(
                    now,
                    "retention.evict",
                    "",
                    {"messages": expired_msgs, "key_packages": expired_kps},
                )
            )
        await store.audit_rotate(now_ms=now, keep_last=100_000, max_age_ms=30 * 86_400_000)
        return expired_msgs, expired_kps

    async def _sweep(self) -> None:
        while True:
            await self.sweep_once()
            await trio.sleep(SWEEP_INTERVAL)

    async def run(
        self, *, task_status: trio.TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with DataDirLock(self.data_dir):
            stop = trio.Event()
            raised: BaseException | None = None
            async with trio.open_nursery() as nursery:
                # Also covers a cancellation while the services are still starting,
                # when nursery.start waits for the shielded task to end.
                nursery.start_soon(_set_when_cancelled, stop)
                try:
                    info: NodeInfo = await nursery.start(self._run_shielded, stop)
                    task_status.started(info)
                    await trio.sleep_forever()
                # Re-raised below, outside the nursery: a startup error (a taken port)
                # reaches the caller as itself, not wrapped in an ExceptionGroup.
                except BaseException as exc:
                    raised = exc
                finally:
                    nursery.cancel_scope.cancel()  # stop: the services drain and return
            if raised is not None:
                raise raised

    async def _run_shielded(
        self, stop: trio.Event, *, task_status: trio.TaskStatus[NodeInfo]
    ) -> None:
        """The services run shielded: a cancellation of ``run`` must start the drain,
        not reach the endpoint's connections and handlers (they would be cut off
        without an answer or a CONNECTION_CLOSE). ``stop`` is the only way in."""
        with trio.CancelScope(shield=True):
            await self._run(task_status, stop)

    async def _run(self, task_status: trio.TaskStatus[NodeInfo], stop: trio.Event) -> None:
        lim = self.cfg.limits
        creds = load_or_create_node_credentials(self.key_dir)
        host, port = parse_hostport(self.cfg.node.listen)
        store = await AsyncStore.open(
            self.data_dir / DB_FILE,
            limits=StoreLimits(
                max_payload_bytes=lim.max_payload,
                mailbox_max_messages=lim.mailbox_max_messages,
                mailbox_max_bytes=lim.mailbox_max_bytes,
                message_retention_ms=lim.retention_s * 1000,
                keypackage_ttl_ms=lim.keypackage_ttl_s * 1000,
            ),
        )
        self.store = store
        try:
            self.rpc = self._build(store, bytes.fromhex(creds.fingerprint))
            tls = ServerTLS(creds)
            admission = AdmissionLimits(
                max_connections=lim.max_connections,
                max_connections_per_ip=lim.max_connections_per_ip,
            )
            async with (
                open_endpoint(host, port, server_tls=tls, admission=admission) as ep,
                trio.open_nursery() as nursery,
            ):
                assert self.audit is not None
                await nursery.start(self.audit.run)
                nursery.start_soon(self._sweep)
                await nursery.start(ep.serve, self._handle_stream)
                self.endpoint = ep
                if self.cfg.metrics.listen:
                    await self._start_metrics(nursery)
                self._serving = True
                bound = ep.local_address
                info = NodeInfo(bound[0], bound[1], creds.fingerprint, self.data_dir)
                log.info("node serving", extra={"addr": f"{bound[0]}:{bound[1]}"})
                task_status.started(info)
                try:
                    await stop.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._drain(ep)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    async def _start_metrics(self, nursery: trio.Nursery) -> None:
        """Serve /metrics; stays up while draining so /readyz says 503 during the grace.

        A taken port costs the operator the metrics, not the node its messages.
        """
        try:
            self.metrics_http = await nursery.start(
                serve_metrics, self.cfg.metrics.listen, self.metrics
            )
        except OSError as exc:
            log.warning(
                "metrics endpoint not started",
                extra={"listen": self.cfg.metrics.listen, "err": exc.strerror or str(exc)},
            )

    async def _drain(self, ep: Endpoint) -> None:
        """Not ready, release parked long-polls, let running calls finish, then close."""
        self._serving = False
        grace = self.cfg.node.drain_grace_s
        log.info("draining", extra={"grace_s": grace})
        if self.delivery is not None:
            self.delivery.begin_drain()
        await ep.close(grace=grace, reason="node shutting down")

    def reload(self, cfg: Config) -> list[str]:
        """Apply what can change live (log level, rate limits); return what needs a restart."""
        if self.guard is not None:
            self.guard.set_rate(cfg.limits.rate_per_second, cfg.limits.rate_burst)
        setup_logging(cfg.log.level, cfg.log.format)
        restart = [
            key
            for key, old, new in (
                ("node.listen", self.cfg.node.listen, cfg.node.listen),
                ("node.data_dir", self.cfg.node.data_dir, cfg.node.data_dir),
                ("node.key_dir", self.cfg.node.key_dir, cfg.node.key_dir),
                ("limits.max_payload", self.cfg.limits.max_payload, cfg.limits.max_payload),
            )
            if old != new
        ]
        self.cfg = cfg
        if self.audit is not None:
            self.audit(AuditEvent(self._wall_ms(), "config.reload", "", {"needs_restart": restart}))
        log.info("config reloaded", extra={"needs_restart": ",".join(restart)})
        return restart
