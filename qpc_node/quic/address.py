"""Socket addresses for a dual-stack node: parsing, scope ids, v4-mapped forms.

Inside the QUIC layer an address is *canonical*: IPv4 peers are ``(host, port)``
even when they reached our ``::`` socket as ``::ffff:a.b.c.d``; IPv6 peers are
``(host, port, flowinfo, scope_id)`` (the scope id matters for link-local
``fe80::/10`` on mesh interfaces). Only the socket wrapper converts to what the
kernel wants, so the routing table and the core see one form per peer.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from qpc_node.errors import LocalProtocolError

Address = tuple[Any, ...]
"""``(host, port)`` for IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6."""


def split_scope(
    host: str, *, if_nametoindex: Callable[[str], int] = socket.if_nametoindex
) -> tuple[str, int]:
    """``"fe80::1%mesh0"`` -> ``("fe80::1", index of mesh0)``; brackets allowed.

    A numeric scope is taken as an interface index. No scope gives 0.
    """
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if "%" not in h:
        return h, 0
    addr, _, scope = h.partition("%")
    if not scope:
        raise LocalProtocolError(f"empty scope id in {host!r}")
    if scope.isdigit():
        return addr, int(scope)
    try:
        return addr, if_nametoindex(scope)
    except OSError as exc:
        raise LocalProtocolError(f"unknown interface {scope!r} in {host!r}") from exc


def parse_literal(
    host: str, port: int, *, if_nametoindex: Callable[[str], int] = socket.if_nametoindex
) -> Address | None:
    """Canonical address for an IP literal, or None if ``host`` is a name."""
    if not 0 <= port <= 65535:
        raise LocalProtocolError(f"port out of range: {port}")
    addr, scope = split_scope(host, if_nametoindex=if_nametoindex)
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        if scope:
            raise LocalProtocolError(f"scope id on a non-IPv6 address: {host!r}") from None
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        if scope:
            raise LocalProtocolError(f"scope id on an IPv4 address: {host!r}")
        return (str(ip), port)
    if ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), port)
    if ip.is_link_local and not scope:
        raise LocalProtocolError(f"link-local address needs a scope (%iface): {host!r}")
    return (str(ip), port, 0, scope)


def canonical(addr: Address) -> Address:
    """What the kernel handed us -> canonical form (unmap ``::ffff:a.b.c.d``)."""
    if len(addr) == 2:
        return (addr[0], addr[1])
    host = str(addr[0]).partition("%")[0]
    ip = ipaddress.IPv6Address(host)
    if ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), addr[1])
    return (str(ip), addr[1], addr[2], addr[3])


def to_sockaddr(addr: Address, family: int) -> Address:
    """Canonical -> what ``sendto`` on a socket of ``family`` accepts."""
    if family == socket.AF_INET6:
        if len(addr) == 2:
            return (f"::ffff:{addr[0]}", addr[1], 0, 0)
        return addr
    if len(addr) != 2:
        raise LocalProtocolError(f"cannot reach IPv6 address {addr[0]} from an IPv4-only socket")
    return addr


def host_of(addr: Address) -> str:
    """The part admission control counts per source (IP, scope ignored)."""
    return str(addr[0])


def format_address(addr: Address) -> str:
    if len(addr) == 2:
        return f"{addr[0]}:{addr[1]}"
    scope = f"%{addr[3]}" if len(addr) > 3 and addr[3] else ""
    return f"[{addr[0]}{scope}]:{addr[1]}"
