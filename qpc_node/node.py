"""The node: one Trio nursery holding the store, the QUIC endpoint, the RPC
server with the user services, and housekeeping (retention sweeps, audit).

Start with ``await nursery.start(Node(cfg).run)``; it reports a ``NodeInfo``
(bound address, certificate fingerprint to pin) once it accepts calls.
Cancelling it drains: refuse new calls, let running ones finish within the
grace period, close connections, flush the audit trail, close the store.
"""

from __future__ import annotations

import datetime as dt
import weakref
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from qpc_node import __version__
from qpc_node.errors import ConfigError, QpcError
from qpc_node.federation.core import Federation, FederationSetup, build_federation
from qpc_node.federation.trust import TrustRefusalsCollector, load_managed_credentials
from qpc_node.mesh.interfaces import list_interfaces
from qpc_node.mesh.service import MeshService, settings_from_config
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.config import Config, LimitsSection, parse_hostport
from qpc_node.ops.lockfile import DataDirLock, secure_private_dir
from qpc_node.ops.log import get_logger, setup_logging
from qpc_node.ops.memory import release_large_buffers
from qpc_node.ops.metrics import NodeMetrics
from qpc_node.quic import Connection, Endpoint, QuicStream, open_endpoint
from qpc_node.quic.settings import AdmissionLimits
from qpc_node.quic.tls import ALPN_FEDERATION, ServerTLS, load_or_create_node_credentials
from qpc_node.rpc import HealthService, MethodTable, PeerInfo, RpcServer, ServerConfig
from qpc_node.rpc.server import ServerConnection
from qpc_node.service.audit import AuditSink
from qpc_node.service.auth_service import AuthService
from qpc_node.service.channels import ChannelService, publish_limiter
from qpc_node.service.delivery import DeliveryService
from qpc_node.service.directory import DirectoryService
from qpc_node.service.guard import Guard
from qpc_node.service.mesh_status import MeshStatusService
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.service.stats import StatsService
from qpc_node.store import AsyncStore, AuditEvent, StoreLimits
from qpc_node.store.channels import ChannelLimits, ChannelStore
from qpc_node.store.store import Store
from qpc_node.storefwd.gossip import GossipDriver
from qpc_node.storefwd.sources import ChannelSource, HeldSource
from qpc_node.storefwd.syncer import Syncer, SyncerConfig
from qpc_node.wire.channel import ChannelPolicy

if TYPE_CHECKING:
    # Imported where a metrics listener starts: a node with metrics off has no HTTP server.
    from qpc_node.ops.http import HttpServer

log = get_logger("qpc.node")

DB_FILE = "node.db"
KEYS_SUBDIR = "node-keys"
SWEEP_INTERVAL = 60.0
#: Frame cap = payload cap + room for the envelope and RPC headers.
FRAME_OVERHEAD = 64 * 1024


class NodeInfo(msgspec.Struct, frozen=True):
    host: str
    port: int
    cert_fingerprint: str  # hex SHA-256 of the node certificate: what clients pin
    data_dir: Path


class ReloadReport(msgspec.Struct, frozen=True):
    """What a reload did, key by key (``section.key``), for the log, audit and SIGHUP line."""

    applied: tuple[str, ...]
    """Changed and in effect now."""
    needs_restart: tuple[str, ...]
    """Changed in the file, not in effect: the node keeps the running value until restarted."""
    errors: tuple[str, ...] = ()
    """Live appliers that failed (e.g. the new metrics address is taken)."""


def _admission(lim: LimitsSection) -> AdmissionLimits:
    return AdmissionLimits(
        max_connections=lim.max_connections,
        max_connections_per_ip=lim.max_connections_per_ip,
        max_half_open=lim.max_half_open,
        max_half_open_per_ip=lim.max_half_open_per_ip,
        half_open_timeout=lim.half_open_timeout_s,
        retry_threshold=lim.retry_threshold,
    )


async def _set_when_cancelled(event: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        event.set()


def resolve_dirs(cfg: Config, default_data: Path) -> tuple[Path, Path]:
    data = Path(cfg.node.data_dir) if cfg.node.data_dir else default_data
    keys = Path(cfg.node.key_dir) if cfg.node.key_dir else data / KEYS_SUBDIR
    return data, keys


def _read_config_file(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: {exc.strerror}") from None


def _channel_limits(cfg: Config) -> tuple[ChannelLimits, ChannelPolicy]:
    ch = cfg.channels
    limits = ChannelLimits(ch.retention_s * 1000, ch.max_messages, ch.max_bytes)
    return limits, ChannelPolicy(ch.max_message_bytes, ch.max_expiry_s * 1000)


def _secure_dir(path: Path, create_files: tuple[str, ...] = ()) -> None:
    """0700 dir, 0600 files (ops/lockfile.py); a fix is logged, not fatal."""
    for fix in secure_private_dir(path, create_files):
        log.warning("data dir was readable by other users; fixed", extra={"fix": fix})


class Node:
    def __init__(
        self,
        cfg: Config,
        *,
        default_data: Path,
        wall_ms: WallClock = system_wall_ms,
        federation: FederationSetup | None = None,
    ) -> None:
        self.cfg = cfg
        # Opt-in (tests, demo) until the mesh config keys are wired; see FederationSetup.
        self._federation_setup = federation
        self.federation: Federation | None = None
        self.syncer: Syncer | None = None
        self.gossip: GossipDriver | None = None
        """Broadcast channel messages between nodes (storefwd/gossip.py), on the mesh."""
        """Inventory sync over the federation links (sources register with add_source)."""
        self.mesh: MeshService | None = None
        self.data_dir, self.key_dir = resolve_dirs(cfg, default_data)
        self._wall_ms = wall_ms
        self._conns: weakref.WeakKeyDictionary[Connection, ServerConnection] = (
            weakref.WeakKeyDictionary()
        )
        self._serving = False
        self.store: AsyncStore | None = None
        self.rpc: RpcServer | None = None
        self.delivery: DeliveryService | None = None
        self.channels: ChannelStore | None = None
        """Broadcast channel messages held here; the gossip driver uses ``add`` and
        ``on_published`` (see store/channels.py)."""
        self.channel_service: ChannelService | None = None
        self.audit: AuditSink | None = None
        self.guard: Guard | None = None
        self.auth: AuthService | None = None
        self.endpoint: Endpoint | None = None
        self.metrics = NodeMetrics(self)
        self.metrics_http: HttpServer | None = None
        self._nursery: trio.Nursery | None = None
        self._metrics_scope: trio.CancelScope | None = None
        self._metrics_done: trio.Event | None = None
        self._reload_lock = trio.Lock()

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
        mesh = self.mesh
        delivery = self.delivery = DeliveryService(store, guard, wall_ms=self._wall_ms, relay=mesh)
        delivery.register(table)
        self.channels = ChannelStore(store, *_channel_limits(self.cfg), wall_ms=self._wall_ms)
        self.channel_service = ChannelService(
            self.channels,
            guard,
            wall_ms=self._wall_ms,
            limiter=publish_limiter(self.cfg.channels.publish_rate),
            mail=delivery.waiters,
        )
        self.channel_service.register(table)
        DirectoryService(
            store,
            guard,
            audit,
            wall_ms=self._wall_ms,
            ttl_ms=lim.keypackage_ttl_s * 1000,
            allowed_suites=frozenset(self.cfg.mls.ciphersuites),
            remote=mesh.remote_key_package if mesh is not None else None,
        ).register(table)
        self.auth = AuthService(
            guard,
            audit,
            node_cert_fingerprint=cert_fpr,
            on_authenticated=delivery.mark_local,
            mesh_node_id=mesh.node_id if mesh is not None else b"",
            on_home=mesh.home if mesh is not None else None,
        )
        self.auth.register(table)
        StatsService(self.metrics.snapshot, guard).register(table)
        MeshStatusService(mesh, guard, audit).register(table)
        return RpcServer(
            table,
            ServerConfig(
                max_frame_size=lim.max_payload + FRAME_OVERHEAD,
                send_timeout=lim.send_timeout_s,
                request_budget=lim.rpc_buffer_bytes,
                request_budget_per_ip=lim.rpc_buffer_bytes_per_ip,
                send_budget=lim.send_queue_bytes,
                send_budget_per_ip=lim.send_queue_bytes_per_ip,
            ),
            observer=self.metrics.observe_call,
        )

    async def _handle_stream(self, conn: Connection, stream: QuicStream) -> None:
        assert self.rpc is not None
        if conn.alpn == ALPN_FEDERATION:  # peers never reach the user services, nor users these
            if self.federation is not None:
                await self.federation.handle_stream(conn, stream)
            else:
                await stream.aclose()
            return
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

    def _known_local(self, user: bytes) -> bool:
        return self.delivery is not None and self.delivery.known_local(user)

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
        if self.channels is not None:
            dropped, _ = await self.channels.sweep(now)
            if dropped and self.audit is not None:
                self.audit(AuditEvent(now, "retention.evict", "", {"channel_messages": dropped}))
        await store.audit_rotate(now_ms=now, keep_last=100_000, max_age_ms=30 * 86_400_000)
        return expired_msgs, expired_kps

    async def _sweep(self) -> None:
        while True:
            await self.sweep_once()
            await trio.sleep(SWEEP_INTERVAL)

    async def run(
        self, *, task_status: trio.TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        release_large_buffers()  # freed messages go back to the OS (ops/memory.py)
        # Before anything is opened in it: node.db first, so SQLite's WAL and -shm
        # files inherit its 0600.
        _secure_dir(self.data_dir, (DB_FILE,))
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

    def _mdns_at_start(self) -> bool:
        """``mesh.mdns`` resolved; "auto" on a machine with no network up (a laptop with
        its WiFi off) runs without discovery instead of refusing to start."""
        if not self.cfg.mdns_on:
            return False
        if self.cfg.mesh.mdns == "auto" and not self.cfg.mesh.interfaces and not list_interfaces():
            log.warning(
                "mesh: no interface is up besides loopback; mDNS discovery stays off "
                "until the node restarts (mesh.mdns = auto)"
            )
            return False
        return True

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
        fed_cfg = self.cfg.federation
        ca_pem: bytes | None = None
        if fed_cfg.mode == "managed":
            # The CA-issued pair is the node's identity (config.FederationSection).
            ca_pem = _read_config_file("federation.ca", fed_cfg.ca)
            creds = load_managed_credentials(
                fed_cfg.cert,
                fed_cfg.key,
                ca_pem,
                now=dt.datetime.fromtimestamp(self._wall_ms() / 1000, dt.UTC),
            )
        else:
            creds = load_or_create_node_credentials(self.key_dir)
            _secure_dir(self.key_dir)  # after: an operator may have dropped a pair in
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
        refusals: TrustRefusalsCollector | None = None
        try:
            setup = self._federation_setup
            mdns = self._mdns_at_start()
            if setup is None and (mdns or self.cfg.mesh.static_peers):
                m = self.cfg.mesh
                self.mesh = await MeshService.open(
                    creds,
                    store,
                    settings_from_config(
                        m.static_peers,
                        mdns,
                        m.interfaces,
                        relay_custody_per_user=lim.relay_custody_per_user,
                        storefwd=self.cfg.storefwd.policy(carrier=m.carrier),
                    ),
                    is_local=self._known_local,
                    wall_ms=self._wall_ms,
                )
                setup = self.mesh.federation_setup()
                if ca_pem is not None:
                    setup = msgspec.structs.replace(setup, mode="managed", ca_pem=ca_pem)
            self.rpc = self._build(store, bytes.fromhex(creds.fingerprint))
            tls = ServerTLS(creds)
            if setup is not None:
                assert self.delivery is not None
                self.federation = await build_federation(
                    setup,
                    creds,
                    store,
                    on_local=self.delivery.waiters.notify,
                    wall_ms=self._wall_ms,
                )
                tls = self.federation.server_tls
                self.syncer = Syncer(
                    self.federation,
                    SyncerConfig(interval_s=self.cfg.sync.interval_s),
                    wall_ms=self._wall_ms,
                )
                # inventory sync, scope 2: held envelopes (to peers that may carry
                # them) and receipts, taken through the RelayEnqueue/Receipt paths
                self.syncer.add_source(HeldSource(store, self.federation.custody))
                if self.channels is not None:
                    # the channel store's seam (store/channels.py): the driver checks
                    # payloads with it, delivers first receptions into it, and spreads
                    # what local clients publish
                    gossip = GossipDriver(
                        self.federation,
                        self.channels.validate,
                        self.channels.deliver,
                        limits=(
                            self._federation_setup.gossip_limits
                            if self._federation_setup is not None
                            else None
                        ),
                        wall_ms=self._wall_ms,
                    )

                    def spread(data: bytes, gossip: GossipDriver = gossip) -> None:
                        gossip.publish(data)

                    self.channels.on_published = spread
                    self.gossip = gossip
                    # inventory sync, scope 1: channel messages within retention; what
                    # a heal brings is spread on the tree like a first reception
                    self.syncer.add_source(ChannelSource(self.channels, gossip.inject))
                if self.mesh is not None:
                    self.mesh.attach(self.federation)
                refusals = TrustRefusalsCollector(self.federation.policy)
                self.metrics.register(refusals)
            async with (
                open_endpoint(host, port, server_tls=tls, admission=_admission(lim)) as ep,
                trio.open_nursery() as nursery,
            ):
                assert self.audit is not None
                await nursery.start(self.audit.run)
                nursery.start_soon(self._sweep)
                await nursery.start(ep.serve, self._handle_stream)
                self.endpoint = ep
                if self.federation is not None:
                    await nursery.start(self.federation.run, ep)
                if self.syncer is not None:
                    await nursery.start(self.syncer.run)
                if self.gossip is not None:
                    await nursery.start(self.gossip.run)
                if self.mesh is not None:
                    await nursery.start(self.mesh.run, ep.local_address[1])
                if self.federation is not None and self._federation_setup is not None:
                    for peer in self._federation_setup.static_peers:
                        await nursery.start(
                            partial(
                                self.federation.maintain,
                                peer.host,
                                peer.port,
                                expected=peer.node_id,
                            )
                        )
                self._nursery = nursery
                if self.cfg.metrics.listen:
                    await self._start_metrics(self.cfg.metrics.listen)
                self._serving = True
                bound = ep.local_address
                info = NodeInfo(bound[0], bound[1], creds.fingerprint, self.data_dir)
                log.info("node serving", extra={"addr": f"{bound[0]}:{bound[1]}"})
                task_status.started(info)
                try:
                    await stop.wait()
                finally:
                    self._nursery = None  # a reload while draining starts nothing new
                    with trio.CancelScope(shield=True):
                        await self._drain(ep)
                    nursery.cancel_scope.cancel()
        finally:
            if refusals is not None:
                self.metrics.unregister(refusals)
            with trio.CancelScope(shield=True):
                await store.aclose()

    async def _start_metrics(self, listen: str) -> str | None:
        """Serve /metrics; stays up while draining so /readyz says 503 during the grace.

        A taken port costs the operator the metrics, not the node its messages:
        the error is logged and returned (reload reports it), the node goes on.
        """
        assert self._nursery is not None
        try:
            self.metrics_http = await self._nursery.start(self._serve_metrics, listen)
        except OSError as exc:
            err = exc.strerror or str(exc)
            log.warning("metrics endpoint not started", extra={"listen": listen, "err": err})
            return f"metrics.listen: {listen}: {err}"
        return None

    async def _serve_metrics(
        self, listen: str, *, task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from qpc_node.ops.http import serve_metrics

        done = self._metrics_done = trio.Event()
        try:
            with trio.CancelScope() as self._metrics_scope:
                await serve_metrics(listen, self.metrics, task_status=task_status)
        finally:
            done.set()

    async def _stop_metrics(self) -> None:
        """Close the metrics listener and wait until its port is free again."""
        if self._metrics_scope is not None:
            self._metrics_scope.cancel()
        if self._metrics_done is not None:
            await self._metrics_done.wait()
        self._metrics_scope = self._metrics_done = None
        self.metrics_http = None

    async def _drain(self, ep: Endpoint) -> None:
        """Not ready, release parked long-polls, let running calls finish, then close."""
        self._serving = False
        grace = self.cfg.node.drain_grace_s
        log.info("draining", extra={"grace_s": grace})
        if self.delivery is not None:
            self.delivery.begin_drain()
        if self.channel_service is not None:
            self.channel_service.begin_drain()
        await ep.close(grace=grace, reason="node shutting down")

    async def reload(self, cfg: Config) -> ReloadReport:
        """Apply ``cfg``: every changed key is applied live or reported as needing a restart.

        ``RELOAD`` decides, key by key. Restart keys keep their running value in
        ``self.cfg`` (which always describes what is in effect), so they stay
        reported until the node restarts rather than looking applied.
        """
        async with self._reload_lock:
            old = self.cfg
            changed = [key for key in config_keys() if _value(old, key) != _value(cfg, key)]
            live = [key for key in changed if RELOAD.get(key, RESTART) is not RESTART]
            restart = [key for key in changed if key not in live]
            self.cfg = _with_values(cfg, {key: _value(old, key) for key in restart})
            errors: list[str] = []
            appliers: list[LiveApplier] = []
            for key in live:
                applier = RELOAD[key]
                if isinstance(applier, Live) and applier.apply not in appliers:
                    appliers.append(applier.apply)
            for apply in appliers:
                if (err := await apply(self, old)) is not None:
                    errors.append(err)
            report = ReloadReport(tuple(live), tuple(restart), tuple(errors))
        if self.audit is not None:
            self.audit(
                AuditEvent(
                    self._wall_ms(),
                    "config.reload",
                    "",
                    {"applied": list(live), "needs_restart": restart, "errors": errors},
                )
            )
        log.info(
            "config reloaded",
            extra={
                "applied": ",".join(live),
                "needs_restart": ",".join(restart),
                "errors": "; ".join(errors),
            },
        )
        return report

    # -- live appliers (see RELOAD): each reads self.cfg, already the new config ----

    async def _apply_log(self, old: Config) -> str | None:
        setup_logging(self.cfg.log.level, self.cfg.log.format)
        return None

    async def _apply_sync(self, old: Config) -> str | None:
        if self.syncer is not None:
            self.syncer.set_interval(self.cfg.sync.interval_s)
        return None

    async def _apply_rates(self, old: Config) -> str | None:
        if self.guard is not None:
            self.guard.set_rate(self.cfg.limits.rate_per_second, self.cfg.limits.rate_burst)
        return None

    async def _apply_store_limits(self, old: Config) -> str | None:
        """Quotas and retention: swapped on the store's worker thread, between jobs, so
        no enqueue sees half of them. Payload cap and KeyPackage TTL stay as started
        (restart keys: the RPC frame cap and the directory hold them too)."""
        store = self.store
        if store is None:
            return None
        lim = self.cfg.limits

        def swap(s: Store) -> None:
            s.limits = msgspec.structs.replace(
                s.limits,
                mailbox_max_messages=lim.mailbox_max_messages,
                mailbox_max_bytes=lim.mailbox_max_bytes,
                message_retention_ms=lim.retention_s * 1000,
            )

        try:
            await store.run(swap)
        except QpcError as exc:  # closed under us (draining): nothing left to apply to
            return f"limits: store not open ({exc})"
        return None

    async def _apply_channels(self, old: Config) -> str | None:
        """Caps, retention and checks from the next message on (a lowered cap or
        retention is enforced by the next sweep); the publish rate from the next refill."""
        if self.channels is not None:
            self.channels.set_limits(*_channel_limits(self.cfg))
        if self.channel_service is not None:
            rate = self.cfg.channels.publish_rate
            self.channel_service.limiter.rate = rate
            self.channel_service.limiter.burst = max(1.0, 4 * rate)
        return None

    async def _apply_metrics(self, old: Config) -> str | None:
        if self._nursery is None:
            return None  # not started yet: _run reads self.cfg
        await self._stop_metrics()
        if self.cfg.metrics.listen:
            return await self._start_metrics(self.cfg.metrics.listen)
        return None

    async def _apply_admission(self, old: Config) -> str | None:
        if self.endpoint is not None:
            self.endpoint.set_admission_limits(_admission(self.cfg.limits))
        return None

    async def _read_when_used(self, old: Config) -> str | None:
        """For keys the node reads from ``self.cfg`` at the moment it needs them."""
        return None


LiveApplier = Callable[[Node, Config], Awaitable[str | None]]
"""``await apply(node, old_cfg)`` with ``node.cfg`` already new; returns an error or None."""


class Live(msgspec.Struct, frozen=True):
    apply: LiveApplier


class _Restart:
    def __repr__(self) -> str:
        return "RESTART"


RESTART: Final = _Restart()
"""Takes effect at the next start; a reload reports it and keeps the running value."""

RELOAD: Final[Mapping[str, Live | _Restart]] = {
    # node
    "node.listen": RESTART,  # the bound UDP socket
    "node.data_dir": RESTART,  # the open database and its lock
    "node.key_dir": RESTART,  # the TLS certificate clients pinned
    "node.production": Live(Node._read_when_used),  # its checks run in load_config
    "node.drain_grace_s": Live(Node._read_when_used),  # read by _drain
    # log
    "log.level": Live(Node._apply_log),
    "log.format": Live(Node._apply_log),
    # metrics
    "metrics.listen": Live(Node._apply_metrics),
    # limits
    "limits.max_payload": RESTART,  # RPC frame cap, fixed when the server is built
    "limits.rpc_buffer_bytes": RESTART,  # the RPC server's byte budgets, fixed likewise
    "limits.rpc_buffer_bytes_per_ip": RESTART,
    "limits.send_queue_bytes": RESTART,
    "limits.send_queue_bytes_per_ip": RESTART,
    "limits.send_timeout_s": RESTART,
    "limits.rate_per_second": Live(Node._apply_rates),
    "limits.rate_burst": Live(Node._apply_rates),
    "limits.mailbox_max_messages": Live(Node._apply_store_limits),
    "limits.mailbox_max_bytes": Live(Node._apply_store_limits),
    "limits.retention_s": Live(Node._apply_store_limits),
    "limits.max_connections": Live(Node._apply_admission),  # the endpoint's admission gate
    "limits.max_connections_per_ip": Live(Node._apply_admission),
    "limits.max_half_open": Live(Node._apply_admission),
    "limits.max_half_open_per_ip": Live(Node._apply_admission),
    "limits.half_open_timeout_s": Live(Node._apply_admission),
    "limits.retry_threshold": Live(Node._apply_admission),
    "limits.keypackage_ttl_s": RESTART,  # the directory's and the store's, set at start
    "limits.relay_custody_per_user": RESTART,  # the federation's limits, built at start
    # mls
    "mls.ciphersuites": RESTART,  # the directory's allowlist, set at start
    # mesh: read when the node starts (peer table, discovery, the federation's TLS)
    "mesh.mdns": RESTART,
    "mesh.interfaces": RESTART,
    "mesh.static_peers": RESTART,
    "mesh.carrier": RESTART,  # stated in Ping by the links, set at start
    # storefwd: the federation's hold policy, built at start
    "storefwd.max_held": RESTART,
    "storefwd.held_per_origin": RESTART,
    "storefwd.max_expiry_ahead_s": RESTART,
    "storefwd.reroute_after_s": RESTART,
    "storefwd.spray_tokens": RESTART,
    "storefwd.spray_delay_s": RESTART,
    # federation: the trust policy and the node's credentials, built at start
    # (federation.pinned is refused: NOT_YET)
    "federation.mode": RESTART,
    "federation.ca": RESTART,
    "federation.cert": RESTART,
    "federation.key": RESTART,
    "federation.pinned": RESTART,
    # channels: the channel store's limits and the relay checks, swapped live
    "channels.retention_s": Live(Node._apply_channels),
    "channels.max_messages": Live(Node._apply_channels),
    "channels.max_bytes": Live(Node._apply_channels),
    "channels.max_expiry_s": Live(Node._apply_channels),
    "channels.max_message_bytes": Live(Node._apply_channels),
    "channels.publish_rate": Live(Node._apply_channels),
    # sync: the periodic session's interval (the next wait uses it)
    "sync.interval_s": Live(Node._apply_sync),
}
"""Every config key -> live applier or RESTART. tests/integration/test_reload.py checks
that it names every field of every Config section, and each decision key by key."""


def config_keys() -> list[str]:
    """``section.key`` for every field of every Config section."""
    return [
        f"{section.name}.{name}"
        for section in msgspec.structs.fields(Config)
        for name in section.type.__struct_fields__
    ]


def _value(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _with_values(cfg: Config, values: Mapping[str, object]) -> Config:
    """``cfg`` with some ``section.key`` values replaced (the running ones)."""
    sections: dict[str, dict[str, object]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    changes = {
        section: msgspec.structs.replace(getattr(cfg, section), **fields)
        for section, fields in sections.items()
    }
    return msgspec.structs.replace(cfg, **changes)
