"""Static peers: ``host:port#nodefingerprint`` for meshes where multicast is filtered.

The fingerprint pins the node (SHA-256 of its Ed25519 key, 64 hex digits), so a
static peer is as trustworthy as a verified one and never needs TOFU. Hosts may
be names, IPv4, or bracketed IPv6 literals with an interface scope
(``[fe80::1%mesh0]:4201#...``). The scope is kept by *name* and resolved to an
index only when dialling: config is checked on boot, possibly before ``mesh0``
exists (procd starts us before netifd has finished).
"""

from __future__ import annotations

import ipaddress
import socket
import string
from collections.abc import Callable, Iterable

import msgspec

from qpc_node.errors import ConfigError
from qpc_node.mesh.discovery_core import NODE_ID_LEN
from qpc_node.quic.address import Address, parse_literal

DEFAULT_PORT = 4201
_MAX_TEXT = 600
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
# what interface names are made of in practice (the kernel refuses '/', ':', spaces)
_IFNAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-@")


class BadStaticPeer(ConfigError):
    """A static peer entry cannot be parsed; the message quotes the entry."""


class StaticPeer(msgspec.Struct, frozen=True):
    host: str  # name, IPv4 or IPv6 (without brackets and scope)
    port: int
    node_id: bytes
    scope: str | None = None  # interface name (or index as digits) of a link-local address

    @property
    def is_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def address(
        self, *, if_nametoindex: Callable[[str], int] = socket.if_nametoindex
    ) -> Address | None:
        """The QUIC layer's address for an IP literal (None for a name: resolve it first).

        Raises ``LocalProtocolError`` when the scope's interface does not exist (yet).
        """
        host = f"{self.host}%{self.scope}" if self.scope else self.host
        return parse_literal(host, self.port, if_nametoindex=if_nametoindex)

    def __str__(self) -> str:
        host = f"{self.host}%{self.scope}" if self.scope else self.host
        if ":" in self.host:
            host = f"[{host}]"
        return f"{host}:{self.port}#{self.node_id.hex()}"


def _node_id(text: str, entry: str) -> bytes:
    hexs = text.strip().replace(":", "").replace(" ", "").lower()
    if len(hexs) != 2 * NODE_ID_LEN or any(c not in "0123456789abcdef" for c in hexs):
        raise BadStaticPeer(
            f"static peer {entry!r}: node fingerprint must be {2 * NODE_ID_LEN} hex digits"
        )
    return bytes.fromhex(hexs)


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise BadStaticPeer(f"static peer {entry!r}: port must be 1..65535")
    return int(text)


def parse_static_peer(entry: str) -> StaticPeer:
    """``host[:port]#fingerprint`` -> ``StaticPeer``; ``BadStaticPeer`` says what is wrong."""
    if not isinstance(entry, str):
        raise BadStaticPeer(f"static peer must be a string, got {type(entry).__name__}")
    if len(entry) > _MAX_TEXT:
        raise BadStaticPeer(f"static peer entry of {len(entry)} characters")
    where, sep, fpr = entry.strip().partition("#")
    where = where.strip()
    if not sep:
        raise BadStaticPeer(f"static peer {entry!r}: missing '#nodefingerprint'")
    node_id = _node_id(fpr, entry)
    port = DEFAULT_PORT
    if where.startswith("["):
        host, close, rest = where[1:].partition("]")
        if not close:
            raise BadStaticPeer(f"static peer {entry!r}: unclosed '['")
        if rest:
            if not rest.startswith(":"):
                raise BadStaticPeer(f"static peer {entry!r}: junk after ']'")
            port = _port(rest[1:], entry)
        bracketed = True
    else:
        if where.count(":") > 1:
            raise BadStaticPeer(
                f"static peer {entry!r}: write an IPv6 address in brackets: [addr%iface]:port"
            )
        host, colon, port_s = where.partition(":")
        if colon:
            port = _port(port_s, entry)
        bracketed = False
    host, pct, scope = host.partition("%")
    if not host:
        raise BadStaticPeer(f"static peer {entry!r}: no host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None:
        if bracketed or pct:
            raise BadStaticPeer(f"static peer {entry!r}: not an IPv6 address: {host!r}")
        name = host.lower().rstrip(".")
        if len(name) > 253 or not name or not set(name) <= _HOST_CHARS:
            raise BadStaticPeer(f"static peer {entry!r}: bad host name {host!r}")
        return StaticPeer(name, port, node_id)
    if isinstance(ip, ipaddress.IPv4Address):
        if bracketed or pct:
            raise BadStaticPeer(f"static peer {entry!r}: IPv4 needs no brackets or scope")
        return StaticPeer(str(ip), port, node_id)
    if not bracketed:
        raise BadStaticPeer(f"static peer {entry!r}: write an IPv6 address in brackets")
    if pct and (not scope or len(scope) > 15 or not set(scope) <= _IFNAME_CHARS):
        raise BadStaticPeer(f"static peer {entry!r}: bad interface scope {scope!r}")
    if pct and not ip.is_link_local:
        raise BadStaticPeer(f"static peer {entry!r}: a scope only makes sense on fe80::/10")
    if ip.is_link_local and not pct:
        raise BadStaticPeer(
            f"static peer {entry!r}: a link-local address needs its interface: [{host}%mesh0]"
        )
    return StaticPeer(str(ip), port, node_id, scope or None)


def parse_static_peers(entries: Iterable[str]) -> tuple[StaticPeer, ...]:
    """All entries (config / UCI list). One node at several addresses is fine (multi-homed);
    the same entry twice is a config error (a copy-paste slip worth naming)."""
    peers = tuple(parse_static_peer(e) for e in entries)
    seen: dict[bytes, StaticPeer] = {}
    for p in peers:
        if p.node_id in seen and (seen[p.node_id].host, seen[p.node_id].port) == (p.host, p.port):
            raise BadStaticPeer(f"static peer {p} listed twice")
        seen[p.node_id] = p
    return peers
