"""Attackers and legitimate users for the abuse tests and ``bench/abuse_bench.py``:
raw RPC clients that authenticate and then misbehave at the stream level, raw
UDP senders of Initials (undecryptable, or real ClientHellos), a legitimate
user timing round trips, and readings of a real node process (RSS from /proc,
metrics over Node/Stats). One module, so the tests and the bench attack alike.

The attacker uses the project's own QUIC client: a :class:`QuicStream` whose
``receive_some`` is never called grants the node no flow-control credit (the
window only moves as the reader consumes), while the connection's driver keeps
acknowledging packets and answering pings -- a peer that is there, and reads
nothing. Each client binds its own loopback address (127.0.0.x), so the node
sees distinct source IPs.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from qpc_node import crypto
from qpc_node.ops.clock import system_wall_ms
from qpc_node.quic import (
    ALPN_CLIENT,
    ClientTLS,
    Connection,
    Endpoint,
    QuicStream,
    open_endpoint,
)
from qpc_node.rpc import RpcClient
from qpc_node.rpc.client import NO_RETRY
from qpc_node.rpc.errors import RpcError
from qpc_node.rpc.framing import encode_frame
from qpc_node.rpc.health import HEALTH_METHOD
from qpc_node.rpc.protocol import WIRE_VERSION
from qpc_node.service.auth import auth_message
from qpc_node.service.stats import STATS_METHOD, samples_from_proto
from qpc_node.wire.envelope import Envelope, pad
from qpc_node.wire.gen.qpc.v1 import health_pb2, ops_pb2, rpc_pb2, service_pb2

MIB = 1024 * 1024


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssPeak:
    """Highest VmRSS of a process, sampled every few milliseconds (a transient
    of a few hundred ms must not slip between samples)."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss_mib(pid)

    async def sample_until(self, done: trio.Event) -> None:
        while not done.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            await trio.sleep(self.interval)


@dataclass(slots=True)
class User:
    """An authenticated client connection from one source address."""

    conn: Connection
    rpc: RpcClient
    me: bytes
    seq: int = 0
    sent: int = 0


@asynccontextmanager
async def user(tmp: Path, host: str, port: int, pin: str, *, source: str) -> AsyncIterator[User]:
    """Connect from ``source`` (a 127.0.0.x address), authenticate a fresh key."""
    ident = crypto.Identity.create(tmp / f"id-{source}-{os.urandom(4).hex()}", os.urandom(32))
    async with open_endpoint(source, 0) as ep:
        conn = await ep.connect(host, port, ClientTLS(ALPN_CLIENT, pin=pin))
        rpc = RpcClient(conn.open_stream, retry_policy=NO_RETRY, default_timeout=10.0)
        ch = await rpc.call(
            "qpc.v1.Auth/Challenge",
            service_pb2.AuthChallengeRequest(),
            service_pb2.AuthChallengeResponse,
        )
        sig = ident.sign(auth_message(ch.nonce, bytes.fromhex(pin)))
        proved = await rpc.call(
            "qpc.v1.Auth/Prove",
            service_pb2.AuthProveRequest(public_key=ident.public_key, signature=sig),
            service_pb2.AuthProveResponse,
        )
        try:
            yield User(conn, rpc, bytes(proved.fingerprint))
        finally:
            await conn.aclose()


def envelope_to(recipient: bytes, size: int) -> service_pb2.EnqueueRequest:
    env = Envelope(
        msg_id=os.urandom(16),
        recipient=recipient,
        expiry_ms=system_wall_ms() + 3_600_000,
        hop_limit=8,
        ciphertext=pad(os.urandom(16) * (size // 16)),
    )
    return service_pb2.EnqueueRequest(envelopes=[env.to_proto()])


async def store_to_self(u: User, size: int) -> None:
    await u.rpc.call(
        "qpc.v1.Delivery/Enqueue", envelope_to(u.me, size), service_pb2.EnqueueResponse
    )


def request_frame(method: str, body: bytes, call_id: int, deadline_ms: int = 60_000) -> bytes:
    req = rpc_pb2.Request(
        version=WIRE_VERSION, method=method, call_id=call_id, body=body, deadline_ms=deadline_ms
    )
    return encode_frame(req.SerializeToString(), max_frame_size=64 * MIB)


async def unread_calls(u: User, method: str, body: bytes, n: int) -> list[QuicStream]:
    """``n`` calls on ``u``'s connection whose answers are never read."""
    streams = []
    for i in range(n):
        stream = await u.conn.open_stream()
        await stream.send_all(request_frame(method, body, 1000 + i))
        streams.append(stream)
    return streams


@dataclass(slots=True)
class RoundTrips:
    """A legitimate user's store-and-fetch round trips: how many, how fast."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else float("nan")

    @property
    def success(self) -> float:
        total = self.ok + len(self.failed)
        return self.ok / total if total else 0.0


async def round_trip(u: User, out: RoundTrips, size: int = 600) -> None:
    """Enqueue a small message to self, fetch it, ack it; one timed round trip."""
    start = trio.current_time()
    try:
        await store_to_self(u, size)
        u.sent += 1
        got = await u.rpc.call(
            "qpc.v1.Delivery/Fetch",
            service_pb2.FetchRequest(after_seq=u.seq, limit=16),
            service_pb2.FetchResponse,
        )
        if not got.messages:
            raise AssertionError("own message not fetched")
        u.seq = got.messages[-1].seq
        await u.rpc.call(
            "qpc.v1.Delivery/Ack", service_pb2.AckRequest(up_to_seq=u.seq), service_pb2.AckResponse
        )
    except (RpcError, AssertionError) as exc:
        out.failed.append(repr(exc))
        return
    out.ok += 1
    out.seconds.append(trio.current_time() - start)


async def round_trips_until(u: User, out: RoundTrips, done: trio.Event, limit: int) -> None:
    """Round trips back to back until ``done`` (bounded by ``limit``)."""
    for _ in range(limit):
        if done.is_set():
            return
        await round_trip(u, out)
        await trio.sleep(0.02)  # pacing below the node's rate limit, not ordering


async def node_stats(u: User) -> dict[str, float]:
    """The node's metrics (name{labels} -> value) over Node/Stats."""
    resp = await u.rpc.call(STATS_METHOD, ops_pb2.StatsRequest(), ops_pb2.StatsResponse)
    out: dict[str, float] = {}
    for s in samples_from_proto(resp):
        label = ",".join(f"{k}={v}" for k, v in s.labels)
        out[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return out


async def enqueue_statuses(u: User, recipient: bytes, n: int, size: int = 256) -> list[int]:
    """One Enqueue of ``n`` envelopes to ``recipient``: each envelope's status."""
    envs = [envelope_to(recipient, size).envelopes[0] for _ in range(n)]
    resp = await u.rpc.call(
        "qpc.v1.Delivery/Enqueue",
        service_pb2.EnqueueRequest(envelopes=envs),
        service_pb2.EnqueueResponse,
    )
    return [r.status for r in resp.results]


# -- handshake floods (raw UDP) and a user who connects anew each time ---------


def garbage_initial() -> bytes:
    """A long-header v1 Initial of 1,200 bytes that parses but never decrypts."""
    head = b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    rest = 1200 - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def client_hellos(n: int) -> list[bytes]:
    """Real, decryptable ClientHello Initials (a fresh connection each)."""
    out = []
    for _ in range(n):
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_CLIENT], server_name="x")
        q = QuicConnection(configuration=config)
        q.connect(("127.0.0.1", 4201), now=0.0)
        out.append(q.datagrams_to_send(0.0)[0][0])
    return out


async def bind_sources(hosts: list[str]) -> list[trio.socket.SocketType]:
    """One UDP socket per source address (127.x: Linux routes all of 127/8 to lo),
    with a tiny receive buffer: the attacker never reads, as a spoofer could not."""
    socks = []
    for host in hosts:
        s = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        s.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await s.bind((host, 0))
        socks.append(s)
    return socks


async def blast(
    socks: list[trio.socket.SocketType], port: int, packets: list[bytes], rate: float | None
) -> None:
    """Send ``packets`` round-robin over the sources; ``rate`` per second (None: at once)."""
    start = trio.current_time()
    for i, data in enumerate(packets):
        await socks[i % len(socks)].sendto(data, ("127.0.0.1", port))
        if rate is not None:
            await trio.sleep_until(start + (i + 1) / rate)
        elif i % 64 == 63:
            await trio.lowlevel.checkpoint()


async def health_round_trip(ep: Endpoint, host: str, port: int, pin: str) -> float:
    """Connect (full handshake, a Retry when the node asks), one Health call, close."""
    start = trio.current_time()
    conn = await ep.connect(host, port, ClientTLS(ALPN_CLIENT, pin=pin))
    resp = await RpcClient(conn.open_stream).call(
        HEALTH_METHOD, health_pb2.HealthRequest(), health_pb2.HealthResponse, retries=0
    )
    assert resp.status == health_pb2.HealthResponse.SERVING
    elapsed = trio.current_time() - start
    await conn.aclose()
    return elapsed
