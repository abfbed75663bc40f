"""Sans-IO core of mDNS discovery: TXT records, address mapping, the peer view.

Everything the network can say about a peer passes through here before the node
sees it, so this is where a hostile or broken announcement is stopped: TXT
records are parsed by hand (RFC 6763 rules, size caps) and a bad one is counted
and ignored, never raised to the caller. The zeroconf thread only hands in
``ResolvedService`` snapshots (plain data), and ``now`` is passed in, so the
core is tested without sockets, threads or a clock.

mDNS is not a liveness signal: a node killed with ``kill -9`` stays in every
cache for the SRV/A TTL (~120 s) and its PTR for much longer. ``PeerGone`` is
therefore emitted only on an explicit goodbye; the federation link (QUIC
keepalive) decides whether a peer is alive.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from qpc_node.errors import RemoteProtocolError

# Same shape as qpc_node.quic.address.Address; not imported from there because that
# package pulls in aioquic, and this core (and the debug tool) should start fast.
Address = tuple[Any, ...]

SERVICE_TYPE = "_quicprochat._udp.local."
PROTOCOL_VERSION = 1
NODE_ID_LEN = 32

# A whole TXT rdata larger than this is not ours (ours is ~110 bytes): refuse it
# before looking inside, so a flood of huge records costs a length check.
MAX_TXT_BYTES = 1300
MAX_DOMAIN_LEN = 253
MAX_ADDRESSES = 16


class BadRecord(enum.Enum):
    """Why an announcement was ignored (``statistics().bad_by_reason`` keys)."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"  # TXT rdata framing broken or not UTF-8
    MISSING_FIELD = "missing_field"
    BAD_VERSION = "bad_version"
    BAD_NODE = "bad_node"
    BAD_PORT = "bad_port"
    BAD_DOMAIN = "bad_domain"
    NO_ADDRESS = "no_address"


class BadTxtRecord(RemoteProtocolError):
    """A peer's announcement cannot be used; ``reason`` says why."""

    def __init__(self, reason: BadRecord, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


class PeerAddress(NamedTuple):
    """One way to reach a peer. ``scope_id`` is the interface index for IPv6
    link-local addresses (0 otherwise): without it ``fe80::/10`` is unusable."""

    host: str
    port: int
    scope_id: int

    def to_address(self) -> Address:
        """The QUIC layer's canonical form (see ``qpc_node.quic.address``)."""
        if ":" in self.host:
            return (self.host, self.port, 0, self.scope_id)
        return (self.host, self.port)

    def __str__(self) -> str:
        """``[fe80::1%mesh0]:4201`` (interface name when this host knows the index)."""
        if ":" not in self.host:
            return f"{self.host}:{self.port}"
        if not self.scope_id:
            return f"[{self.host}]:{self.port}"
        try:
            scope = socket.if_indextoname(self.scope_id)
        except OSError:
            scope = str(self.scope_id)
        return f"[{self.host}%{scope}]:{self.port}"


class PeerTxt(msgspec.Struct, frozen=True):
    """The typed content of a peer's TXT record."""

    version: int
    node_id: bytes
    port: int
    domain: str | None = None

    def encode(self) -> dict[str, str]:
        """The TXT properties we announce (what ``parse_txt`` reads back)."""
        props = {"ver": str(self.version), "node": self.node_id.hex(), "port": str(self.port)}
        if self.domain:
            props["domain"] = self.domain
        return props


class PeerSeen(msgspec.Struct, frozen=True):
    """A node announced itself for the first time (or again after a goodbye)."""

    node_id: bytes
    addresses: tuple[PeerAddress, ...]
    txt: PeerTxt
    instance: str
    now: float


class PeerUpdated(msgspec.Struct, frozen=True):
    """A known node now announces other addresses or TXT fields."""

    node_id: bytes
    addresses: tuple[PeerAddress, ...]
    txt: PeerTxt
    instance: str
    now: float


class PeerGone(msgspec.Struct, frozen=True):
    """A node said goodbye (TTL 0). Never emitted for a node that just went silent."""

    node_id: bytes
    instance: str
    now: float


DiscoveryEvent = PeerSeen | PeerUpdated | PeerGone


class ResolvedService(msgspec.Struct, frozen=True):
    """What the zeroconf thread read from one resolved instance (plain data only)."""

    name: str
    text: bytes
    addresses: tuple[str, ...]  # as ServiceInfo.parsed_scoped_addresses(): "fe80::1%3"


class DiscoveryStatistics(msgspec.Struct, frozen=True):
    peers: int
    instances: int
    seen: int
    updated: int
    gone: int
    own_filtered: int
    unresolved: int
    bad_records: int
    bad_by_reason: tuple[tuple[str, int], ...] = ()
    table_full: int = 0
    announced: bool = False
    interfaces: tuple[str, ...] = ()
    shutdown_timeouts: int = 0
    multicast_isolated: bool = False  # IP_MULTICAST_ALL off (only with chosen interfaces)
    running: bool = False  # zeroconf listening on the chosen interfaces
    start_failures: int = 0  # starts that failed (discovery.START_FAILURES), retried
    last_error: str = ""  # why the last start failed


def _split_txt(text: bytes) -> dict[str, bytes | None]:
    """RFC 6763 6.1-6.5: length-prefixed strings, keys case-insensitive, first wins."""
    if len(text) > MAX_TXT_BYTES:
        raise BadTxtRecord(BadRecord.OVERSIZE, f"TXT of {len(text)} bytes")
    out: dict[str, bytes | None] = {}
    pos = 0
    while pos < len(text):
        n = text[pos]
        item = text[pos + 1 : pos + 1 + n]
        if len(item) != n:
            raise BadTxtRecord(BadRecord.MALFORMED, "TXT string runs past the record")
        pos += 1 + n
        raw_key, sep, value = item.partition(b"=")
        if not raw_key:
            continue  # RFC 6763 6.4: a string starting with '=' is silently ignored
        try:
            key = raw_key.decode("ascii").lower()
        except UnicodeDecodeError:
            raise BadTxtRecord(BadRecord.MALFORMED, "non-ASCII TXT key") from None
        if key not in out:
            out[key] = value if sep else None
    return out


def _decimal(value: bytes | None, *, max_digits: int) -> int | None:
    if value is None or not 0 < len(value) <= max_digits or not value.isdigit():
        return None
    return int(value)


def parse_txt(text: bytes) -> PeerTxt:
    """Typed fields of a TXT rdata, or ``BadTxtRecord``. Unknown keys are ignored
    (a newer node may add fields)."""
    props = _split_txt(text)
    for key in ("ver", "node", "port"):
        if props.get(key) is None:
            raise BadTxtRecord(BadRecord.MISSING_FIELD, f"no {key!r}")
    version = _decimal(props["ver"], max_digits=5)
    if version is None or not 1 <= version <= 65535:
        raise BadTxtRecord(BadRecord.BAD_VERSION, f"ver={props['ver']!r:.40}")
    node = props["node"]
    assert node is not None
    try:
        node_id = bytes.fromhex(node.decode("ascii")) if len(node) == 2 * NODE_ID_LEN else b""
    except (UnicodeDecodeError, ValueError):
        node_id = b""
    if len(node_id) != NODE_ID_LEN:
        raise BadTxtRecord(BadRecord.BAD_NODE, f"node={node!r:.80}")
    port = _decimal(props["port"], max_digits=5)
    if port is None or not 1 <= port <= 65535:
        raise BadTxtRecord(BadRecord.BAD_PORT, f"port={props['port']!r:.40}")
    domain = parse_domain(props.get("domain"))
    return PeerTxt(version=version, node_id=node_id, port=port, domain=domain)


def parse_domain(value: bytes | None) -> str | None:
    if value is None or value == b"":
        return None
    if len(value) > MAX_DOMAIN_LEN:
        raise BadTxtRecord(BadRecord.BAD_DOMAIN, f"domain of {len(value)} bytes")
    try:
        name = value.decode("ascii")
    except UnicodeDecodeError:
        raise BadTxtRecord(BadRecord.BAD_DOMAIN, "non-ASCII domain") from None
    labels = name.rstrip(".").split(".")
    for label in labels:
        if not 0 < len(label) <= 63 or not all(c.isalnum() or c == "-" for c in label):
            raise BadTxtRecord(BadRecord.BAD_DOMAIN, f"domain={name!r:.80}")
    return name.rstrip(".").lower()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def map_addresses(
    scoped: Iterable[str],
    port: int,
    *,
    allowed_scopes: frozenset[int] | None = None,
    allowed_networks: tuple[Network, ...] | None = None,
) -> tuple[PeerAddress, ...]:
    """zeroconf's scoped address strings -> usable ``PeerAddress``es, IPv6 first.

    Order: IPv6 link-local (always on-link for a neighbour found by multicast),
    other IPv6, then IPv4. Dropped: loopback, unspecified, multicast, link-local
    IPv6 with no scope (unreachable), and, when the interfaces were chosen, any
    address not on their links: link-local on another interface (``allowed_scopes``)
    and others outside their prefixes (``allowed_networks``). A neighbour found by
    multicast is on-link; an address elsewhere means we heard it on an interface we
    were told not to use (see discovery._isolate_multicast).
    """
    v6_ll: list[PeerAddress] = []
    v6: list[PeerAddress] = []
    v4: list[PeerAddress] = []
    seen: set[PeerAddress] = set()
    for text in scoped:
        host, _, scope_s = text.partition("%")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            continue
        scope = int(scope_s) if scope_s.isdigit() else 0
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
            if not scope or (allowed_scopes is not None and scope not in allowed_scopes):
                continue
            bucket = v6_ll
        else:
            if allowed_networks is not None and not any(ip in n for n in allowed_networks):
                continue
            bucket, scope = (v4 if ip.version == 4 else v6), 0
        addr = PeerAddress(str(ip), port, scope)
        if addr not in seen:
            seen.add(addr)
            bucket.append(addr)
    return tuple([*v6_ll, *v6, *v4][:MAX_ADDRESSES])


def has_unscoped_link_local(scoped: Iterable[str]) -> bool:
    """An IPv6 link-local address heard without its interface (via the IPv4 socket)."""
    for text in scoped:
        if "%" in text or ":" not in text:
            continue
        try:
            if ipaddress.IPv6Address(text).is_link_local:
                return True
        except ValueError:
            continue
    return False


class _Instance(msgspec.Struct, frozen=True):
    name: str
    node_id: bytes
    addresses: tuple[PeerAddress, ...]
    txt: PeerTxt
    at: float


class DiscoveryCore:
    """The peer view built from browse/resolve results, keyed by node id.

    One node may show up under more than one instance name (a restart that had to
    rename itself while the old name was still cached): it is one peer, gone only
    when its last instance said goodbye.
    """

    def __init__(
        self,
        own_node_id: bytes,
        *,
        allowed_scopes: frozenset[int] | None = None,
        allowed_networks: tuple[Network, ...] | None = None,
        max_instances: int = 256,
    ) -> None:
        self._own = own_node_id
        self._own_names: set[str] = set()
        self._allowed_scopes = allowed_scopes
        self._allowed_networks = allowed_networks
        self._max = max_instances
        self._instances: dict[str, _Instance] = {}  # key: lower-case instance name
        self._by_node: dict[bytes, list[str]] = {}  # node -> keys, most recent last
        self._seen = self._updated = self._gone = 0
        self._own_filtered = self._unresolved = self._table_full = 0
        self._bad: Counter[str] = Counter()

    def add_own_name(self, name: str) -> None:
        """Our own instance (zeroconf may rename it on a conflict): never a peer."""
        self._own_names.add(name.lower())

    def _view(self, node_id: bytes) -> _Instance:
        return self._instances[self._by_node[node_id][-1]]

    def resolved(self, svc: ResolvedService, now: float) -> list[DiscoveryEvent]:
        key = svc.name.lower()
        if key in self._own_names:
            self._own_filtered += 1
            return []
        try:
            txt = parse_txt(svc.text)
            addresses = map_addresses(
                svc.addresses,
                txt.port,
                allowed_scopes=self._allowed_scopes,
                allowed_networks=self._allowed_networks,
            )
            if not addresses:
                raise BadTxtRecord(BadRecord.NO_ADDRESS, f"{len(svc.addresses)} unusable")
        except BadTxtRecord as exc:
            self._bad[exc.reason.value] += 1
            return []
        if txt.node_id == self._own:
            self._own_filtered += 1
            return []
        new = _Instance(svc.name, txt.node_id, addresses, txt, now)
        old = self._instances.get(key)
        events: list[DiscoveryEvent] = []
        if old is not None and old.node_id != new.node_id:
            events += self.removed(svc.name, now)  # same name, another node: old one left
            old = None
        if old is None and len(self._instances) >= self._max:
            self._table_full += 1
            return events
        before = self._view(new.node_id) if new.node_id in self._by_node else None
        self._instances[key] = new
        keys = self._by_node.setdefault(new.node_id, [])
        if key in keys:
            keys.remove(key)
        keys.append(key)
        if before is None:
            self._seen += 1
            events.append(PeerSeen(new.node_id, new.addresses, new.txt, new.name, now))
        elif (before.addresses, before.txt, before.name) != (new.addresses, new.txt, new.name):
            self._updated += 1
            events.append(PeerUpdated(new.node_id, new.addresses, new.txt, new.name, now))
        return events

    def removed(self, name: str, now: float) -> list[DiscoveryEvent]:
        """A goodbye (or zeroconf's cache expiry of the PTR) for one instance."""
        key = name.lower()
        inst = self._instances.pop(key, None)
        if inst is None:
            return []
        keys = self._by_node[inst.node_id]
        was_current = keys[-1] == key
        keys.remove(key)
        if not keys:
            del self._by_node[inst.node_id]
            self._gone += 1
            return [PeerGone(inst.node_id, inst.name, now)]
        if not was_current:
            return []
        cur = self._view(inst.node_id)
        self._updated += 1
        return [PeerUpdated(cur.node_id, cur.addresses, cur.txt, cur.name, now)]

    def unresolved(self, name: str) -> None:
        """A browse hit whose SRV/TXT/addresses never arrived in time."""
        del name
        self._unresolved += 1

    def peers(self) -> dict[bytes, PeerSeen]:
        """The current view; ``now`` is when that announcement was last resolved
        (not a liveness signal: see the module docstring)."""
        out = {}
        for node_id in self._by_node:
            v = self._view(node_id)
            out[node_id] = PeerSeen(node_id, v.addresses, v.txt, v.name, v.at)
        return out

    def statistics(
        self,
        *,
        announced: bool = False,
        interfaces: tuple[str, ...] = (),
        shutdown_timeouts: int = 0,
        multicast_isolated: bool = False,
        running: bool = False,
        start_failures: int = 0,
        last_error: str = "",
    ) -> DiscoveryStatistics:
        return DiscoveryStatistics(
            peers=len(self._by_node),
            instances=len(self._instances),
            seen=self._seen,
            updated=self._updated,
            gone=self._gone,
            own_filtered=self._own_filtered,
            unresolved=self._unresolved,
            bad_records=sum(self._bad.values()),
            bad_by_reason=tuple(sorted(self._bad.items())),
            table_full=self._table_full,
            announced=announced,
            interfaces=interfaces,
            shutdown_timeouts=shutdown_timeouts,
            multicast_isolated=multicast_isolated,
            running=running,
            start_failures=start_failures,
            last_error=last_error,
        )
