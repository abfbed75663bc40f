"""The datagram socket the endpoint drives, and its real UDP implementation.

:class:`DatagramSocket` is the seam the fake lossy network
(:mod:`qpc_node.quic.testing`) implements too, so every endpoint test can run on
a virtual clock. The shape is chosen for batching: one wakeup drains many
datagrams with no await in between, and sending never awaits (a full kernel
buffer is reported, not waited on, so one slow peer cannot stall the others).
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass
from typing import Protocol

import trio

from qpc_node.errors import LocalProtocolError
from qpc_node.quic.address import Address, canonical, parse_literal, to_sockaddr

log = logging.getLogger(__name__)

MAX_UDP_PAYLOAD = 65535
SOCKET_BUFFER_BYTES = 2 << 20


class DatagramSocket(Protocol):
    """A bound, non-blocking datagram socket speaking canonical addresses."""

    @property
    def local_address(self) -> Address: ...

    def recv_batch(self, max_count: int) -> list[tuple[bytes, Address]]:
        """Up to ``max_count`` queued datagrams, without blocking ([] if none)."""
        ...

    async def wait_readable(self) -> None: ...

    def try_send(self, data: bytes, addr: Address) -> bool:
        """Send one datagram; False if it would block (caller keeps it for later)."""
        ...

    async def wait_writable(self) -> None: ...

    async def resolve(self, host: str, port: int) -> Address:
        """A destination this socket can reach, in canonical form."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class UdpStatistics:
    rx_datagrams: int = 0
    tx_datagrams: int = 0
    tx_would_block: int = 0
    tx_errors: int = 0
    rx_errors: int = 0


# Per-datagram send failures that say "this destination is unreachable right now";
# QUIC recovers (or times out) on its own, the node must not fall over.
_TRANSIENT_SEND_ERRNOS = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EADDRNOTAVAIL,
        errno.ENETDOWN,
        errno.EPERM,
        errno.EACCES,
        errno.EMSGSIZE,
        errno.ECONNREFUSED,
        errno.ENOBUFS,
        errno.EINVAL,
    }
)


class UdpSocket:
    """A real UDP socket (dual-stack when bound to ``::``)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.family = sock.family
        self.stats = UdpStatistics()
        self._local = canonical(sock.getsockname())  # still answerable after close()

    @classmethod
    def bind(cls, host: str = "::", port: int = 0) -> UdpSocket:
        """``""``/``"::"``: dual-stack (IPV6_V6ONLY=0), falling back to IPv4 if the
        kernel has no IPv6; IPv4 or IPv6 literals bind just that address."""
        if host in ("", "::"):
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                return cls._bind(socket.AF_INET, ("0.0.0.0", port))
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            return cls._bind_socket(sock, ("::", port))
        addr = parse_literal(host, port)
        if addr is None:
            raise LocalProtocolError(f"bind address must be an IP literal, got {host!r}")
        if len(addr) == 2:
            return cls._bind(socket.AF_INET, addr)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return cls._bind_socket(sock, addr)

    @classmethod
    def _bind(cls, family: int, addr: Address) -> UdpSocket:
        return cls._bind_socket(socket.socket(family, socket.SOCK_DGRAM), addr)

    @classmethod
    def _bind_socket(cls, sock: socket.socket, addr: Address) -> UdpSocket:
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
            sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def local_address(self) -> Address:
        return self._local

    def recv_batch(self, max_count: int) -> list[tuple[bytes, Address]]:
        out: list[tuple[bytes, Address]] = []
        recvfrom = self._sock.recvfrom
        while len(out) < max_count:
            try:
                data, addr = recvfrom(MAX_UDP_PAYLOAD)
            except BlockingIOError:
                break
            except (ConnectionRefusedError, ConnectionResetError):
                # ICMP errors queued on the socket by an earlier send: not data.
                self.stats.rx_errors += 1
                continue
            out.append((data, canonical(addr)))
        self.stats.rx_datagrams += len(out)
        return out

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self._sock)

    def try_send(self, data: bytes, addr: Address) -> bool:
        try:
            self._sock.sendto(data, to_sockaddr(addr, self.family))
        except BlockingIOError:
            self.stats.tx_would_block += 1
            return False
        except OSError as exc:
            if exc.errno not in _TRANSIENT_SEND_ERRNOS:
                raise
            self.stats.tx_errors += 1
            log.debug("udp send to %s failed: %s", addr, exc)
            return True
        self.stats.tx_datagrams += 1
        return True

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def resolve(self, host: str, port: int) -> Address:
        addr = parse_literal(host, port)
        if addr is None:
            try:
                infos = await trio.socket.getaddrinfo(
                    host,
                    port,
                    family=self.family,
                    type=socket.SOCK_DGRAM,
                    flags=socket.AI_V4MAPPED if self.family == socket.AF_INET6 else 0,
                )
            except socket.gaierror as exc:
                raise LocalProtocolError(f"cannot resolve {host!r}: {exc}") from exc
            if not infos:
                raise LocalProtocolError(f"cannot resolve {host!r}")
            addr = canonical(infos[0][4])
        to_sockaddr(addr, self.family)  # raises if this socket cannot reach it
        return addr

    def close(self) -> None:
        self._sock.close()
