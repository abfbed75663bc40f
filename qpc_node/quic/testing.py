"""Test doubles for the QUIC layer: a seeded lossy network and a throwaway PKI.

:class:`FakeNetwork` hands out sockets implementing
:class:`~qpc_node.quic.transport.DatagramSocket`, so real endpoints run on it
unchanged -- under ``trio.testing.MockClock(autojump_threshold=0)`` a minute of
retransmissions and keepalives takes milliseconds, and a seed replays a run.
Lives in the package (like ``trio.testing``) so rpc/mesh tests reuse it.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import trio

from qpc_node.errors import LocalProtocolError
from qpc_node.quic.address import Address, parse_literal
from qpc_node.quic.connection import Connection, StreamHandler
from qpc_node.quic.endpoint import Endpoint
from qpc_node.quic.stream import QuicStream
from qpc_node.quic.tls import (
    CertificateAuthority,
    KeyType,
    NodeCredentials,
    issue_certificate,
    make_ca,
)

INBOX_DATAGRAMS = 4096


class LinkProfile(msgspec.Struct, frozen=True):
    """Fate of every datagram, drawn from the network's seeded RNG."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # chance of an extra delay of 3x ``delay`` (overtaken by later ones)
    delay: float = 0.002
    jitter: float = 0.001


class FakeNetworkStatistics(msgspec.Struct):
    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    blackholed: int = 0
    overflowed: int = 0


class FakeNetwork:
    def __init__(self, *, seed: int = 0, profile: LinkProfile | None = None) -> None:
        self.profile = profile or LinkProfile()
        self.stats = FakeNetworkStatistics()
        self._rng = random.Random(seed)
        self._sockets: dict[Address, FakeDatagramSocket] = {}
        self._blackholed: set[Address] = set()
        self._ports = itertools.count(40000)
        self._seq = itertools.count()

    def bind(self, host: str = "10.0.0.1", port: int = 0) -> FakeDatagramSocket:
        addr = parse_literal(host, port or next(self._ports))
        if addr is None:
            raise LocalProtocolError(f"fake network needs IP literals, got {host!r}")
        if addr in self._sockets:
            raise LocalProtocolError(f"address in use: {addr}")
        sock = FakeDatagramSocket(self, addr)
        self._sockets[addr] = sock
        return sock

    def blackhole(self, addr: Address, enabled: bool = True) -> None:
        """Silently drop everything to and from ``addr`` (a peer that stopped answering)."""
        if enabled:
            self._blackholed.add(addr)
        else:
            self._blackholed.discard(addr)

    def _unbind(self, addr: Address) -> None:
        self._sockets.pop(addr, None)

    def _send(self, src: Address, dst: Address, data: bytes) -> None:
        st = self.stats
        st.sent += 1
        if src in self._blackholed or dst in self._blackholed:
            st.blackholed += 1
            return
        p, rng = self.profile, self._rng
        if rng.random() < p.drop:
            st.dropped += 1
            return
        copies = 1
        if rng.random() < p.duplicate:
            copies = 2
            st.duplicated += 1
        target = self._sockets.get(dst)
        now = trio.current_time()
        for _ in range(copies):
            delay = p.delay + rng.uniform(0.0, p.jitter)
            if rng.random() < p.reorder:
                delay += 3 * p.delay
                st.reordered += 1
            if target is None:
                st.dropped += 1
            elif target._enqueue(now + delay, next(self._seq), data, src):
                st.delivered += 1
            else:
                st.overflowed += 1


class FakeDatagramSocket:
    """One bound address on a :class:`FakeNetwork` (IPv4/IPv6 literals)."""

    def __init__(self, net: FakeNetwork, addr: Address) -> None:
        self._net = net
        self._addr = addr
        self._inbox: list[tuple[float, int, bytes, Address]] = []
        self._arrival = trio.Event()
        self._closed = False

    @property
    def local_address(self) -> Address:
        return self._addr

    def _enqueue(self, at: float, seq: int, data: bytes, src: Address) -> bool:
        if self._closed or len(self._inbox) >= INBOX_DATAGRAMS:
            return False
        heapq.heappush(self._inbox, (at, seq, data, src))
        self._arrival.set()
        return True

    def recv_batch(self, max_count: int) -> list[tuple[bytes, Address]]:
        now = trio.current_time()
        out: list[tuple[bytes, Address]] = []
        inbox = self._inbox
        while inbox and inbox[0][0] <= now and len(out) < max_count:
            _, _, data, src = heapq.heappop(inbox)
            out.append((data, src))
        return out

    async def wait_readable(self) -> None:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("fake socket closed")
            if self._inbox and self._inbox[0][0] <= trio.current_time():
                await trio.lowlevel.checkpoint()
                return
            deadline = self._inbox[0][0] if self._inbox else math.inf
            self._arrival = trio.Event()
            with trio.move_on_at(deadline):
                await self._arrival.wait()

    def try_send(self, data: bytes, addr: Address) -> bool:
        if self._closed:
            raise trio.ClosedResourceError("fake socket closed")
        self._net._send(self._addr, addr, data)
        return True

    async def wait_writable(self) -> None:
        await trio.lowlevel.checkpoint()

    async def resolve(self, host: str, port: int) -> Address:
        await trio.lowlevel.checkpoint()
        addr = parse_literal(host, port)
        if addr is None:
            raise LocalProtocolError(f"fake network resolves IP literals only: {host!r}")
        return addr

    def close(self) -> None:
        self._closed = True
        self._net._unbind(self._addr)
        self._arrival.set()


@asynccontextmanager
async def serving(endpoint: Endpoint, handler: StreamHandler) -> AsyncIterator[Endpoint]:
    """``endpoint.serve(handler)`` in a nursery of our own for the block's duration."""
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.serve, handler)
        try:
            yield endpoint
        except BaseException as exc:  # re-raised unwrapped, as open_endpoint does
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


# --------------------------------------------------------------------------- PKI


class PkiFixture(msgspec.Struct, frozen=True):
    """A community CA, a stranger CA, and node certificates in every test role."""

    ca: CertificateAuthority
    other_ca: CertificateAuthority
    server: NodeCredentials
    client: NodeCredentials
    other_ca_client: NodeCredentials
    expired_client: NodeCredentials


def make_test_pki(*, key_type: KeyType = "ed25519") -> PkiFixture:
    kt = key_type
    ca = make_ca("test community CA")
    other = make_ca("stranger CA")
    now = dt.datetime.now(dt.UTC)
    return PkiFixture(
        ca=ca,
        other_ca=other,
        server=issue_certificate(ca, "node-server", key_type=kt, dns_names=["localhost"]),
        client=issue_certificate(ca, "node-a", key_type=kt, uris=["urn:qpc:node:a"]),
        other_ca_client=issue_certificate(other, "node-x", key_type=kt),
        expired_client=issue_certificate(
            ca,
            "node-old",
            key_type=kt,
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ),
    )


async def read_all(stream: QuicStream) -> bytes:
    """Read until the peer's FIN (bounded: a stream that never ends fails the test)."""
    out = bytearray()
    for _ in range(100_000):
        chunk = await stream.receive_some()
        if not chunk:
            return bytes(out)
        out += chunk
    raise AssertionError("stream never ended")


async def echo(conn: Connection, stream: QuicStream) -> None:
    """Stream handler that answers ``echo:`` + whatever it received."""
    data = await read_all(stream)
    await stream.send_all(b"echo:" + data)
    await stream.send_eof()


async def call(conn: Connection, payload: bytes) -> bytes:
    """One request/response exchange on a new stream (the client side of :func:`echo`)."""
    stream = await conn.open_stream()
    await stream.send_all(payload)
    await stream.send_eof()
    reply = await read_all(stream)
    await stream.aclose()
    return reply
