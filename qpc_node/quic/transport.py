"""The datagram socket the endpoint drives, and its real UDP implementation.

:class:`DatagramSocket` is the seam the fake lossy network
(:mod:`qpc_node.quic.testing`) implements too, so every endpoint test can run on
a virtual clock. The shape is chosen for batching: one wakeup drains many
datagrams with no await in between, and sending never awaits (a full kernel
buffer is reported, not waited on, so one slow peer cannot stall the others).

On Linux :class:`UdpSocket` sends a run of equal-size datagrams to one peer (the
last may be shorter) as one ``sendmsg`` with ``UDP_SEGMENT`` (UDP GSO): the
kernel splits it back into the same datagrams, at one syscall per run instead
of one per datagram. Support is probed at bind; a socket whose kernel or route
refuses GSO falls back to one ``sendto`` per datagram for good. Such a socket
also asks for ``UDP_GRO``: the kernel may then hand over a run of same-size
datagrams from one sender in one read (on loopback: a GSO send unsplit), which
:meth:`UdpSocket.recv_batch` cuts back into the datagrams.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec
import trio

from qpc_node.errors import LocalProtocolError
from qpc_node.quic.address import Address, canonical, parse_literal, to_sockaddr

log = logging.getLogger(__name__)

MAX_UDP_PAYLOAD = 65535
SOCKET_BUFFER_BYTES = 2 << 20

SOL_UDP = getattr(socket, "SOL_UDP", socket.IPPROTO_UDP)
UDP_SEGMENT = 103  # linux/udp.h; not exported by every Python build
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on older kernels (newer allow 128)
GSO_MAX_BYTES = 65000  # payload per call, under the 64 KiB IP datagram limit


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


class UdpStatistics(msgspec.Struct):
    rx_datagrams: int = 0
    rx_calls: int = 0  # reads that returned data (< rx_datagrams with GRO)
    tx_datagrams: int = 0
    tx_calls: int = 0  # send syscalls the kernel accepted (< tx_datagrams with GSO)
    tx_gso_batches: int = 0  # of those, coalesced sendmsg(UDP_SEGMENT) calls
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

# What a GSO send fails with when the kernel, device or route cannot segment it
# (no UDP_SEGMENT, no checksum offload/xfrm: EIO, segment above the route MTU:
# EINVAL). The run is resent one datagram per call and GSO stays off.
_GSO_REFUSED_ERRNOS = frozenset(
    {errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
)


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows ``UDP_SEGMENT`` for this socket (Linux >= 4.18)."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0


BatchSender = Callable[[Sequence[tuple[bytes, Address]]], int]


def batch_sender(sock: DatagramSocket) -> BatchSender:
    """``send(datagrams) -> n``: sends in order, stops at the first that would block
    and returns how many it consumed (sent, or dropped as unreachable)."""
    if isinstance(sock, UdpSocket):
        return sock.send_batch
    try_send = sock.try_send

    def send_each(datagrams: Sequence[tuple[bytes, Address]]) -> int:
        n = 0
        for data, addr in datagrams:
            if not try_send(data, addr):
                break
            n += 1
        return n

    return send_each


class UdpSocket:
    """A real UDP socket (dual-stack when bound to ``::``)."""

    def __init__(self, sock: socket.socket, *, gso: bool = True) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.family = sock.family
        self.stats = UdpStatistics()
        self.gso = gso and gso_supported(sock)
        self.gro = self.gso and _enable_gro(sock)
        self._local = canonical(sock.getsockname())  # still answerable after close()

    @classmethod
    def bind(cls, host: str = "::", port: int = 0, *, gso: bool = True) -> UdpSocket:
        """``""``/``"::"``: dual-stack (IPV6_V6ONLY=0), falling back to IPv4 if the
        kernel has no IPv6; IPv4 or IPv6 literals bind just that address.
        ``gso=False``: one ``sendto`` per datagram (and no GRO) even where GSO works."""
        if host in ("", "::"):
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                return cls._bind(socket.AF_INET, ("0.0.0.0", port), gso)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            return cls._bind_socket(sock, ("::", port), gso)
        addr = parse_literal(host, port)
        if addr is None:
            raise LocalProtocolError(f"bind address must be an IP literal, got {host!r}")
        if len(addr) == 2:
            return cls._bind(socket.AF_INET, addr, gso)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return cls._bind_socket(sock, addr, gso)

    @classmethod
    def _bind(cls, family: int, addr: Address, gso: bool) -> UdpSocket:
        return cls._bind_socket(socket.socket(family, socket.SOCK_DGRAM), addr, gso)

    @classmethod
    def _bind_socket(cls, sock: socket.socket, addr: Address, gso: bool) -> UdpSocket:
        with contextlib.ExitStack() as on_error:
            on_error.callback(sock.close)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
            sock.bind(addr)
            on_error.pop_all()
        return cls(sock, gso=gso)

    @property
    def local_address(self) -> Address:
        return self._local

    def recv_batch(self, max_count: int) -> list[tuple[bytes, Address]]:
        if self.gro:
            return self._recv_batch_gro(max_count)
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
        self.stats.rx_calls += len(out)
        return out

    def _recv_batch_gro(self, max_count: int) -> list[tuple[bytes, Address]]:
        """Like the plain path, but one read may carry a GRO run (one sender,
        equal segments, last maybe shorter), so a batch may pass ``max_count``
        by up to one run."""
        out: list[tuple[bytes, Address]] = []
        recvmsg = self._sock.recvmsg
        calls = 0
        while len(out) < max_count:
            try:
                data, ancdata, _flags, addr = recvmsg(MAX_UDP_PAYLOAD, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except (ConnectionRefusedError, ConnectionResetError):
                self.stats.rx_errors += 1
                continue
            calls += 1
            src = canonical(addr)
            segment = 0
            for level, kind, value in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                    segment = int.from_bytes(value[:4], sys.byteorder)
            if 0 < segment < len(data):
                view = memoryview(data)
                out.extend(
                    (bytes(view[o : o + segment]), src) for o in range(0, len(data), segment)
                )
            else:
                out.append((data, src))
        self.stats.rx_datagrams += len(out)
        self.stats.rx_calls += calls
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
        self.stats.tx_calls += 1
        return True

    def send_batch(self, datagrams: Sequence[tuple[bytes, Address]]) -> int:
        """Send in order; the number consumed before the first that would block.

        Each run of datagrams to one address with equal sizes (the last may be
        shorter) goes out as one GSO ``sendmsg`` when the socket allows it; the
        kernel sends or refuses a run whole, so EAGAIN leaves all of it queued.
        """
        n = len(datagrams)
        i = 0
        try_send = self.try_send
        while i < n:
            data, addr = datagrams[i]
            j = i + 1
            if self.gso:
                size = total = len(data)
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    nxt, nxt_addr = datagrams[j]
                    length = len(nxt)
                    if (
                        length > size
                        or total + length > GSO_MAX_BYTES
                        or (nxt_addr is not addr and nxt_addr != addr)
                    ):
                        break
                    total += length
                    j += 1
                    if length < size:
                        break
            if j - i == 1:
                if not try_send(data, addr):
                    return i
                i = j
                continue
            sent = self._send_gso([d for d, _ in datagrams[i:j]], size, addr)
            if sent is None:  # GSO refused: this run one by one, as before
                while i < j:
                    if not try_send(*datagrams[i]):
                        return i
                    i += 1
            elif sent:
                i = j
            else:
                return i
        return i

    def _send_gso(self, bufs: list[bytes], size: int, addr: Address) -> bool | None:
        """True: sent (or dropped as unreachable); False: would block; None: GSO
        refused, now off for this socket."""
        stats = self.stats
        try:
            self._sock.sendmsg(
                bufs,
                [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                0,
                to_sockaddr(addr, self.family),
            )
        except BlockingIOError:
            stats.tx_would_block += 1
            return False
        except OSError as exc:
            if exc.errno in _GSO_REFUSED_ERRNOS:
                self.gso = False
                log.info("UDP GSO refused (%s); one datagram per send from now on", exc)
                return None
            if exc.errno not in _TRANSIENT_SEND_ERRNOS:
                raise
            stats.tx_errors += len(bufs)
            log.debug("udp send to %s failed: %s", addr, exc)
            return True
        stats.tx_datagrams += len(bufs)
        stats.tx_calls += 1
        stats.tx_gso_batches += 1
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
