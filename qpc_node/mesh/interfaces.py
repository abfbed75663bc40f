"""Which network interfaces mDNS runs on, and what zeroconf needs to hear of them.

Routers name their mesh interfaces in config; laptops use every interface that is
up and not loopback. zeroconf wants IPv4 *addresses* but IPv6 interface
*indexes*; an interface whose only address is IPv6 link-local (many Freifunk
meshes) is therefore joined by index, never dropped for lack of IPv4.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Sequence

import ifaddr
import msgspec

from qpc_node.errors import LocalProtocolError

_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8


class NoInterfacesError(LocalProtocolError):
    """Nothing to run mDNS on: a named interface is missing, or none is usable."""


class MeshInterface(msgspec.Struct, frozen=True):
    name: str
    index: int
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]  # without scope; link-local ones included
    networks: tuple[str, ...] = ()  # on-link prefixes ("10.0.0.0/24", "2001:db8::/64")


def _flags(name: str) -> int | None:
    """Interface flags from the kernel (SIOCGIFFLAGS), or None if it cannot say."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH14x", name.encode()[:15], 0)
            res = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)
    except OSError:
        return None
    return int(struct.unpack("16sH14x", res)[1])


def list_interfaces() -> list[MeshInterface]:
    """Every interface that is up, is not loopback and has an address."""
    out = []
    for ad in ifaddr.get_adapters():
        flags = _flags(ad.name)
        if flags is not None and (not flags & _IFF_UP or flags & _IFF_LOOPBACK):
            continue
        v4: list[str] = []
        v6: list[str] = []
        nets: list[str] = []
        for ip in ad.ips:
            host = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            addr = ipaddress.ip_address(host)
            if addr.is_loopback:
                continue
            (v6 if addr.version == 6 else v4).append(host)
            if not addr.is_link_local:
                net = ipaddress.ip_network(f"{host}/{ip.network_prefix}", strict=False)
                nets.append(str(net))
        if (v4 or v6) and ad.index is not None:
            out.append(
                MeshInterface(ad.name, ad.index, tuple(v4), tuple(v6), tuple(dict.fromkeys(nets)))
            )
    return out


def select_interfaces(names: Sequence[str] | None) -> tuple[MeshInterface, ...]:
    """The interfaces to use: ``names`` (all must exist and be usable) or all."""
    available = list_interfaces()
    if names is None:
        if not available:
            raise NoInterfacesError("no interface is up with an address (besides loopback)")
        return tuple(available)
    by_name = {i.name: i for i in available}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise NoInterfacesError(
            f"interface(s) not up or without an address: {', '.join(missing)} "
            f"(usable: {', '.join(sorted(by_name)) or 'none'})"
        )
    return tuple(by_name[n] for n in dict.fromkeys(names))


def zeroconf_interfaces(ifaces: Sequence[MeshInterface]) -> tuple[list[str | int], str]:
    """``(interfaces, ip_version)`` for ``zeroconf.Zeroconf``; version is one of
    ``"all"``, ``"v6"``, ``"v4"`` (the caller maps it to ``IPVersion``)."""
    v6: list[str | int] = [i.index for i in ifaces if i.ipv6]
    v4: list[str | int] = [a for i in ifaces for a in i.ipv4]
    version = "all" if v6 and v4 else "v6" if v6 else "v4"
    return [*v6, *v4], version


def announce_addresses(ifaces: Sequence[MeshInterface]) -> list[str]:
    """Our A/AAAA records, IPv6 first (zeroconf scopes link-local on receipt)."""
    return [a for i in ifaces for a in i.ipv6] + [a for i in ifaces for a in i.ipv4]
