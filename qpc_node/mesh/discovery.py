"""mDNS discovery of other qpc nodes (``_quicprochat._udp.local.``), for Trio.

python-zeroconf is blocking/asyncio code: it runs its own loop thread, and its
ServiceBrowser calls us back from yet another thread. Those callbacks only hop
into Trio (``trio.from_thread``) to note *which* instance changed; the Trio side
coalesces the notes per name, resolves each instance in a worker thread and
feeds the sans-IO ``DiscoveryCore``, whose events leave in order through one
memory channel. So a slow consumer never loses state (zeroconf keeps the
records; we keep one pending note per name) and a peer that never answers its
SRV query holds up nobody else.

Shutdown (cancellation of ``run``) sends goodbyes (TTL 0) so the others drop us
at once, and is bounded: it runs shielded with a timeout and abandons the
zeroconf thread rather than hang the node.

Operator debug tool: ``python -m qpc_node.mesh.discovery --node-id HEX --port N``
announces a node and prints one JSON line per event.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import signal
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import msgspec
import trio
from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from qpc_node.errors import LocalProtocolError
from qpc_node.mesh.discovery_core import (
    NODE_ID_LEN,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    BadTxtRecord,
    DiscoveryCore,
    DiscoveryEvent,
    DiscoveryStatistics,
    PeerGone,
    PeerSeen,
    PeerTxt,
    PeerUpdated,
    ResolvedService,
    has_unscoped_link_local,
    parse_domain,
)
from qpc_node.mesh.interfaces import (
    MeshInterface,
    NoInterfacesError,
    announce_addresses,
    select_interfaces,
    zeroconf_interfaces,
)
from qpc_node.ops.clock import system_wall_ms

__all__ = [
    "SERVICE_TYPE",
    "DiscoveryConfig",
    "DiscoveryEvent",
    "DiscoveryStatistics",
    "MdnsDiscovery",
    "PeerGone",
    "PeerSeen",
    "PeerUpdated",
    "open_discovery",
]

log = logging.getLogger(__name__)

SCOPE_WAIT_S = 0.5
_IP_VERSIONS = {"all": IPVersion.All, "v6": IPVersion.V6Only, "v4": IPVersion.V4Only}


class DiscoveryConfig(msgspec.Struct, frozen=True):
    node_id: bytes
    port: int
    version: int = PROTOCOL_VERSION
    domain: str | None = None
    interfaces: tuple[str, ...] | None = None  # None: every non-loopback interface that is up
    local_only: bool = False  # a laptop node on loopback: no mDNS at all
    resolve_timeout_s: float = 3.0
    shutdown_timeout_s: float = 5.0
    max_instances: int = 256
    event_buffer: int = 64
    resolvers: int = 4
    # Discovery that cannot start (below: START_FAILURES) is tried again, doubling.
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0

    def __post_init__(self) -> None:
        if len(self.node_id) != NODE_ID_LEN:
            raise LocalProtocolError(f"node_id must be {NODE_ID_LEN} bytes")
        if not 1 <= self.port <= 65535:
            raise LocalProtocolError(f"port out of range: {self.port}")
        if not 1 <= self.version <= 65535:
            raise LocalProtocolError(f"version out of range: {self.version}")
        if self.interfaces is not None and not self.interfaces:
            raise LocalProtocolError("interfaces: give at least one name, or None for all")
        for v in (self.resolve_timeout_s, self.shutdown_timeout_s):
            if not 0 < v <= 60:
                raise LocalProtocolError("timeouts must be within (0, 60] s")
        if not 0 < self.retry_initial_s <= self.retry_max_s <= 3600:
            raise LocalProtocolError("retries: 0 < retry_initial_s <= retry_max_s <= 3600")
        if self.max_instances < 1 or self.event_buffer < 0 or self.resolvers < 1:
            raise LocalProtocolError("max_instances, resolvers >= 1; event_buffer >= 0")
        # Checked by the receivers' parser: we never announce what others would refuse.
        try:
            parse_domain(self.domain.encode() if self.domain else None)
        except (BadTxtRecord, UnicodeEncodeError) as exc:
            raise LocalProtocolError(f"domain: {exc}") from None

    @property
    def txt(self) -> PeerTxt:
        return PeerTxt(self.version, self.node_id, self.port, self.domain or None)

    @property
    def instance_name(self) -> str:
        """Stable per node, so a restart replaces the stale cache entry of a crash."""
        return f"qpc-{self.node_id.hex()[:16]}.{SERVICE_TYPE}"


ZEROCONF_FAILURES: tuple[type[Exception], ...] = (ZeroconfError, OSError, ValueError, RuntimeError)
"""What zeroconf raises for a name or record it cannot parse (its Error family, a
ValueError from an address), a socket it lost (OSError), or an instance closing
under us (NotRunning/EventLoopBlocked, or RuntimeError from its closed asyncio
loop). Anything else is a bug here and surfaces."""

START_FAILURES: tuple[type[Exception], ...] = (NoInterfacesError, OSError, ZeroconfError)
"""Why discovery may not start where the rest of the node can: the mesh interface is
not up yet (a router's node starts before its mesh link at boot), or the OS refuses
zeroconf's sockets (port 5353 held by a responder without SO_REUSEADDR, a multicast
option the kernel or an emulator does not have, an address gone since it was listed).
The node serves clients, static peers and federation links meanwhile; discovery is
tried again, with backoff, and ``statistics()`` says why it is off."""


def _snapshot(zc: Zeroconf, name: str, timeout_ms: int) -> ResolvedService | None:
    """Worker thread: SRV/TXT/A/AAAA of one instance (usually all in the cache)."""
    try:
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zc) and not info.request(zc, timeout_ms):
            return None
        return ResolvedService(name, bytes(info.text), tuple(info.parsed_scoped_addresses()))
    except ZEROCONF_FAILURES as exc:  # zeroconf closing, a name it cannot parse...
        log.debug("mdns resolve %r failed: %r", name, exc)
        return None


def _cached(zc: Zeroconf, name: str) -> ResolvedService | None:
    """Cache only: never blocks, safe from the Trio thread."""
    try:
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zc):
            return None
        return ResolvedService(name, bytes(info.text), tuple(info.parsed_scoped_addresses()))
    except ZEROCONF_FAILURES as exc:  # a name or record zeroconf cannot parse: same as not cached
        log.debug("mdns cache lookup %r failed: %r", name, exc)
        return None


_IP_MULTICAST_ALL = 49  # linux/in.h
_IPV6_MULTICAST_ALL = 29  # linux/in6.h (Linux >= 4.20)


def _isolate_multicast(zc: Zeroconf, ifaces: Sequence[MeshInterface]) -> bool:
    """Hear mDNS only from the chosen interfaces; True when that is guaranteed.

    Linux delivers a multicast group's traffic to a wildcard-bound socket from every
    interface on which *any* socket of the host joined the group (umdns or avahi on
    a router does). Our socket restricted to the mesh would then hear the LAN and
    answer its queries by unicast, so LAN hosts would see the router.
    IP_MULTICAST_ALL=0 stops that for IPv4 (the kernel checks group *and*
    interface); for IPv6 it checks the group only, so with one chosen interface the
    listening socket is also bound to that device (SO_BINDTODEVICE), which covers
    both families. With several interfaces and IPv6, isolation is not guaranteed and
    the core's on-link address filter is what keeps foreign peers out of the view.

    zeroconf does not expose its sockets: they are reached through attributes that
    are public in name; if those move this returns False and the netns test of
    interface choice fails loudly.
    """
    if not sys.platform.startswith("linux"):
        return False
    readers = list(getattr(zc.engine, "readers", []))
    socks = []
    for wrapped in readers:
        sock = getattr(wrapped, "sock", None)
        if sock is None:
            sock = wrapped.transport.get_extra_info("socket")
        if sock is not None:
            socks.append(sock)
    if not socks or len(socks) != len(readers):
        return False
    mc_all_off = True
    for sock in socks:
        opts = [(socket.IPPROTO_IP, _IP_MULTICAST_ALL)]
        if sock.family == socket.AF_INET6:
            opts.append((socket.IPPROTO_IPV6, _IPV6_MULTICAST_ALL))
        for level, opt in opts:
            try:
                sock.setsockopt(level, opt, 0)
            except OSError as exc:
                log.debug("mdns: setsockopt(%d, %d): %r", level, opt, exc)
                mc_all_off = False
    if len(ifaces) == 1:
        device = ifaces[0].name.encode()
        bound = True
        for sock in socks:
            if sock.getsockname()[0] in ("0.0.0.0", "::"):  # the shared listening socket
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
                except OSError as exc:
                    log.debug("mdns: SO_BINDTODEVICE %s: %r", ifaces[0].name, exc)
                    bound = False
        if bound:
            return True
    return mc_all_off and not any(i.ipv6 for i in ifaces)


class MdnsDiscovery:
    """Announce this node and report the others; ``await nursery.start(d.run)``.

    Events arrive on ``events`` in order: ``PeerSeen``, ``PeerUpdated``,
    ``PeerGone`` (goodbye only; a crashed node is never reported gone here).
    """

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        self._send, self.events = trio.open_memory_channel[DiscoveryEvent](config.event_buffer)
        self._core = DiscoveryCore(config.node_id, max_instances=config.max_instances)
        self._outbox: deque[DiscoveryEvent] = deque()
        self._outbox_ready = trio.Event()
        self._pending: dict[str, ServiceStateChange] = {}
        self._wakeup = trio.Event()
        self._generation: dict[str, int] = {}
        self._latest: dict[str, ServiceStateChange] = {}
        self._resolving: set[str] = set()
        self._interfaces: tuple[MeshInterface, ...] = ()
        self._announced = False
        self._uses_ipv6 = False
        self._multicast_isolated = False
        self._shutdown_timeouts = 0
        self._running = False
        self._start_failures = 0
        self._last_error = ""
        self._limiter = trio.CapacityLimiter(config.resolvers)

    def statistics(self) -> DiscoveryStatistics:
        return self._core.statistics(
            announced=self._announced,
            interfaces=tuple(i.name for i in self._interfaces),
            shutdown_timeouts=self._shutdown_timeouts,
            multicast_isolated=self._multicast_isolated,
            running=self._running,
            start_failures=self._start_failures,
            last_error=self._last_error,
        )

    def peers(self) -> dict[bytes, PeerSeen]:
        return self._core.peers()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. ``started`` once zeroconf listens (announcing continues), or
        once its first start failed (:data:`START_FAILURES`): then the node runs without
        mDNS and discovery is tried again, ``retry_initial_s`` doubling to ``retry_max_s``."""
        async with self._send:
            if self.config.local_only:
                task_status.started()
                await trio.sleep_forever()
            delay = self.config.retry_initial_s
            while True:
                try:
                    zc, info = await self._open()
                    break
                except START_FAILURES as exc:
                    self._interfaces = ()
                    self._start_failures += 1
                    self._last_error = f"{type(exc).__name__}: {exc}"[:200]
                    log.error(
                        "mdns: discovery cannot start (%s); the node runs without it, "
                        "next try in %.0f s",
                        self._last_error,
                        delay,
                    )
                if self._start_failures == 1:  # the node goes on without mDNS meanwhile
                    task_status.started()
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
            if self._start_failures:
                log.warning("mdns: discovery started after %d failed tries", self._start_failures)
            token = trio.lowlevel.current_trio_token()

            def on_change(
                zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
            ) -> None:  # ServiceBrowser thread
                with suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._note, name, state_change, trio_token=token)

            browser: ServiceBrowser | None = None
            try:
                if self.config.interfaces is not None:
                    self._multicast_isolated = _isolate_multicast(zc, self._interfaces)
                    if not self._multicast_isolated:
                        log.warning(
                            "mdns: cannot keep other interfaces' mDNS out (see _isolate_multicast); "
                            "peers' addresses are still filtered to the chosen links"
                        )
                browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
                self._running = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._register, zc, info)
                    nursery.start_soon(self._forward)
                    if not self._start_failures:  # else started at the first failure
                        task_status.started()
                    await self._pump(zc, nursery)
            finally:
                self._running = False
                await self._shutdown(zc, browser)

    async def _open(self) -> tuple[Zeroconf, ServiceInfo]:
        """The chosen interfaces, the core that filters to them, and a listening
        Zeroconf on them; raises one of :data:`START_FAILURES`."""
        self._interfaces = await trio.to_thread.run_sync(select_interfaces, self.config.interfaces)
        choice, version = zeroconf_interfaces(self._interfaces)
        self._uses_ipv6 = version != "v4"
        if self.config.interfaces is not None:
            self._core = DiscoveryCore(
                self.config.node_id,
                allowed_scopes=frozenset(i.index for i in self._interfaces),
                allowed_networks=tuple(
                    ipaddress.ip_network(n) for i in self._interfaces for n in i.networks
                ),
                max_instances=self.config.max_instances,
            )
        self._core.add_own_name(self.config.instance_name)
        info = ServiceInfo(
            SERVICE_TYPE,
            self.config.instance_name,
            port=self.config.port,
            properties=self.config.txt.encode(),
            server=f"qpc-{self.config.node_id.hex()[:16]}.local.",
            parsed_addresses=announce_addresses(self._interfaces),
        )
        zc = await trio.to_thread.run_sync(
            partial(Zeroconf, interfaces=choice, ip_version=_IP_VERSIONS[version])
        )
        return zc, info

    def _note(self, name: str, change: ServiceStateChange) -> None:
        """Trio thread: remember the latest change per instance and wake the pump."""
        self._pending[name] = change
        self._wakeup.set()

    async def _register(self, zc: Zeroconf, info: ServiceInfo) -> None:
        # Not abandoned on cancel: probing is bounded (~1.5 s) and an abandoned
        # registration could announce us after the goodbye.
        try:
            await trio.to_thread.run_sync(
                partial(zc.register_service, info, allow_name_change=True)
            )
        except ZEROCONF_FAILURES as exc:
            log.error("mdns: cannot announce %s: %r (still browsing)", info.name, exc)
            return
        self._core.add_own_name(info.name)  # renamed on a conflict
        self._announced = True

    async def _pump(self, zc: Zeroconf, nursery: trio.Nursery) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            pending, self._pending = self._pending, {}
            for name, change in pending.items():
                self._latest[name] = change
                if change is ServiceStateChange.Removed:
                    self._generation[name] = self._generation.get(name, 0) + 1
                    self._emit(self._core.removed(name, trio.current_time()))
                elif name not in self._resolving:
                    self._resolving.add(name)
                    nursery.start_soon(self._resolve, zc, name)
                else:  # resolving an older state: resolve again once it is done
                    self._generation[name] = self._generation.get(name, 0) + 1

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        try:
            while True:
                gen = self._generation.get(name, 0)
                snap = await trio.to_thread.run_sync(
                    _snapshot,
                    zc,
                    name,
                    int(self.config.resolve_timeout_s * 1000),
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
                if self._generation.get(name, 0) != gen:
                    if self._latest.get(name) is ServiceStateChange.Removed:
                        return  # said goodbye while we looked: the answer is stale
                    continue  # changed (or removed and re-added) meanwhile: look again
                if snap is not None and self._uses_ipv6:
                    snap = await self._await_scopes(zc, snap)
                    if self._generation.get(name, 0) != gen:
                        continue
                if snap is None:
                    self._core.unresolved(name)
                else:
                    self._emit(self._core.resolved(snap, trio.current_time()))
                return
        finally:
            self._resolving.discard(name)

    async def _await_scopes(self, zc: Zeroconf, snap: ResolvedService) -> ResolvedService:
        """A response is sent on the IPv4 and the IPv6 socket at once; if the IPv4 copy
        won, its link-local AAAA has no scope (unusable) and the scoped copy is a few
        ms behind. Wait for it (bounded) so PeerSeen already carries the IPv6 route."""
        deadline = trio.current_time() + SCOPE_WAIT_S
        while has_unscoped_link_local(snap.addresses) and trio.current_time() < deadline:
            await trio.sleep(0.02)
            again = _cached(zc, snap.name)
            if again is None:
                break
            snap = again
        return snap

    def _emit(self, events: list[DiscoveryEvent]) -> None:
        if events:
            self._outbox.extend(events)
            self._outbox_ready.set()

    async def _forward(self) -> None:
        """One task sends, so events leave in the order the core made them."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            while self._outbox:
                await self._send.send(self._outbox[0])
                self._outbox.popleft()

    async def _shutdown(self, zc: Zeroconf, browser: ServiceBrowser | None) -> None:
        def blocking() -> None:
            if browser is not None:
                browser.cancel()
            zc.unregister_all_services()  # goodbye packets (TTL 0)
            zc.close()

        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.config.shutdown_timeout_s) as cs:
                try:
                    await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
                except ZEROCONF_FAILURES as exc:
                    log.warning("mdns shutdown: %r", exc)
            if cs.cancelled_caught:
                self._shutdown_timeouts += 1
                log.warning(
                    "mdns shutdown took over %.1f s; zeroconf thread abandoned",
                    self.config.shutdown_timeout_s,
                )


@asynccontextmanager
async def open_discovery(config: DiscoveryConfig) -> AsyncIterator[MdnsDiscovery]:
    """``async with open_discovery(cfg) as d: async for ev in d.events: ...``"""
    disc = MdnsDiscovery(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(disc.run)
        try:
            yield disc
        finally:
            nursery.cancel_scope.cancel()


# ---- operator debug tool ------------------------------------------------------------


def event_json(ev: DiscoveryEvent) -> dict[str, Any]:
    """One event as a JSON-able dict (also what the netns tests read)."""
    out: dict[str, Any] = {
        "ev": {PeerSeen: "peer_seen", PeerUpdated: "peer_updated", PeerGone: "peer_gone"}[type(ev)],
        "node": ev.node_id.hex(),
        "instance": ev.instance,
        "now": ev.now,
    }
    if not isinstance(ev, PeerGone):
        out["addresses"] = [list(a) for a in ev.addresses]
        out["display"] = [str(a) for a in ev.addresses]
        out["txt"] = {"ver": ev.txt.version, "port": ev.txt.port, "domain": ev.txt.domain}
    return out


def _print(obj: dict[str, Any]) -> None:
    obj["t"] = system_wall_ms() / 1000  # the debug line's wall time, as every log line has
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _print_stats_changes(disc: MdnsDiscovery) -> None:
    """Counters as they change: why a node does not show up (bad records, own
    announcement, unresolved) is visible without a packet capture."""
    last = None  # the first line at once: a start that failed is visible before any change
    while True:
        now = disc.statistics()
        if now != last:
            _print({"ev": "stats", **msgspec.structs.asdict(now)})
            last = now
        await trio.sleep(0.25)


async def _main(config: DiscoveryConfig, seconds: float) -> None:
    opened: list[MdnsDiscovery] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for sig in signals:
                    _print({"ev": "signal", "signal": int(sig)})
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            nursery.cancel_scope.deadline = trio.current_time() + seconds
            async with open_discovery(config) as disc:
                opened.append(disc)
                _print(
                    {
                        "ev": "ready",
                        "instance": config.instance_name,
                        "interfaces": list(disc.statistics().interfaces),
                    }
                )
                nursery.start_soon(_print_stats_changes, disc)
                async for ev in disc.events:
                    _print(event_json(ev))
    if opened:  # after the shutdown (goodbyes sent or timed out): the final counters
        _print({"ev": "stats", **msgspec.structs.asdict(opened[0].statistics())})
    _print({"ev": "closed"})


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m qpc_node.mesh.discovery",
        description="Announce a qpc node by mDNS and print other nodes as JSON lines.",
    )
    ap.add_argument("--node-id", required=True, help="64 hex digits (the node fingerprint)")
    ap.add_argument("--port", type=int, default=4201)
    ap.add_argument("--domain", default=None)
    ap.add_argument(
        "--interface", action="append", default=None, help="repeatable; default: all up"
    )
    ap.add_argument("--seconds", type=float, default=math.inf)
    args = ap.parse_args(argv)
    try:
        node_id = bytes.fromhex(args.node_id)
        config = DiscoveryConfig(
            node_id=node_id,
            port=args.port,
            domain=args.domain,
            interfaces=tuple(args.interface) if args.interface else None,
        )
    except (ValueError, LocalProtocolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        select_interfaces(config.interfaces)  # a typo'd interface: said at once, plainly
    except LocalProtocolError as exc:
        # Not fatal, as in the node: the interface may come up later (retried).
        print(f"warning: {exc}; discovery starts once it is up", file=sys.stderr)
    trio.run(_main, config, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
